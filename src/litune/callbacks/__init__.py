"""Callbacks that observe training: throughput and MFU, memory, model-state bytes, grad norm, run info, progress."""

from litune.callbacks.grad_norm import GradNormMonitor
from litune.callbacks.memory import MemoryMonitor
from litune.callbacks.progress import LituneProgressBar
from litune.callbacks.run_info import EnvironmentLogger
from litune.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EnvironmentLogger",
    "GradNormMonitor",
    "LituneProgressBar",
    "MemoryMonitor",
    "ThroughputMonitor",
]
