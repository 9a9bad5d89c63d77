"""One error hierarchy for the whole library.

Every error a user can cause (a missing root, a corrupt bolt file, bad JSON, a lock held too
long) is a ``CrifsError``. Its ``str()`` is the one line the CLI prints, naming the file and the
problem; ``exit_code`` is what the CLI exits with. Anything that is not a ``CrifsError`` is a
bug in crifs and is reported as such.
"""

from __future__ import annotations

import os


class CrifsError(Exception):
    """Base of every user-facing error. ``str(err)`` is one line for a person."""

    exit_code: int = 2

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class NotFound(CrifsError):
    """The thing asked for does not exist (a root, a snapshot key, an image)."""

    exit_code = 1


class BadInput(CrifsError):
    """A path, argument or option the user gave is unusable."""


class CorruptStore(CrifsError):
    """A store file could not be decoded: bad bolt pages, malformed JSON, truncated data."""


class StoreChanged(CrifsError):
    """The file changed under us while reading it, more times than we retry."""


class StoreLocked(CrifsError):
    """A writer holds the store's lock longer than the timeout we wait for."""


class Unsupported(CrifsError):
    """A format version, driver or layout crifs does not understand."""


class UnsafePath(CrifsError):
    """A path would leave the root it must stay in (through a symlink or ``..``)."""


class Internal(CrifsError):
    """A bug in crifs; the message says what was being done."""

    exit_code = 8
