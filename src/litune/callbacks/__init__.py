"""Callbacks that observe training (throughput and MFU, memory, model-state bytes, grad norm, run info, progress)
and those that make runs survive kills (exact resume, preemption)."""

from litune.callbacks.grad_norm import GradNormMonitor
from litune.callbacks.memory import MemoryMonitor
from litune.callbacks.preemption import Preemption
from litune.callbacks.progress import LituneProgressBar
from litune.callbacks.resume import ExactResume
from litune.callbacks.run_info import EnvironmentLogger
from litune.callbacks.throughput import ThroughputMonitor

__all__ = [
    "EnvironmentLogger",
    "ExactResume",
    "GradNormMonitor",
    "LituneProgressBar",
    "MemoryMonitor",
    "Preemption",
    "ThroughputMonitor",
]
