"""Content-defined chunking, the chunk index, and per-chunk compression.

Pure: takes bytes or readable streams, returns typed objects; no I/O of its own.
"""

from skylift.chunks.chunker import iter_chunks
from skylift.chunks.errors import (
    ChunkDataError,
    ChunkError,
    ChunkingParamsError,
    IndexCorruptError,
    IndexTotalsError,
)
from skylift.chunks.index import (
    CODEC_NONE,
    CODEC_ZSTD,
    ChunkEntry,
    IndexBuilder,
    PackedEntries,
    PageChainVerifier,
    compress_index,
    decode_chunk,
    decompress_index,
    encode_chunk,
)
from skylift.chunks.params import DEFAULT_CDC, MAX_CHUNK_BYTES, ChunkingParams

__all__ = [
    "CODEC_NONE",
    "CODEC_ZSTD",
    "DEFAULT_CDC",
    "MAX_CHUNK_BYTES",
    "ChunkDataError",
    "ChunkEntry",
    "ChunkError",
    "ChunkingParams",
    "ChunkingParamsError",
    "IndexBuilder",
    "IndexCorruptError",
    "IndexTotalsError",
    "PackedEntries",
    "PageChainVerifier",
    "compress_index",
    "decode_chunk",
    "decompress_index",
    "encode_chunk",
    "iter_chunks",
]
