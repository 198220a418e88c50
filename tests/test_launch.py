"""launch/: a real 2-node launch on loopback through ``launch/torchrun_multinode.sh``, and the other scripts' logic.

The loopback test starts two torchrun agents on this machine (``--nnodes 2 --nproc_per_node 1``, c10d rendezvous on
127.0.0.1, a free port), each running ``litune fit`` with DDP over gloo, and checks the result against the shared
1-process reference run. Multi-host ssh does not exist here. launch/slurm.sbatch runs on a real local SLURM cluster in
tests/test_slurm.py; the SLURM test here puts stand-ins for ``scontrol`` and ``srun`` on PATH (they only print what
they are given) to check what the script derives for a GPU cluster's node list, which the local cluster cannot show.
"""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from litune_testing import FIRST, REPO, assert_matches, check_ok, fit_args, litune_env, reference_run, the_run

LAUNCH = REPO / "launch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_scripts_parse_and_are_executable(script) -> None:
    path = LAUNCH / script
    assert os.access(path, os.X_OK)
    check_ok(subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True), f"bash -n {script}")


def test_readme_documents_every_script() -> None:
    readme = (LAUNCH / "README.md").read_text()
    for script in ("torchrun.sh", "torchrun_multinode.sh", "slurm.sbatch", "deepspeed.sh", "hostfile"):
        assert script in readme


def test_slurm_script_takes_master_addr_from_the_node_list(tmp_path) -> None:
    """Stand-ins for SLURM's `scontrol` and `srun` (a GPU cluster's node list): they echo what they receive."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
    (bin_dir / "srun").write_text('#!/bin/sh\necho "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"\necho "$@"\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]")
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8", SLURM_CPUS_PER_TASK="6")
    proc = subprocess.run(
        ["bash", str(LAUNCH / "slurm.sbatch"), "--config", "configs/x.yaml"], env=env, capture_output=True, text=True
    )
    check_ok(proc, "slurm.sbatch")
    assert "MASTER_ADDR=gpu-a17 MASTER_PORT=24242" in proc.stdout
    fit = "python -m litune.cli fit --ckpt_path=last --config configs/x.yaml --trainer.num_nodes=2 --trainer.devices=8"
    assert fit in proc.stdout
    header = (LAUNCH / "slurm.sbatch").read_text()
    assert "#SBATCH --signal=SIGUSR1@" in header and "#SBATCH --requeue" in header


def test_deepspeed_rank_maps_the_node_rank(tmp_path) -> None:
    """launch/deepspeed_rank.sh turns DeepSpeed's CROSS_RANK into Lightning's NODE_RANK before running litune."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "NODE_RANK=$NODE_RANK $*"\n')  # stands in for the interpreter
    (bin_dir / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CROSS_RANK="3")
    proc = subprocess.run([str(LAUNCH / "deepspeed_rank.sh"), "fit", "--x=1"], env=env, capture_output=True, text=True)
    check_ok(proc, "deepspeed_rank.sh")
    assert proc.stdout.strip() == "NODE_RANK=3 -m litune.cli fit --x=1"


@pytest.mark.distributed
def test_two_node_loopback_launch_matches_one_process(tmp_path_factory, tmp_path, corpus_dir, tokenizer_dir) -> None:
    reference = reference_run(tmp_path_factory.getbasetemp(), corpus_dir, tokenizer_dir)
    port = free_port()
    env = litune_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NNODES="2", NPROC_PER_NODE="1", RUN_ID=f"loop{port}")
    args = fit_args(tmp_path, corpus_dir, tokenizer_dir, "--config", str(REPO / "configs/strategy/ddp.yaml"))
    agents = [
        subprocess.Popen(
            [str(LAUNCH / "torchrun_multinode.sh"), *args],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=300)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
    for agent, out in zip(agents, outputs, strict=True):
        assert agent.returncode == 0, out[-5000:]
    run = the_run(tmp_path)
    assert run.name == f"tiny-jobloop{port}"  # both agents' ranks wrote into one run folder named by the RUN_ID
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert_matches(tmp_path, reference, FIRST)  # world size 2 across the two "nodes", same model as 1 process


@pytest.mark.distributed
@pytest.mark.slow
def test_deepspeed_launcher_on_this_host_matches_one_process(tmp_path_factory, tmp_path, corpus_dir, tokenizer_dir):
    """launch/deepspeed.sh with NNODES=1 and no hostfile: the real `deepspeed` launcher starts 2 CPU ranks (ZeRO-2)."""
    reference = reference_run(tmp_path_factory.getbasetemp(), corpus_dir, tokenizer_dir)
    env = litune_env()
    env.update(HOSTFILE=str(tmp_path / "no-hostfile"), NNODES="1", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()))
    fragment = str(REPO / "configs/strategy/deepspeed_zero2.yaml")
    args = fit_args(tmp_path, corpus_dir, tokenizer_dir, "--config", fragment)
    proc = subprocess.run(
        [str(LAUNCH / "deepspeed.sh"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    check_ok(proc, "launch/deepspeed.sh")
    assert the_run(tmp_path).name.startswith("tiny-jobds-")  # one folder for both ranks, named by LITUNE_RUN_ID
    assert_matches(tmp_path, reference, FIRST)
