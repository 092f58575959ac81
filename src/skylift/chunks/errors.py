"""Exceptions of the chunk layer: parameters, index pages, chunk data."""

from __future__ import annotations

from skylift.errors import SkyliftError

__all__ = [
    "ChunkDataError",
    "ChunkError",
    "ChunkingParamsError",
    "IndexCorruptError",
    "IndexTotalsError",
]


class ChunkError(SkyliftError):
    """A chunk, a chunk index or chunking parameters cannot be trusted or used."""


class ChunkingParamsError(ChunkError):
    """Chunking parameters are out of range or of an unknown algorithm."""


class IndexCorruptError(ChunkError):
    """An index page is malformed or does not match the digest it must have."""


class ChunkDataError(ChunkError):
    """A chunk's stored bytes do not decode to the data its index entry names."""


class IndexTotalsError(IndexCorruptError):
    """An index describes more or fewer chunks or bytes than its trusted totals."""
