"""Peak resident memory of a real ``litune fit`` with litune's glibc malloc settings and with glibc's defaults.

The settings (:mod:`litune.host_memory`) keep freed buffers mapped for the next step; this measures what that costs:
the peak RSS (``wait4``'s ``ru_maxrss``, the kernel's own high-water mark) of the ``litune`` process over a whole run
of ``configs/quickstart.yaml``, alternating the two settings. ``env.json`` of each run confirms which applied.

    OMP_NUM_THREADS=1 python bench/bench_host_allocator.py --steps 40 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"keep_freed": {}, "default": {"LITUNE_HOST_ALLOCATOR": "default"}}


def peak_rss_mib(env_extra: dict[str, str], steps: int) -> tuple[float, str]:
    """Run the quickstart for ``steps`` steps; its peak RSS in MiB and the allocator its env.json names."""
    with tempfile.TemporaryDirectory(prefix="bench-allocator-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(env_extra)
        litune, config = str(Path(sys.executable).parent / "litune"), str(REPO / "configs" / "quickstart.yaml")
        cmd = [litune, "fit", "--config", config,
               f"--runs_dir={tmp}", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0",
               "--trainer.enable_progress_bar=false"]  # fmt: skip
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        if status:
            raise SystemExit(f"litune fit failed: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
        (env_json,) = Path(tmp).glob("*/env.json")
        return usage.ru_maxrss / 1024, json.loads(env_json.read_text())["host_allocator"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    peaks: dict[str, list[float]] = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, env in SETTINGS.items():
            rss, applied = peak_rss_mib(env, args.steps)
            assert applied == name, (name, applied)
            peaks[name].append(rss)
    print("| malloc settings | peak RSS MiB (each round) |\n|---|---|")
    for name, values in peaks.items():
        print(f"| {name} | {' / '.join(f'{v:,.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
