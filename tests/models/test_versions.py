"""Dependency floors: pyproject's floors are the versions tested, and litune refuses older ones before computing."""

from __future__ import annotations

from importlib import metadata

import pytest

from litune.errors import ConfigError
from litune.versions import check_versions, version_problems

REQUIREMENTS = ["transformers>=5.24", "torch>=2.13,<3", 'accelerate>=1.15; extra == "dev"', "optuna>=5.0"]


def fake_versions(**versions: str):
    def installed(name: str) -> str:
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    return installed


def test_this_environment_meets_every_floor() -> None:
    assert metadata.requires("litune"), "litune is installed (pip install -e .), so its floors are readable"
    assert version_problems() == []


def test_an_older_version_is_named_with_the_floor() -> None:
    installed = fake_versions(transformers="4.45.0", torch="2.13.0+cpu", accelerate="0.1")
    # accelerate is a dev extra and optuna is missing (its own import fails loudly): neither is a problem here.
    assert version_problems(REQUIREMENTS, installed) == ["transformers 4.45.0 (litune needs >=5.24)"]
    assert version_problems(REQUIREMENTS, fake_versions(transformers="5.24.0", torch="2.13.0+cpu")) == []
    assert version_problems(REQUIREMENTS, fake_versions(transformers="5.30", torch="3.0.0")) == [
        "torch 3.0.0 (litune needs <3,>=2.13)"
    ]


def test_check_versions_stops_with_the_pip_command(monkeypatch) -> None:
    monkeypatch.setattr(metadata, "version", fake_versions(transformers="4.45.0", torch="2.13.0"))
    match = r"transformers 4.45.0 \(litune needs >=5.24\).*pip install -U 'transformers'"
    with pytest.raises(ConfigError, match=match):
        check_versions()
