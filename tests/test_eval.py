"""lm-evaluation-harness evaluation: litune's offline tasks, a hand-checked multiple-choice result, the perplexity
cross-check with litune's validation, `litune eval` on a run folder and on its export, and the in-training callback
on 2 processes."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from litune.data.tokenizer import load_tokenizer
from litune.evaluation import EVAL_TASKS_DIR, evaluate, metrics
from litune.models.hf import HFCausalLM
from litune.module import LitLM
from litune_testing import LITUNE, NETWORK, REPO, TINY, check_ok, litune_env

FRAGMENTS = REPO / "configs" / "strategy"

MC_FILE = EVAL_TASKS_DIR / "python_mc.jsonl"
TEXT_FILE = EVAL_TASKS_DIR / "heldout_python.jsonl"


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir: Path) -> tuple[HFCausalLM, object]:
    return HFCausalLM(pretrained=str(tiny_gpt2_dir)).eval(), load_tokenizer(str(tiny_gpt2_dir))


def _continuation_logprob(network: HFCausalLM, tok, context: str, choice: str) -> float:
    """log P(choice | context) in float64, tokenized as the harness does: trailing whitespace of the context moves to
    the choice, the whole is tokenized and the context's tokens split off."""
    stripped = context.rstrip()
    context, choice = stripped, context[len(stripped) :] + choice
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + choice, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    with torch.no_grad():
        logits = network(input_ids=torch.tensor([whole])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_multiple_choice_matches_a_hand_computation(tiny) -> None:
    network, tok = tiny
    docs = [json.loads(line) for line in MC_FILE.read_text().splitlines()]
    hits = hits_norm = 0
    for doc in docs:
        lls = [_continuation_logprob(network, tok, doc["context"], c) for c in doc["choices"]]
        hits += max(range(len(lls)), key=lls.__getitem__) == doc["label"]
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]  # acc_norm: per character of the choice
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == doc["label"]
    found = metrics(evaluate(network, tok, ["litune_python_mc"], batch_size=4))
    assert found["eval/litune_python_mc/acc"] == hits / len(docs)
    assert found["eval/litune_python_mc/acc_norm"] == hits_norm / len(docs)
    assert hits != hits_norm  # the two metrics are told apart (a swapped key would fail)


def test_perplexity_agrees_with_litunes_validation(tiny, tmp_path: Path) -> None:
    """The harness scores each document whole (its first token after the EOS prefix, rolling windows of the model's
    128 positions); litune's validation scores the documents joined with EOS in blocks of 128 tokens (EOS tokens
    scored, the first token of every block not). Converted to tokens (harness: the documents' token count), the two
    perplexities of this random model agree within 2%: its per-token loss barely depends on context, so the ~10
    tokens scored by one side only (of ~1,400) move the mean by well under 1%. Byte or word units would not agree."""
    network, tok = tiny
    found = metrics(evaluate(network, tok, ["litune_heldout_python"], batch_size=4))
    texts = [json.loads(line)["text"] for line in TEXT_FILE.read_text().splitlines()]
    tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    nbytes = sum(len(t.encode()) for t in texts)
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nll = math.log(found["eval/litune_heldout_python/byte_perplexity"]) * nbytes  # total negative log-likelihood
    assert nll == pytest.approx(math.log(found["eval/litune_heldout_python/word_perplexity"]) * words, rel=1e-9)
    harness_ppl = math.exp(nll / tokens)

    from litune.data.text import TextDataModule

    dm = TextDataModule(
        tok.name_or_path,
        path=str(TEXT_FILE),
        validation_split=str(TEXT_FILE),
        block_size=128,
        batch_size=4,
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(LitLM(network), datamodule=dm, verbose=False)
    litune_ppl = logged["val/ppl"]
    assert harness_ppl == pytest.approx(litune_ppl, rel=0.02)
    byte_ppl = found["eval/litune_heldout_python/byte_perplexity"]
    assert byte_ppl != pytest.approx(litune_ppl, rel=0.02)  # teeth: the unconverted number is far off


@pytest.mark.slow
def test_litune_eval_of_a_run_folder_and_of_its_export_agree(reference: Path, tmp_path: Path) -> None:
    """`litune eval` on the reference run folder and on its `litune export` give the same numbers; the run's results
    land in RUN/eval and in its metrics.csv, and `litune report` shows them."""
    from litune.cli import main

    run = next(p for p in (reference / "runs").iterdir())
    tasks = "litune_python_mc,litune_heldout_python"
    out = tmp_path / "run-results"
    assert main(["eval", "--checkpoint", str(run), "--tasks", tasks, "--output", str(out)]) == 0
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "hf")]) == 0
    hf_out = tmp_path / "hf-results"
    assert main(["eval", "--checkpoint", str(tmp_path / "hf"), "--tasks", tasks, "--output", str(hf_out)]) == 0
    from_run = json.loads((out / "eval_results.json").read_text())["metrics"]
    from_export = json.loads((hf_out / "eval_results.json").read_text())["metrics"]
    assert from_run.keys() == from_export.keys() and len(from_run) >= 5
    for key, value in from_run.items():
        assert from_export[key] == pytest.approx(value, rel=1e-6), key
    assert "| litune_python_mc | acc |" in (out / "eval_results.md").read_text()


