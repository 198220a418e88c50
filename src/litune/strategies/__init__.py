"""Where a run executes: strategy construction (DDP, DeepSpeed ZeRO on GPU and CPU), machine checks, batch sizes.

Config fragments under ``configs/strategy/`` and ``configs/precision/`` select these; ``launch/`` sets the topology.
"""

from litune.strategies.batch import accumulation_steps, apply_global_batch_size
from litune.strategies.checks import check_run, check_trainer_config
from litune.strategies.ddp import DDPStrategy
from litune.strategies.deepspeed import DeepSpeedStrategy

__all__ = [
    "DDPStrategy",
    "DeepSpeedStrategy",
    "accumulation_steps",
    "apply_global_batch_size",
    "check_run",
    "check_trainer_config",
]
