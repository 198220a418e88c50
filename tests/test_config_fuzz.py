"""Config fuzzing: every field of the resolved config of the quickstart (and of an adapter, an FSDP2 and a sweep config)
set in turn to 0, -1, a huge value and a wrong type (numbers), or to an unknown value (strings). Each variant must
either be accepted or exit 2 with one paragraph naming that field; never a traceback, a hang or a changed run folder.

A seeded generator, not Hypothesis: the variants are a fixed, countable list (fields x values), so a failure names its
variant and reruns exactly. Variants run ``litune fit --dry_run`` in-process: every check that can refuse a command
runs (parse, ranges, the model, data module and trainer built) and nothing trains or is written. The default suite
runs a seeded sample; the slow suite runs every variant and prints what it found (``pytest -s -m slow -k fuzz``).
"""

from __future__ import annotations

import io
import json
import random
import shutil
import signal
import sys
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml

from litune.cli import main
from test_bad_input import PREFIX, data_file, hashes, trained  # noqa: F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
CONFIGS = {
    "quickstart": ([QUICKSTART], ""),
    "adapters": ([QUICKSTART, str(REPO / "configs" / "peft" / "lora.yaml")], "model.adapters."),
    "fsdp2": ([QUICKSTART, str(REPO / "configs" / "strategy" / "fsdp2.yaml")], "trainer.strategy.init_args."),
}
"""Config -> (its files, the fields fuzzed in it: the quickstart's all, the others' own section)."""

SKIPPED = {
    "model.tokenizer": "the quickstart trains a BPE on 4 MB (minutes); the runs use the tests' tokenizer folder",
    "data.init_args.path": "replaced by a small local file, as the tokenizer",
    "data.init_args.tokenizer": "linked to model.tokenizer",
    "trainer.default_root_dir": "names where runs go (its own test: test_bad_input unwritable runs folder)",
    "runs_dir": "same",
    "trainer.logger": "set by --loggers",
    "trainer.callbacks": "a list of classes",
    "trainer.plugins": "a list of classes",
    "trainer.profiler": "a class",
    "model.network.init_args.config.model_type": "fuzzed as an unknown model type in test_bad_input",
    "trainer.accelerator": "an unknown accelerator is in test_bad_input; 'auto' vs gpu depends on the machine",
    "ckpt_path": "resume cases have their own tests",
}
"""Field (prefix) -> why it is not fuzzed."""

