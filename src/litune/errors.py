"""The one exception type for bad user input.

Anything a user can get wrong in a config or on the command line raises :class:`ConfigError` with a message that
names the field and the fix. The CLI prints that message as one paragraph (no traceback) and exits with status 2,
before any process is spawned or any file is written.
"""


class ConfigError(ValueError):
    """A user-facing configuration or input error.

    Args:
        field: the dotted config field at fault, e.g. ``model.optimizer.init_args.lr``.
        problem: what is wrong, with the offending value.
        fix: what to change.
    """

    def __init__(self, field: str, problem: str, fix: str) -> None:
        self.field = field
        self.problem = problem
        self.fix = fix
        super().__init__(f"{field}: {problem}. Fix: {fix}")


class TrainingStopped(RuntimeError):
    """Training ended on purpose, e.g. on a non-finite loss with ``model.nonfinite=stop``.

    The message is one paragraph for the user (what happened, at which step, how to continue); the CLI prints it
    without a traceback and exits with status 1.
    """
