"""Every failure a user can cause or meet is a FocalSearchError with a one-line message."""

from __future__ import annotations


class FocalSearchError(Exception):
    """Base of all user-facing failures. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class UserError(FocalSearchError):
    """The user asked for something that cannot be done as asked (exit code 2)."""

    exit_code = 2


class ModelLoadError(UserError):
    """A model name or path could not be resolved or loaded."""


class UnknownConditionError(UserError):
    """A query named an instruction that the index has no condition for."""


class ModelMismatchError(UserError):
    """The model asked for differs from the model an index was built with."""


class UnknownImageError(UserError):
    """A query named an image_id that the index does not hold."""


class InvalidImageError(UserError):
    """A query image could not be read as an image."""


class IndexNotFoundError(UserError):
    """The index folder does not exist or holds no conditions."""


class IndexBusyError(UserError):
    """Another process is writing to the same index."""


class StorageError(FocalSearchError):
    """Writing to the index failed; committed rows are kept."""


class DiskFullError(StorageError):
    """The index's device is full (exit code 2: the user frees space and reruns)."""

    exit_code = 2


class ReadOnlyIndexError(StorageError):
    """The index folder cannot be written to (permissions or a read-only mount)."""

    exit_code = 2


class DamagedIndexError(UserError):
    """A condition's table (or the catalog) cannot be read; `focalsearch check --repair` mends it.

    ``reason`` is what is wrong, without the advice around it.
    """

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class EmptyConditionError(UserError):
    """A query named a condition that has no rows yet."""
