"""The one exception type for bad user input.

Anything a user can get wrong in a config or on the command line raises :class:`ConfigError` with a message that
names the field and the fix. The CLI prints that message as one paragraph (no traceback) and exits with status 2,
before any process is spawned or any file is written.
"""

from __future__ import annotations

import argparse
import collections
import difflib
import re
from collections.abc import Iterable
from typing import NoReturn

NETWORK_FIELD = "model.network"
"""The config field of the network; its arguments are ``model.network.init_args.<name>`` (:data:`NETWORK_ARGS`)."""

NETWORK_ARGS = f"{NETWORK_FIELD}.init_args"
"""Where users set a network's arguments in YAML; error messages name fields under it."""


def check_at_least_one(section: str, sizes: dict[str, int], fix: str) -> None:
    """Refuse the first of ``sizes`` (argument name -> value) below 1, naming ``<section>.<name>``."""
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{section}.{name}", f"{name}={value} must be >= 1", fix)


def check_group_divides(name: str, size: int, world: int) -> None:
    """Refuse a parallel group size (``tensor_parallel_size``, ``sequence_parallel_size``) that does not divide the
    ``world`` processes, naming ``trainer.strategy.init_args.<name>``."""
    if world % size:
        raise ConfigError(
            f"trainer.strategy.init_args.{name}",
            f"{name}={size} does not divide the {world} processes",
            f"use a {name} that divides {world}, or change trainer.devices/num_nodes",
        )


class ConfigError(ValueError):
    """A user-facing configuration or input error.

    Args:
        field: the dotted config field at fault, e.g. ``model.optimizer.init_args.lr``.
        problem: what is wrong, with the offending value.
        fix: what to change.
    """

    recently_raised: collections.deque[ConfigError] = collections.deque(maxlen=32)
    """The last ConfigErrors made in this process, newest last: jsonargparse keeps only the *first* subtype's error as
    the cause when a Union (``str | Strategy``) fails, so one raised in a class's ``__init__`` reaches the CLI only as
    text inside a ValueError; :func:`find_config_error` finds it here by that text."""

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem.rstrip('.')}. Fix: {fix}")
        ConfigError.recently_raised.append(self)


class TrainingStopped(RuntimeError):
    """Training ended on purpose, e.g. on a non-finite loss with ``model.nonfinite=stop``.

    The message is one paragraph for the user (what happened, at which step, how to continue); the CLI prints it
    without a traceback and exits with status 1.
    """


_PARSER_KEY = re.compile(r'Parser key "([^"]+)"')
_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.+)")
_NOT_ACCEPTED = re.compile(r"does not accept option '([\w.]+)'")
_NOISE = (
    "Does not validate against any", "Subtypes:", "Errors:", "Given value type:", "Given value:",
    "Expected a <class 'NoneType'>",
)  # fmt: skip


def quoted_argument(message: str, names: Iterable[str]) -> str | None:
    """The first of ``names`` that a library's error ``message`` quotes as an argument (``name=...``), else None: how
    litune names the field behind an error it did not raise (Lightning's ``strategy='foo'``, transformers'
    ``attn_implementation="x"``)."""
    known = set(names)
    return next((name for name in re.findall(r"(\w+)=", message) if name in known), None)


