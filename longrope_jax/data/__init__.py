"""Documents, tokenisation and evaluation windows (see :mod:`.documents`)."""

from longrope_jax.data.documents import (
    DataError,
    Document,
    Windows,
    read_documents,
    windows,
)

__all__ = ["DataError", "Document", "Windows", "read_documents", "windows"]
