"""The one user-error type: bad input that the ``hf-helu`` commands and the recipes report as ``error: ...``.

Everything else (a bug here or in a library) keeps its traceback: only :class:`UsageError` is turned into one
line and exit status 2.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user (a value, a file, a model the operation does not support), named in the message."""


__all__ = ["UsageError"]