def from_parse_error(message: str, known_keys: list[str]) -> ConfigError:
    """A :class:`ConfigError` from a jsonargparse parse error: the innermost field, what was expected, a fix.

    Args:
        message: the ``ArgumentError`` text (nested lines for union and class-path errors).
        known_keys: every dotted key the parser accepts, to suggest the closest one for a misspelt key.
    """
    if match := _UNRECOGNIZED.search(message) or _NOT_ACCEPTED.search(message):
        given = match.group(1).split()[0]
        key = given.lstrip("-").split("=", 1)[0]
        close = difflib.get_close_matches(key, known_keys, n=1, cutoff=0.6)
        hint = f"did you mean --{close[0]}? " if close else ""
        return ConfigError(key, f"{given} is not a litune setting", f"{hint}`litune fit --help` lists every field")
    keys = _PARSER_KEY.findall(message)
    # Nested keys are relative to their parent ("model.lr_schedule" then "name"): join them into one dotted path.
    field = _with_init_args(".".join(dict.fromkeys(keys))) if keys else "config"
    if option := re.search(r"Option '([\w.]+)' is not accepted|Key \"([\w.]+)\" is not expected", message):
        name = option.group(1) or option.group(2)
        init_args = ".init_args" if "class_path" in message or field.endswith(("network", "data", "optimizer")) else ""
        return ConfigError(
            f"{field}{init_args}.{name}",
            f"'{name}' is not an argument of {field}",
            f"remove or correct it; `litune fit --help` lists every field ({field}.help CLASS lists a class's)",
        )
    lines = [line.strip(" -") for line in message.splitlines()]
    details = [
        line
        for line in lines
        if line and not line.startswith(_NOISE) and not _PARSER_KEY.match(line) and not line.endswith(":")
    ]
    problem = "; ".join(details[:3]) or message.strip().splitlines()[0]
    if choices := re.findall(r"Literal\[(.+?)\]", problem):
        fix = f"use one of {', '.join(choices)}"
    elif any(s in problem for s in ("class_path", "Import path", "does not exist", "not accessible")):
        fix = "give an importable class path (e.g. torch.optim.AdamW) or a file that exists"
    elif "Key" in problem and "not expected" in problem or "Unexpected" in problem:
        fix = "remove or correct the key; `litune fit --help` lists every field"
    else:
        fix = "give a value of the expected type; `litune fit --help` lists every field and its type"
    return ConfigError(field, problem[:600], fix)


CLASS_SECTIONS = ("data", "model.network", "model.optimizer", "model.tokenizer", "trainer.strategy")
"""Config sections that hold a class (``class_path`` + ``init_args``)."""


def _with_init_args(field: str) -> str:
    """The full field of an argument of a class section: jsonargparse names ``data.batch_size`` for what the config
    (and every fix) calls ``data.init_args.batch_size``."""
    for section in CLASS_SECTIONS:
        rest = field[len(section) + 1 :] if field.startswith(section + ".") else None
        if rest and not rest.startswith(("init_args", "class_path")):
            return f"{section}.init_args.{rest}"
    return field


def translate(err: BaseException) -> ConfigError | None:
    """Families of library errors that always mean bad input or environment, as a :class:`ConfigError`; else None.

    This is litune's outer boundary (the CLI calls it for anything that escaped the specific checks): a missing
    optional package, a path the OS refuses, a setting Lightning rejects. Everything else is a bug and keeps its
    traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    if isinstance(err, ImportError) and err.name and not err.name.startswith("litune"):
        package = err.name.split(".")[0]
        return ConfigError(
            "environment",
            f"the package '{package}' is needed by this configuration but is not installed ({err})",
            f"`pip install {package}`, or remove the setting that needs it (e.g. a logger or strategy)",
        )
    if isinstance(err, OSError) and err.filename is not None:
        return ConfigError(
            str(err.filename),
            f"{err.strerror or type(err).__name__} ({type(err).__name__})",
            "check that the path exists and that you may read (or write) it; runs go under --runs_dir",
        )
    if isinstance(err, MisconfigurationException):
        return ConfigError("trainer", " ".join(str(err).split()), "fix the setting it names (`litune fit --help`)")
    return None


class CommandParser(argparse.ArgumentParser):
    """``argparse`` for litune's own subcommands: a bad option is a :class:`ConfigError` (one paragraph, exit 2), not
    argparse's usage dump."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        match = re.match(r"argument ([^:]+): (.*)", message)
        field, problem = (match.group(1).split("/")[-1], match.group(2)) if match else (self.prog, message)
        if required := re.match(r"the following arguments are required: (.*)", message):
            field = required.group(1)
        raise ConfigError(field, problem, f"`{self.prog} --help` lists the options and their types")


def error_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during (jsonargparse wraps what a class's __init__ raised)."""
    chain: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def find_config_error(err: BaseException) -> ConfigError | None:
    """The ConfigError behind ``err``: in its chain (jsonargparse wraps what a class's ``__init__`` raised in a
    ValueError), or quoted in the text of an error in it (a Union's subtypes' errors are kept only as text)."""
    chain = error_chain(err)
    if in_chain := next((link for link in chain if isinstance(link, ConfigError)), None):
        return in_chain
    texts = [str(link) for link in chain]
    quoted = (raised for raised in reversed(ConfigError.recently_raised) if any(str(raised) in text for text in texts))
    return next(quoted, None)


def as_config_error(err: BaseException) -> ConfigError | None:
    """The :class:`ConfigError` that ``err`` means (exit 2, one paragraph), or None for anything else (a bug)."""
    return find_config_error(err) or next(filter(None, map(translate, error_chain(err))), None)
