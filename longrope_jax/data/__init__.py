"""Documents, tokenisation and evaluation windows (see :mod:`.documents`)."""

from longrope_jax.data.documents import (
    DataError,
    Document,
    Windows,
    read_documents,
    read_sources,
    source_label,
    source_list,
    windows,
    windows_from,
)

__all__ = ["DataError", "Document", "Windows", "read_documents", "read_sources", "source_label", "source_list",
           "windows", "windows_from"]