DECODER = {"class_path": "litune.models.transformer.DecoderLM",
           "init_args": {"d_model": 32, "nhead": 2, "num_decoder_layers": 2, "vocab_size": 512, "max_seq_len": 64,
                         "dropout": 0.0}}  # fmt: skip
TASKS = "litune_python_mc,litune_heldout_python"


def test_eval_of_a_custom_decoder_run_logs_to_its_loggers_and_matches_its_gpt2_export(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    """litune's own DecoderLM, trained 2 steps with CSV, TensorBoard and wandb (offline): `litune eval` on the run
    folder (the harness runs DecoderLM through litune.evaluation.HarnessView) gives the numbers of its `litune export`
    (a transformers GPT2LMHeadModel, run by the harness directly), and logs them once, at the run's last step, to
    the three loggers: metrics.csv, the TensorBoard events and the wandb run (the same run id as the training's) read
    back hold the JSON results' values. The run folder is moved before `litune eval`: its loggers go with it. A
    broken saved logger entry is refused before the model loads, with nothing written."""
    import wandb
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from litune.cli import main
    from litune.commands.generate import load_for_generation
    from test_tracking_loggers import finished_wandb_records, wandb_history, wandb_runs

    runs = tmp_path / "runs"
    fit = [
        "fit", "--config", str(TINY), f"--model.tokenizer={tokenizer_dir}", f"--model.network={json.dumps(DECODER)}",
        f"--data.init_args.path={corpus_dir / 'docs.jsonl'}", f"--runs_dir={runs}", "--trainer.max_steps=2",
        "--trainer.limit_val_batches=0", "--loggers=[csv,tensorboard,wandb]",
    ]  # fmt: skip
    try:  # a real `litune fit` / `litune eval` is one process, whose exit closes its wandb run
        assert main(fit) == 0
        wandb.finish()
        os.environ.pop("LITUNE_RUN_DIR", None)
        (trained,) = runs.iterdir()
        run = trained.rename(tmp_path / "moved-run")  # its config.yaml names the folder it had: the loggers follow
        saved = yaml.safe_load((run / "config.yaml").read_text())
        saved["trainer"]["callbacks"].append({"class_path": "only_on_the_training_machine.Callback"})
        (run / "config.yaml").write_text(yaml.safe_dump(saved))  # the eval reads only the config's logger part
        assert main(["eval", "--checkpoint", str(run), "--tasks", TASKS]) == 0
    finally:
        wandb.finish()
        os.environ.pop("LITUNE_RUN_DIR", None)
    hf, hf_out = tmp_path / "hf", tmp_path / "hf-results"
    assert main(["export", "--checkpoint", str(run), "--output", str(hf)]) == 0
    assert json.loads((hf / "config.json").read_text())["model_type"] == "gpt2"
    assert main(["eval", "--checkpoint", str(hf), "--tasks", TASKS, "--output", str(hf_out)]) == 0

    record = json.loads((run / "eval" / "eval_results.json").read_text())
    from_run, from_export = record["metrics"], json.loads((hf_out / "eval_results.json").read_text())["metrics"]
    assert record["step"] == 2 and len(from_run) == 5 and from_run.keys() == from_export.keys()
    for key, value in from_run.items():
        assert from_export[key] == pytest.approx(value, rel=1e-6), key
    network, tok = load_for_generation(str(hf))  # teeth: the harness's context (the model's 64 positions) matters
    shorter = metrics(evaluate(network, tok, ["litune_heldout_python"], max_length=32))
    key = "eval/litune_heldout_python/byte_perplexity"
    assert shorter[key] != pytest.approx(from_run[key], rel=1e-3)

    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    for key, value in from_run.items():  # once each, at step 1: Lightning's index of the 2nd optimizer step
        assert [(int(r["step"]), float(r[key])) for r in rows if r.get(key)] == [(1, value)], key
        ((step, logged),) = [(e.step, e.value) for e in events.Scalars(key)]
        assert step == 1 and logged == pytest.approx(value, rel=1e-6), key  # TensorBoard stores float32
    training, evaluation = wandb_runs(run)  # two offline legs of one wandb run, as a resume makes
    assert training.name == evaluation.name, "the eval continued the training's wandb run"
    records = finished_wandb_records(evaluation)
    assert {key: wandb_history(records, key) for key in from_run} == {key: {1: v} for key, v in from_run.items()}
    assert wandb_history(finished_wandb_records(training), "train/loss").keys() == {0, 1}
    assert not runs.exists() or not any(runs.iterdir()), "nothing logged at the folder's old place"

    saved["trainer"]["logger"][0]["class_path"] = "litune.loggers.NoSuchLogger"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    assert main(["eval", "--checkpoint", str(run), "--tasks", TASKS]) == 2  # refused before the model loads
    err = capsys.readouterr().err
    assert "litune: configuration error:" in err and "trainer.logger" in err and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before, "nothing written"


TASKS_2P = ["litune_python_mc", "litune_heldout_python"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero3", "fsdp2"])
def test_eval_callback_on_two_processes(strategy: str, tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path) -> None:
    """2 processes evaluating after steps 2 and 4: both ranks finish, rank 0 logs each result once, and the final
    numbers of the (sharded) live model are those of the saved model evaluated alone in one process."""
    callbacks = [{"class_path": "litune.callbacks.evaluation.HarnessEval",
                  "init_args": {"tasks": TASKS_2P, "every_n_steps": 2, "limit": 4}}]  # fmt: skip
    topology = ["--trainer.strategy=ddp"] if strategy == "ddp" else ["--config", f"{FRAGMENTS / strategy}.yaml"]
    args = [
        LITUNE, "fit", "--config", str(TINY), f"--model.tokenizer={tokenizer_dir}",
        f"--model.network.init_args.config={json.dumps(NETWORK)}", f"--data.init_args.path={corpus_dir / 'docs.jsonl'}",
        "--trainer.devices=2", *topology, "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
        f"--trainer.callbacks={json.dumps(callbacks)}", f"--runs_dir={tmp_path / 'runs'}", "--loggers=[csv]",
    ]  # fmt: skip
    proc = subprocess.run(args, env=litune_env(), capture_output=True, text=True, timeout=600)
    check_ok(proc, f"litune fit with HarnessEval on 2 processes ({strategy})")
    (run,) = (tmp_path / "runs").iterdir()
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["step-000002", "step-000004"]
    header, *rows = [r.split(",") for r in (run / "metrics.csv").read_text().splitlines() if r]
    col = header.index("eval/litune_python_mc/acc_norm")
    assert [int(r[header.index("step")]) for r in rows if r[col] != ""] == [1, 3]  # once per evaluation, not per rank

    from litune.resume import load_system

    system = load_system(run)  # the final weights, gathered from the shards
    alone = metrics(evaluate(system.network, system.tokenizer, TASKS_2P, limit=4))
    live = json.loads((run / "eval" / "step-000004" / "eval_results.json").read_text())["metrics"]
    assert live == pytest.approx(alone, rel=1e-5)  # perplexities too: a model evaluated on one shard would differ


@pytest.mark.parametrize(
    ("args", "field"),
    [(["--tasks", " , "], "--tasks"), (["--tasks", "litune_python_mc", "--limit", "0"], "--limit"),
     (["--tasks", "litune_python_mc", "--include", "/nonexistent/tasks"], "--include")],
)  # fmt: skip
def test_bad_eval_arguments_exit_2_before_loading(args: list[str], field: str, tmp_path: Path, capsys) -> None:
    from litune.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path / "missing"), *args]) == 2
    err = capsys.readouterr().err
    assert f"litune: configuration error: {field}" in err and "Traceback" not in err
