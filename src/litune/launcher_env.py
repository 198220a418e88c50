"""What a launcher (torchrun, SLURM's srun, the DeepSpeed launcher) tells the processes it starts: environment variable
names only. Imports nothing of litune, so that :mod:`litune.runs` (the job and its ranks) and
:mod:`litune.strategies.checks` (which sits below it: is a multi-node run launched?) read the same one list.
"""

RANK_ENVS = ("RANK", "SLURM_PROCID", "LOCAL_RANK")
"""Where a launched process's rank is read from, first found wins."""

TORCHRUN_RUN_ID_ENV = "TORCHELASTIC_RUN_ID"
"""torchrun's rendezvous id (``"none"`` by default)."""

LAUNCHED_ENVS = (*RANK_ENVS, TORCHRUN_RUN_ID_ENV)
"""Any of these set: a launcher started this process."""
