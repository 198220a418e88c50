"""``litune export``: a checkpoint -> a Hugging Face folder that ``from_pretrained`` loads with the trained logits.

DeepSpeed ZeRO-2/3 and DDP checkpoints from 2-process runs are exported in tests/strategies/test_strategies.py; here the
single-file checkpoint of the shared 1-process reference run, the command line, and bad input.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from litune.cli import main
from litune.commands.export import export
from litune.errors import ConfigError
from litune_testing import probe, probe_input_ids, the_run


def probe_logits(folder: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(probe_input_ids(model.config.vocab_size)).logits.float()


def test_cli_exports_a_run_folder_with_the_trained_logits(reference, tmp_path, tokenizer_dir, capsys) -> None:
    out = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(the_run(reference)), "--output", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    step = torch.load(the_run(reference) / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    torch.testing.assert_close(probe_logits(out), probe(reference, step)["logits"], atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("def f(x):")["input_ids"] == AutoTokenizer.from_pretrained(tokenizer_dir)("def f(x):")["input_ids"]
    assert "exported" in capsys.readouterr().out


def test_bf16_export_is_the_rounded_fp32_model(reference, tmp_path) -> None:
    ckpt = the_run(reference) / "checkpoints" / "last.ckpt"
    folder = export(ckpt, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert model.dtype == torch.bfloat16
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    wte = state["network.model.transformer.wte.weight"]
    torch.testing.assert_close(model.transformer.wte.weight, wte.to(torch.bfloat16), atol=0, rtol=0)


def test_bad_input_is_a_config_error(reference, tmp_path, capsys) -> None:
    assert main(["export", "--checkpoint", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "o")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ConfigError, match="--overwrite"):
        export(the_run(reference), busy)
    with pytest.raises(ConfigError, match="DeepSpeed checkpoint"):
        export(tmp_path, tmp_path / "o2")  # a directory that is neither a run folder nor DeepSpeed shards


def test_merge_adapters_on_a_run_without_adapters_is_refused(reference, tmp_path, capsys) -> None:
    """``litune export --merge-adapters`` on a full fine-tuning run: exit 2 naming the flag, nothing written."""
    out = tmp_path / "merged"
    argv = ["export", "--checkpoint", str(the_run(reference)), "--output", str(out), "--merge-adapters"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("litune: configuration error:") and "adapters" in err and "Fix:" in err, err
    assert "Traceback" not in err and not out.exists()
