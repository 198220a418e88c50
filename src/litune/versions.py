"""Refuse to run on dependency versions older than those litune is tested with.

The floors are the ``dependencies`` of ``pyproject.toml`` (read back from the installed package's metadata, so they are
written once). pip enforces them at install time, but an environment can drift afterwards (``pip install
transformers==4.45`` for another project, an install with ``--no-deps``): then litune could silently compute something
else (another attention mask for packed rows, another default dtype), so it stops with the fix instead.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from packaging.requirements import Requirement
from packaging.version import Version

from litune.errors import ConfigError


def version_problems(requirements: list[str] | None = None, installed: Callable[[str], str] | None = None) -> list[str]:
    """``"transformers 4.45.0 (litune needs >=5.24)"`` for each installed dependency outside litune's range.

    Checked with ``importlib.metadata`` (no package is imported), about 30 ms.

    Args:
        requirements: requirement strings; default: litune's installed ``Requires-Dist`` (extras left out).
        installed: name -> installed version string; default: ``importlib.metadata.version``.
    """
    installed = installed or metadata.version
    if requirements is None:
        try:
            requirements = metadata.requires("litune") or []
        except metadata.PackageNotFoundError:  # running from a source tree that was never installed
            return []
    problems = []
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue  # an optional extra ("dev") or another platform's dependency
        try:
            version = installed(requirement.name)
        except metadata.PackageNotFoundError:
            continue  # a missing package fails loudly where it is imported; only a wrong version computes silently
        if not requirement.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{requirement.name} {version} (litune needs {requirement.specifier})")
    return problems


def check_versions() -> None:
    """Raise a :class:`ConfigError` naming every dependency outside litune's tested range, with the pip command."""
    problems = version_problems()
    if problems:
        names = " ".join(f"'{p.split()[0]}'" for p in problems)
        raise ConfigError(
            "environment",
            f"installed versions older than litune is tested with: {'; '.join(problems)}",
            f"pip install -U {names} (or reinstall litune: pip install -e .)",
        )
