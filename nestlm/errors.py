"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""


class NestlmError(Exception):
    """An expected error caused by the user's input; its message says what to do."""


class CheckpointError(NestlmError):
    """A checkpoint directory or file is missing, malformed or inconsistent."""


class UnknownBudgetError(NestlmError, KeyError):
    """A budget name that the model does not have; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class OutputError(NestlmError):
    """An output could not be written (disk full, read-only filesystem, permission denied); names path and cause."""


class DecodingError(NestlmError, ValueError):
    """Arguments of a schedule or of speculative decoding that cannot run; the message says why."""
