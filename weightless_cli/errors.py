"""Errors a user can cause, each mapped to a documented exit code.

The CLI catches :class:`WeightlessError` and prints its message as one line; anything
else is a bug and gets a traceback only with ``--debug``.
"""

EXIT_OK = 0
EXIT_CHECK_FAILED = 1  # a verification or accuracy gate did not pass
EXIT_USAGE = 2  # bad options (click uses 2 for its own usage errors too)
EXIT_BAD_INPUT = 3  # unreadable, corrupt or unsuitable input, or an I/O failure


class WeightlessError(Exception):
    """An expected failure with a one-line message for the user."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class BadInputError(WeightlessError):
    """The input file is missing, corrupt, or not something this stage can handle."""

    exit_code = EXIT_BAD_INPUT


class UsageError(WeightlessError):
    """Options that cannot work together or match nothing."""

    exit_code = EXIT_USAGE


class CheckFailedError(WeightlessError):
    """A verification or gate ran and the result did not pass."""

    exit_code = EXIT_CHECK_FAILED


class MissingExtraError(WeightlessError):
    """An optional dependency (e.g. torch for retraining) is not installed."""

    exit_code = EXIT_USAGE
