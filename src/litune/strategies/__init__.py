"""Where a run executes: strategy construction (DDP, DeepSpeed ZeRO on GPU and CPU, FSDP2), machine checks, batch sizes.

Config fragments under ``configs/strategy/`` and ``configs/precision/`` select these; ``launch/`` sets the topology.
"""

from litune.strategies.batch import accumulation_steps, apply_global_batch_size
from litune.strategies.checks import check_run, check_trainer_config
from litune.strategies.ddp import DDPStrategy
from litune.strategies.deepspeed import DeepSpeedStrategy
from litune.strategies.fsdp2 import FSDP2Strategy

__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "FSDP2Strategy",
    "accumulation_steps",
    "apply_global_batch_size",
    "check_run",
    "check_trainer_config",
]
