"""Exceptions raised by biopsyquant.

Every error that can reach a user is a subclass of :class:`BiopsyQuantError` and carries a
message that names the input (file, argument or setting) and what is wrong with it.  The CLI
prints these messages without a traceback.
"""

from __future__ import annotations

from pathlib import Path


class BiopsyQuantError(Exception):
    """Base class of all errors biopsyquant raises on purpose."""


class SlideError(BiopsyQuantError):
    """A slide file cannot be opened or read.

    Parameters
    ----------
    path : str or Path
        The offending file.
    problem : str
        What is wrong, in words a user can act on.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(BiopsyQuantError, ValueError):
    """An array or argument passed to a library function is unusable."""


class SettingsError(BiopsyQuantError, ValueError):
    """A settings file, preset name or override is invalid."""


class MppUnknownError(BiopsyQuantError):
    """A physical measurement (µm, mm²) was requested but the pixel size is unknown."""
