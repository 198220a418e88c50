"""Valid ranges of the numeric settings that their owners check late, or not at all, checked on the parsed config.

litune's own classes check their arguments when they are built (``ConfigError`` from ``__init__``/``__post_init__``).
The settings below belong to classes litune does not own: Lightning's ``Trainer`` checks ``limit_val_batches`` only
once ``fit`` has set up the data (after its setup hooks wrote into the run folder), never checks
``gradient_clip_val`` (a negative max-norm flips the gradients' sign) and divides by ``accumulate_grad_batches``
without a check (a ``ZeroDivisionError`` at the first step). :func:`check_limits` checks them all on the parsed
config, before anything is built, spawned or written, and names the full field and a valid value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from litune.errors import ConfigError


@dataclass(frozen=True)
class Limit:
    """The valid values of one numeric setting.

    Args:
        low: the smallest valid value (``None``: no lower bound).
        high: the largest valid value (``None``: no upper bound).
        low_open: ``low`` itself is not valid (``> low`` instead of ``>= low``).
        integer: only whole numbers are valid.
        fraction: a float in ``[0, 1]`` is valid too (Lightning's "fraction of the epoch" settings).
        special: further valid values outside the range (``-1`` for "no limit").
        zero_fraction: with ``fraction``, ``0.0`` is valid too.
        booleans: ``true``/``false`` are valid too (``seed_everything``).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    integer: bool = True
    fraction: bool = False
    special: tuple[int, ...] = ()
    zero_fraction: bool = True
    booleans: bool = False

    def allows(self, value: Any) -> bool:
        if value is None or isinstance(value, str):  # None: the default; str: a unit Lightning parses ("00:01:00")
            return True
        if isinstance(value, bool):
            return self.booleans
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if value in self.special:
            return True
        if self.fraction and isinstance(value, float):
            return (0.0 <= value if self.zero_fraction else 0.0 < value) and value <= 1.0
        if self.integer and value != int(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high

    def describe(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            bounds = f"in [{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            bounds = f"<= {self.high:g}" if self.high is not None else ""
        text = f"{kind} {bounds}".strip()
        if self.special:
            text += f", or {' / '.join(map(str, self.special))}"
        if self.fraction:
            text += f", or a fraction of the epoch in {'[' if self.zero_fraction else '('}0.0, 1.0]"
        return text


_COUNT = Limit(low=1)
_NONNEG = Limit(low=0)
_BATCHES = Limit(low=0, fraction=True)

LIMITS: dict[str, tuple[Limit, str]] = {
    "trainer.num_nodes": (_COUNT, "the number of machines, e.g. 1"),
    "trainer.max_epochs": (Limit(low=1, special=(-1,)), "a number of epochs, -1 for no limit, or null"),
    "trainer.min_epochs": (_NONNEG, "0 or more, or null"),
    "trainer.max_steps": (Limit(low=1, special=(-1,)), "a number of optimizer steps such as 1000, or -1 for no limit"),
    "trainer.min_steps": (_NONNEG, "0 or more, or null"),
    "trainer.limit_train_batches": (_BATCHES, "a number of batches (10), a fraction of the epoch (0.25), or null"),
    "trainer.limit_val_batches": (_BATCHES, "a number of batches (10), a fraction (0.25), 0 for no validation"),
    "trainer.limit_test_batches": (_BATCHES, "a number of batches (10), a fraction (0.25), or null"),
    "trainer.limit_predict_batches": (_BATCHES, "a number of batches (10), a fraction (0.25), or null"),
    "trainer.overfit_batches": (_BATCHES, "0 (off), a number of batches, or a fraction of the epoch"),
    "trainer.val_check_interval": (
        Limit(low=1, fraction=True, zero_fraction=False),
        "a number of training batches (e.g. 100), a fraction of the epoch in (0, 1] (e.g. 0.5), or null",
    ),
    "trainer.check_val_every_n_epoch": (_COUNT, "1 or more, or null to count val_check_interval across epochs"),
    "trainer.num_sanity_val_steps": (Limit(low=-1), "0 (none), a number of batches, or -1 for all"),
    "trainer.log_every_n_steps": (_COUNT, "a number of optimizer steps such as 10"),
    "trainer.accumulate_grad_batches": (
        _COUNT,
        "1 (no accumulation) or more micro-batches per optimizer step; or set --global_batch_size instead",
    ),
    "trainer.gradient_clip_val": (
        Limit(low=0, integer=False),
        "a max-norm such as 1.0, or 0 / null for no clipping (a negative norm would flip the gradients' sign)",
    ),
    "trainer.reload_dataloaders_every_n_epochs": (_NONNEG, "0 (never) or a number of epochs"),
    "seed_everything": (
        Limit(low=0, high=2**32 - 1, booleans=True),
        "a seed in [0, 4294967295] (numpy's range), true or false",
    ),
    "global_batch_size": (_COUNT, "a number of sequences per optimizer step such as 64, or null"),
    "dist_timeout": (Limit(low=0, low_open=True, integer=False), "a number of seconds such as 600, or null"),
    "checkpoint.every_n_train_steps": (_NONNEG, "a number of optimizer steps such as 1000, or 0 / null for none"),
    "checkpoint.every_n_epochs": (_NONNEG, "a number of epochs, or 0 / null for none"),
    "checkpoint.save_top_k": (Limit(low=-1), "-1 (all), 0 (none) or a number of checkpoints"),
    "best_checkpoint.every_n_train_steps": (_NONNEG, "a number of optimizer steps, or 0 / null for none"),
    "best_checkpoint.every_n_epochs": (_NONNEG, "a number of epochs, or 0 / null for none"),
    "best_checkpoint.save_top_k": (Limit(low=-1), "-1 (all), 0 (none) or a number of checkpoints such as 1"),
}
"""Dotted field -> its valid values and a fix (what a valid value means)."""

_DEVICES = Limit(low=1, special=(-1,))

CHOICES: dict[str, tuple[str, ...]] = {"checkpoint.mode": ("min", "max"), "best_checkpoint.mode": ("min", "max")}
"""String settings of classes litune does not own whose choices their owner checks with no field name."""


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for key in dotted.split("."):
        if hasattr(node, "as_dict") or isinstance(node, Mapping):
            if key not in node:
                return False, None
            node = node[key]
        else:
            return False, None
    return True, node


def check_limits(config: Any) -> None:
    """Raise :class:`ConfigError` for the first setting of :data:`LIMITS` outside its valid values.

    Args:
        config: the parsed config of ``litune fit/validate/test`` (a jsonargparse Namespace or a dict); sections it
            lacks are skipped.
    """
    for field, (limit, fix) in LIMITS.items():
        found, value = _lookup(config, field)
        if found and not limit.allows(value):
            raise ConfigError(field, f"{value!r} is not {limit.describe()}", f"use {fix}")
    for field, choices in CHOICES.items():
        found, value = _lookup(config, field)
        if found and value is not None and value not in choices:
            raise ConfigError(field, f"{value!r} is not one of {', '.join(choices)}", f"use {' or '.join(choices)}")
    found, devices = _lookup(config, "trainer.devices")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():  # "2" from the command line
        devices = int(devices)
    if found and isinstance(devices, int) and not _DEVICES.allows(devices):
        raise ConfigError(
            "trainer.devices", f"{devices!r} is not a number of devices", "use 1 or more, -1 for all, or auto"
        )