HUGE_INT = 10**12
HUGE_FLOAT = 1.0e30
UNKNOWN = "no-such-value"
SIZES = ("n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "block_size", "batch_size", "max_bytes", "r")
"""Fields whose huge value would build a huge model or batch: refused by a size check, or a finding."""


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "class_path":
                continue
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def resolved_config(files: list[str]) -> dict[str, Any]:
    """``litune fit --print_config`` of the config files (the full resolved config, defaults included)."""
    argv = ["fit", *(a for f in files for a in ("--config", f)), "--print_config"]
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(argv)
    return yaml.safe_load(out.getvalue())


def variants(config: dict[str, Any], section: str) -> list[tuple[str, Any]]:
    """(field, value) pairs: numbers -> 0, -1, huge, a wrong type; strings -> an unknown value; booleans -> a wrong
    type. Lists, None-defaulted and skipped fields are left out (their types are unknown or compound)."""
    out: list[tuple[str, Any]] = []
    for field, default in _leaves(config).items():
        if not field.startswith(section) or any(field == s or field.startswith(s + ".") for s in SKIPPED):
            continue
        if isinstance(default, bool):
            out.append((field, "maybe"))
        elif isinstance(default, int):
            out += [(field, 0), (field, -1), (field, HUGE_INT), (field, "abc")]
        elif isinstance(default, float):
            out += [(field, 0.0), (field, -1.0), (field, HUGE_FLOAT), (field, "abc")]
        elif isinstance(default, str):
            out.append((field, UNKNOWN))
    return out


class Hang(Exception):
    pass


def run_variant(files: list[str], field: str, value: Any, runs: Path, data: Path, tokenizer: Path, capsys) -> str:
    """Run one variant; return "accepted", or "refused" (exit 2 naming the field); raise AssertionError otherwise."""
    argv = [
        "fit", *(a for f in files for a in ("--config", f)),
        f"--model.tokenizer={tokenizer}", f"--data.init_args.path={data}", f"--runs_dir={runs}",
        "--model.network.init_args.config.vocab_size=512", "--dry_run=true",
        f"--{field}={json.dumps(value) if not isinstance(value, str) else value}",
    ]  # fmt: skip
    before = hashes(runs)

    def hang(*_: Any) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(60)
    try:
        code = main(argv)
    except Hang:
        raise AssertionError(f"{field}={value!r}: hung (> 60 s)") from None
    except SystemExit as exit_:  # jsonargparse's own exits (none expected)
        code = exit_.code
    except Exception as err:  # noqa: BLE001 (a traceback a user would see)
        raise AssertionError(f"{field}={value!r}: traceback {type(err).__name__}: {err}") from err
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    err = capsys.readouterr().err
    assert hashes(runs) == before, f"{field}={value!r}: the runs folder changed"
    assert "Traceback" not in err, f"{field}={value!r}: {err[-2000:]}"
    if code == 0:
        return "accepted"
    assert code == 2, f"{field}={value!r}: exit {code}: {err[-2000:]}"
    lines = [line for line in err.splitlines() if line.startswith(PREFIX)]
    assert len(lines) == 1, f"{field}={value!r}: {err[-2000:]}"
    named = lines[0][len(PREFIX) :].split(":", 1)[0]
    # The field itself, or its section when the owner checks the section as a whole (a HF config dict).
    assert field.startswith(named) or named.startswith(field), f"{field}={value!r} refused naming {named!r}: {lines[0]}"
    assert field.rsplit(".", 1)[-1] in lines[0] or named == field, f"{field}={value!r}: {lines[0]}"
    return "refused"


@pytest.fixture(scope="module")
def fuzz_runs(tmp_path_factory: pytest.TempPathFactory, trained: Path) -> Path:  # noqa: F811
    """A runs folder holding a real trained run, which no variant may touch."""
    runs = tmp_path_factory.mktemp("fuzz") / "runs"
    shutil.copytree(trained, runs / trained.name)
    return runs


@pytest.fixture(scope="module")
def all_variants() -> list[tuple[str, str, Any]]:
    out = []
    for name, (files, section) in CONFIGS.items():
        out += [(name, field, value) for field, value in variants(resolved_config(files), section)]
    return out


def _fuzz(chosen, fuzz_runs, data_file, tokenizer_dir, capsys) -> dict[str, list[str]]:  # noqa: F811
    found: dict[str, list[str]] = {"accepted": [], "refused": [], "failed": []}
    for name, field, value in chosen:
        try:
            outcome = run_variant(CONFIGS[name][0], field, value, fuzz_runs, data_file, tokenizer_dir, capsys)
            found[outcome].append(f"{name}: {field}={value!r}")
        except AssertionError as err:
            outcome = f"FAILED {err}"
            found["failed"].append(f"{name}: {err}")
        print(f"fuzz {name}: {field}={value!r}: {outcome}", file=sys.__stderr__, flush=True)  # progress, uncaptured
    fields = {(n, f) for n, f, _ in chosen}
    print(f"\nfuzzed {len(fields)} fields in {len(chosen)} variants: {len(found['accepted'])} accepted, "
          f"{len(found['refused'])} refused naming the field, {len(found['failed'])} failed")  # fmt: skip
    print("\n".join(found["failed"]))
    return found


def test_fuzz_sample(all_variants, fuzz_runs, data_file, tokenizer_dir, capsys) -> None:  # noqa: F811
    """A seeded sample of the variants (the default suite; the slow test runs them all)."""
    chosen = random.Random(22).sample(all_variants, 8)
    found = _fuzz(chosen, fuzz_runs, data_file, tokenizer_dir, capsys)
    assert not found["failed"], "\n".join(found["failed"])


@pytest.mark.slow
def test_fuzz_every_field(all_variants, fuzz_runs, data_file, tokenizer_dir, capsys) -> None:  # noqa: F811
    found = _fuzz(all_variants, fuzz_runs, data_file, tokenizer_dir, capsys)
    assert not found["failed"], "\n".join(found["failed"])


SWEEP = REPO / "configs" / "sweep" / "quickstart-lr.yaml"


def test_fuzz_sweep_file(tmp_path: Path) -> None:
    """Every field of a sweep file (its own and the defaults it leaves out) through the same values; the sweep file
    is checked in-process by the loader `litune sweep` runs before any trial (accepted ones start no trial here)."""
    from dataclasses import asdict

    from litune.cli import as_config_error
    from litune.tuning.sweep import load_spec

    raw = yaml.safe_load(SWEEP.read_text())
    spec = asdict(load_spec(SWEEP))
    full = {**{k: v for k, v in spec.items() if k != "parameters"}, **raw}
    values = {int: [0, -1, HUGE_INT, "abc"], float: [0.0, -1.0, HUGE_FLOAT, "abc"], str: [UNKNOWN]}
    cases = [(f, v) for f, default in _leaves(full).items() for v in values.get(type(default), [])]
    found = {"accepted": 0, "refused": 0}
    for field, value in cases:
        variant = {**full, field: value}  # the parameters' value lists are left alone (their own tests)
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(variant))
        try:
            load_spec(path)
            found["accepted"] += 1
        except Exception as err:  # noqa: BLE001
            config_error = as_config_error(err)
            assert config_error is not None, f"{field}={value!r}: traceback {type(err).__name__}: {err}"
            assert config_error.field == field, f"{field}={value!r}: {config_error}"
            found["refused"] += 1
    print(f"\nsweep file: fuzzed {len({f for f, _ in cases})} fields in {len(cases)} variants: {found}")
    assert found["refused"] >= 10
