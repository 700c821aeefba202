"""The data pipeline's own error type: bad input gets a clear one-line message, never a cryptic traceback."""

from __future__ import annotations


class DatasetError(ValueError):
    """Unusable dataset input (annotation file, image file, flag); the message names the file and the fix.

    A ``ValueError`` subclass with a single message argument, so it survives the round trip through
    DataLoader worker processes (they re-raise ``type(err)(message)`` in the main process).
    """
