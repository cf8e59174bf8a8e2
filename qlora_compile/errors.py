"""Errors that mean "what you gave us is wrong", as opposed to a bug of ours.

The library raises these where it validates what a user passed: arguments, a config, a folder on
disk. The command line prints them as one line and exits with code 2; any other exception is a
bug (or an environment problem) and keeps its traceback (exit code 1).

Each one also subclasses the builtin a caller would expect (`ValueError`, `FileNotFoundError`,
`NotImplementedError`), so `except ValueError` keeps catching what it caught before.
"""

from __future__ import annotations


class QLoRAError(Exception):
    """Base class: the input is wrong, not the code. The message says what to change."""


class InvalidArgumentError(QLoRAError, ValueError):
    """An argument or option out of range or malformed: a size, a dtype name, a layer count."""


class InvalidConfigError(QLoRAError, ValueError):
    """A `QLoRAConfig` field, an adapter's config or a model's config that cannot be used."""


class InvalidFolderError(QLoRAError, ValueError):
    """A model, adapter or checkpoint folder whose contents are not what they should be."""


class MissingFileError(QLoRAError, FileNotFoundError):
    """A path, or a file a folder must hold (config.json, the weights), that does not exist."""


class UnsupportedError(QLoRAError, NotImplementedError):
    """A valid input this version does not handle (the message says which and why)."""
