"""Errors that the CLI reports as one line and a non-zero exit, without a traceback."""


class NestlmError(Exception):
    """An expected error caused by the user's input; its message says what to do."""


class CheckpointError(NestlmError):
    """A checkpoint directory or file is missing, malformed or inconsistent."""
