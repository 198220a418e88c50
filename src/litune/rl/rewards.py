"""Reward functions for online RL: user callables named by import path, weighted, checked at every call.

A reward function is any Python callable ``f(prompts, completions, **columns) -> sequence of floats``: ``prompts`` and
``completions`` are lists of ``N`` strings (each prompt repeated once per completion of its group), ``columns`` the
data set's other columns, each a list of ``N`` values aligned with the completions (e.g. ``answer``). A config names
it by import path, ``module:function`` (``model.rl.rewards`` in a GRPO config), with a weight and optional keyword
arguments. The total reward of a completion is the weighted sum of every function's reward (TRL's convention).

Two rules are built in: :func:`exact_match` (the completion's answer equals the ``answer`` column) and
:func:`matches_format` (a regular expression matches the whole completion); :func:`parses_as_python` rewards
completions that are valid Python source, and :func:`char_fraction` (a dense reward for the CPU quickstart) the share
of a completion's characters drawn from a given set.
"""

from __future__ import annotations

import ast
import functools
import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from litune.errors import ConfigError

FIELD = "model.rl.rewards"
RewardFn = Callable[..., Sequence[float]]


@dataclass(frozen=True)
class RewardSpec:
    """One reward function of a config.

    Args:
        function: import path ``package.module:function`` of the callable.
        weight: its weight in the total reward.
        kwargs: keyword arguments bound to it (e.g. ``{"pattern": "..."}`` for :func:`matches_format`).
    """

    function: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reward:
    """A resolved reward function: its config name (for errors and metric names), callable and weight."""

    name: str
    fn: RewardFn
    weight: float


def resolve(specs: Sequence[RewardSpec]) -> list[Reward]:
    """Import every reward function, bind its keyword arguments; a bad path is a :class:`ConfigError` naming it.

    Args:
        specs: ``model.rl.rewards`` of the config (at least one).
    """
    if not specs:
        raise ConfigError(FIELD, "no reward function is given", "add e.g. {function: litune.rl.rewards:exact_match}")
    rewards = []
    for index, spec in enumerate(specs):
        where = f"{FIELD}[{index}].function"
        module_name, _, attribute = spec.function.partition(":")
        if not module_name or not attribute:
            raise ConfigError(where, f"{spec.function!r} is not an import path", "write it as package.module:function")
        try:
            fn = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ConfigError(
                where, f"cannot import {spec.function!r} ({error})", "check the module and name"
            ) from None
        if not callable(fn):
            raise ConfigError(where, f"{spec.function!r} is not callable", "name a function")
        if not math.isfinite(spec.weight):
            raise ConfigError(f"{FIELD}[{index}].weight", f"weight={spec.weight} is not finite", "use e.g. 1.0")
        rewards.append(Reward(spec.function, functools.partial(fn, **spec.kwargs) if spec.kwargs else fn, spec.weight))
    return rewards


def score(
    rewards: Sequence[Reward], prompts: list[str], completions: list[str], columns: dict[str, list[Any]]
) -> torch.Tensor:
    """Every function's rewards for ``N`` completions, checked: ``[N, len(rewards)]`` float64.

    A function that raises, returns another number of values, or a value that is not a finite number stops training
    with a :class:`ConfigError` naming the function (a reward that silently became NaN would poison every advantage
    of its group).
    """
    columns_out = []
    for index, reward in enumerate(rewards):
        where = f"{FIELD}[{index}].function"
        try:
            values = reward.fn(prompts, completions, **columns)
        except Exception as error:  # noqa: BLE001 - any failure of user code is reported with its function's name
            raise ConfigError(
                where, f"reward function {reward.name} raised {type(error).__name__}: {error}", "fix the function"
            ) from error
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError) as error:
            raise ConfigError(
                where, f"reward function {reward.name} returned non-numbers ({error})", "return one float a completion"
            ) from None
        if len(values) != len(completions):
            raise ConfigError(
                where,
                f"reward function {reward.name} returned {len(values)} values for {len(completions)} completions",
                "return one float per completion, in order",
            )
        if bad := [i for i, v in enumerate(values) if not math.isfinite(v)]:
            raise ConfigError(
                where,
                f"reward function {reward.name} returned a non-finite value for completion {bad[0]}: {values[bad[0]]}",
                "return finite floats (e.g. 0.0 where no reward applies)",
            )
        columns_out.append(values)
    return torch.tensor(columns_out, dtype=torch.float64).T.reshape(len(completions), len(rewards))


def total(per_function: torch.Tensor, rewards: Sequence[Reward]) -> torch.Tensor:
    """``[N]`` weighted sum of ``[N, F]`` per-function rewards."""
    weights = torch.tensor([r.weight for r in rewards], dtype=per_function.dtype)
    return per_function @ weights


def _final_answer(text: str) -> str:
    """The answer a completion gives: what follows the last ``####`` or ``answer:`` marker, else its last line."""
    match = re.search(r"(?:####|answer:)\s*([^\n]*)\s*$", text, flags=re.IGNORECASE)
    if match:
        return match.group(1).strip()
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def exact_match(prompts: list[str], completions: list[str], answer: list[Any], **_: Any) -> list[float]:
    """1.0 where the completion's final answer (see :func:`_final_answer`) equals the ``answer`` column, else 0.0."""
    return [float(_final_answer(c) == str(a).strip()) for c, a in zip(completions, answer, strict=True)]


def matches_format(prompts: list[str], completions: list[str], pattern: str, **_: Any) -> list[float]:
    """1.0 where the regular expression ``pattern`` matches the whole completion (``re.DOTALL``), else 0.0."""
    compiled = re.compile(pattern, flags=re.DOTALL)
    return [float(compiled.fullmatch(c) is not None) for c in completions]


def parses_as_python(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
    """1.0 where prompt plus completion is valid Python source (``ast.parse``), else 0.0."""
    out = []
    for prompt, completion in zip(prompts, completions, strict=True):
        try:
            ast.parse(prompt + completion)
            out.append(1.0)
        except (SyntaxError, ValueError):
            out.append(0.0)
    return out


def char_fraction(prompts: list[str], completions: list[str], chars: str = "0123456789", **_: Any) -> list[float]:
    """The share of each completion's non-blank characters that are in ``chars`` (0.0 for a blank completion).

    A dense reward (every completion gets partial credit), so a tiny model learns it from scratch in minutes: the
    offline quickstart (``configs/grpo.yaml``) teaches one to continue code with digits only.
    """
    wanted = set(str(chars))  # a YAML value of digits only may arrive as an int
    out = []
    for completion in completions:
        text = [c for c in completion if not c.isspace()]
        out.append(sum(c in wanted for c in text) / len(text) if text else 0.0)
    return out
