"""Errors in user input: the command line prints one line and exits with status 2."""


class UserError(Exception):
    """Base of the errors the command line reports without a traceback."""


class DataError(UserError, ValueError):
    """A data file is missing, empty or malformed."""


class ConfigError(UserError, ValueError):
    """An invalid training configuration."""


class CheckpointError(UserError, RuntimeError):
    """A missing, truncated or corrupted checkpoint."""


class MissingDependency(UserError, ImportError):
    """An optional package a feature needs is not installed."""


def report_user_error(command: str, exc: UserError) -> int:
    """Print ``<command>: error: <message>`` on stderr; the exit status 2."""
    import sys

    print(f"{command}: error: {exc}", file=sys.stderr)
    return 2


def notice(message: str) -> None:
    """One line on stderr about something the application did that the user should know."""
    import sys

    print(f"savae-fast: {message}", file=sys.stderr, flush=True)
