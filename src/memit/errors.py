"""The project's error types: what a user can fix, shown by the CLI as one line (anything
else is a bug and keeps its traceback)."""
from __future__ import annotations


class MemitError(Exception):
    """Bad input or state that the user can fix; the message names the field or file."""


class InputError(MemitError, ValueError):
    """A value the user gave (request, hyperparameter, data record, option) is not valid."""


class MissingFileError(MemitError, FileNotFoundError):
    """A file or folder the user named, or one memit needs, does not exist."""
