"""Every YAML under configs/ parses and instantiates (model, data module, trainer), as `litune fit` would build it.

Whole experiments (configs that define both a network and a data module) are loaded alone; fragments are composed on
top of tests/configs/tiny.yaml. Hub ids (model, tokenizer, dataset) are swapped for tiny local ones, since nothing can
be downloaded here; everything else in the file is used as written.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from litune.commands.fit import LituneCLI
from litune.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "configs" / "sweep").glob("*.yaml"))  # `litune sweep` files, not `litune fit` configs
EVAL_TASKS = REPO / "configs" / "eval"  # lm-evaluation-harness task files (tests/test_eval.py runs them)
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p not in SWEEPS and EVAL_TASKS not in p.parents)
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def _get(tree: dict, dotted: str) -> object:
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def cli_args(config: Path, tiny_gpt2_dir: Path, corpus_dir: Path) -> list[str]:
    tree = yaml.safe_load(config.read_text()) or {}
    whole = _get(tree, "model.network") is not None and _get(tree, "data") is not None
    args = [] if whole else ["--config", str(TINY), f"--model.tokenizer={tiny_gpt2_dir}"]
    if config.parent.name == "preference":  # loss fragments compose onto the preference quickstart
        args = ["--config", str(REPO / "configs" / "dpo.yaml"), f"--model.tokenizer={tiny_gpt2_dir}"]
    args += ["--config", str(config)]
    if config.parent.name == "schedule":  # 100 warmup steps: a run longer than the tiny base's 4 steps (else refused)
        args.append("--trainer.max_steps=1000")
    if isinstance(_get(tree, "model.tokenizer"), str):
        args.append(f"--model.tokenizer={tiny_gpt2_dir}")
    # A 4-bit (QLoRA) fragment quantizes pretrained weights: compose it onto the tiny pretrained GPT-2.
    if _get(tree, "model.network.init_args.pretrained") or _get(tree, "model.network.init_args.quantize"):
        args.append(f"--model.network.init_args.pretrained={tiny_gpt2_dir}")
        if not whole:  # the base's from-scratch `config` would otherwise merge in beside `pretrained`
            args.append("--model.network.init_args.config=null")
    split = ("tensor_parallel_size", "sequence_parallel_size")
    if any(_get(tree, f"trainer.strategy.init_args.{key}") for key in split):  # a network to split, ranks to split over
        decoder = {"class_path": "litune.models.transformer.DecoderLM",
                   "init_args": {"d_model": 32, "nhead": 2, "num_decoder_layers": 2, "vocab_size": 512}}  # fmt: skip
        args += [f"--model.network={json.dumps(decoder)}", "--trainer.devices=2"]
    data_path = _get(tree, "data.init_args.path")
    if isinstance(data_path, str) and data_path != "stdlib" and not Path(data_path).is_absolute():
        args.append(f"--data.init_args.path={corpus_dir / 'docs.jsonl'}")
        if _get(tree, "data.init_args.name"):
            args.append("--data.init_args.name=null")
        if _get(tree, "data.init_args.validation_split"):
            args.append("--data.init_args.validation_split=null")
    if not whole and _get(tree, "data.init_args.block_size"):
        args.append("--data.init_args.block_size=32")  # the tiny model's context is 64
    return args


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_parses(config: Path, tiny_gpt2_dir, corpus_dir, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        LituneCLI(args=[*cli_args(config, tiny_gpt2_dir, corpus_dir), "--print_config"], run=False)
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    # DeepSpeed logs "[date] [WARNING] ..." lines to stdout when imported; the config starts at the first YAML key.
    printed = yaml.safe_load(out[re.search(r"^[A-Za-z_]+:", out, re.MULTILINE).start() :])
    assert printed["model"]["network"]["class_path"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_config_instantiates(config: Path, tiny_gpt2_dir, corpus_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a logger built outside a run folder writes into the current one (MLflow's store)
    try:
        cli = LituneCLI(args=cli_args(config, tiny_gpt2_dir, corpus_dir), run=False)
    except ConfigError as err:
        if "CUDA" in str(err) and not torch.cuda.is_available():
            pytest.skip(f"GPU-only config on a CPU machine: {err}")
        raise
    assert isinstance(cli.model.network, torch.nn.Module)
    assert cli.datamodule is not None and cli.trainer is not None


@pytest.mark.parametrize("sweep", SWEEPS, ids=lambda p: p.name)
def test_sweep_file_loads_and_names_real_config_fields(sweep: Path, tiny_gpt2_dir, corpus_dir) -> None:
    from litune.tuning.sweep import load_spec, override

    spec = load_spec(sweep)
    quickstart = ["--config", str(REPO / "configs" / "quickstart.yaml"), f"--model.tokenizer={tiny_gpt2_dir}"]
    values = [override(p.name, p.values[0] if p.values else p.low) for p in spec.parameters]
    cli = LituneCLI(args=[*quickstart, *values, "--data.init_args.path=" + str(corpus_dir / "docs.jsonl")], run=False)
    assert cli.model is not None
