"""Reward functions: resolved by import path, weighted, and refused by name when they misbehave."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from litune.errors import ConfigError
from litune.rl.rewards import RewardSpec, exact_match, matches_format, parses_as_python, resolve, score, total


@pytest.fixture
def user_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module of reward functions, importable as ``user_rewards`` (some of them broken on purpose)."""
    (tmp_path / "user_rewards.py").write_text(
        textwrap.dedent(
            """
            def length(prompts, completions, **columns):
                return [len(c) for c in completions]

            def raises(prompts, completions, **columns):
                raise KeyError("answer")

            def short(prompts, completions, **columns):
                return [1.0]

            def nan(prompts, completions, **columns):
                return [float("nan")] * len(completions)

            def words(prompts, completions, **columns):
                return ["many"] * len(completions)

            def uses_column(prompts, completions, level, **columns):
                return [float(x) for x in level]

            NOT_A_FUNCTION = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_rewards"
    sys.modules.pop("user_rewards", None)


def test_weighted_total_of_several_functions_with_columns_and_kwargs(user_rewards: str) -> None:
    rewards = resolve(
        [
            RewardSpec(f"{user_rewards}:length", weight=0.5),
            RewardSpec(f"{user_rewards}:uses_column", weight=-2.0),
            RewardSpec("litune.rl.rewards:matches_format", weight=1.0, kwargs={"pattern": r"x+"}),
        ]
    )
    per_function = score(rewards, ["p", "p"], ["xxx", "ab"], {"level": [1, 3]})
    assert per_function.tolist() == [[3.0, 1.0, 1.0], [2.0, 3.0, 0.0]]
    torch.testing.assert_close(total(per_function, rewards), torch.tensor([0.5, -5.0], dtype=torch.float64))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("raises", "user_rewards:raises raised KeyError"),
        ("short", "returned 1 values for 2 completions"),
        ("nan", "non-finite value for completion 0"),
        ("words", "returned non-numbers"),
    ],
)
def test_a_misbehaving_reward_function_is_named(user_rewards: str, name: str, message: str) -> None:
    rewards = resolve([RewardSpec("litune.rl.rewards:parses_as_python"), RewardSpec(f"{user_rewards}:{name}")])
    with pytest.raises(ConfigError) as error:
        score(rewards, ["x = ", "y = "], ["1", "2"], {})
    assert error.value.field == "model.rl.rewards[1].function"
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("user_rewards.length", "is not an import path"),
        ("no_such_module_xyz:f", "cannot import"),
        ("user_rewards:missing", "cannot import"),
        ("user_rewards:NOT_A_FUNCTION", "is not callable"),
    ],
)
def test_bad_import_paths_are_refused_before_training(user_rewards: str, path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        resolve([RewardSpec("litune.rl.rewards:exact_match"), RewardSpec(path)])
    assert error.value.field == "model.rl.rewards[1].function" and problem in str(error.value)


def test_no_rewards_and_infinite_weights_are_refused() -> None:
    with pytest.raises(ConfigError, match="no reward function"):
        resolve([])
    with pytest.raises(ConfigError) as error:
        resolve([RewardSpec("litune.rl.rewards:exact_match", weight=math.inf)])
    assert error.value.field == "model.rl.rewards[0].weight"


def test_built_in_rules() -> None:
    completions = ["so it is 4\n#### 4", "Answer: 7", "five\n", ""]
    assert exact_match([""] * 4, completions, answer=[4, "7", "five", "x"]) == [1.0, 1.0, 1.0, 0.0]
    assert matches_format([""] * 2, ["<think>a</think> 3", "3"], pattern=r"<think>.*</think>.*") == [1.0, 0.0]
    assert parses_as_python(["def f(x):\n", "x = ("], ["    return x\n", "1"]) == [1.0, 0.0]
