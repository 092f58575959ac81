"""Chunking parameters: how a payload is cut, recorded so that a seed is cut alike."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from skylift.chunks.errors import ChunkingParamsError

__all__ = [
    "DEFAULT_CDC",
    "MAX_CHUNK_BYTES",
    "Algorithm",
    "ChunkingParams",
]

Algorithm = Literal["fastcdc-2020", "fixed"]

#: Upper bound on any chunk, so that a reader's memory is bounded by it.
MAX_CHUNK_BYTES = 4 * 1024 * 1024
_MIN_CHUNK_BYTES = 64


@dataclass(frozen=True)
class ChunkingParams:
    """How a payload is cut into chunks.

    ``fastcdc-2020`` is content-defined (FastCDC 2020 as pyfastcdc implements
    it, its gear table varied by ``seed``, normalisation level ``normalization``); the
    mean chunk is about ``avg_size + min_size`` bytes. ``fixed`` cuts
    ``avg_size`` blocks (``min_size`` and ``max_size`` equal it), aligned to
    a filesystem's block size.
    """

    algorithm: Algorithm
    avg_size: int
    min_size: int
    max_size: int
    normalization: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.algorithm not in ("fastcdc-2020", "fixed"):
            raise ChunkingParamsError(f"unknown chunking algorithm {self.algorithm!r}")
        for name in ("avg_size", "min_size", "max_size", "normalization", "seed"):
            if type(getattr(self, name)) is not int:
                raise ChunkingParamsError(f"chunking {name} must be an integer")
        if not _MIN_CHUNK_BYTES <= self.min_size <= self.avg_size <= self.max_size:
            raise ChunkingParamsError(
                "chunk sizes must satisfy 64 <= min_size <= avg_size <= max_size"
            )
        if self.max_size > MAX_CHUNK_BYTES:
            raise ChunkingParamsError(f"max_size is larger than {MAX_CHUNK_BYTES} bytes")
        if self.algorithm == "fixed":
            if not self.min_size == self.avg_size == self.max_size:
                raise ChunkingParamsError("fixed chunking needs min_size == avg_size == max_size")
            if self.avg_size < 512 or self.avg_size & (self.avg_size - 1):
                raise ChunkingParamsError(
                    "fixed block size must be a power of two of at least 512 (a filesystem's "
                    "block size)"
                )
            if self.normalization or self.seed:
                raise ChunkingParamsError("fixed chunking takes no normalization or seed")
        else:
            if self.avg_size & (self.avg_size - 1):
                raise ChunkingParamsError("fastcdc avg_size must be a power of two")
            if not 256 <= self.avg_size <= 4 * 1024 * 1024 or self.max_size < 1024:
                raise ChunkingParamsError(
                    "fastcdc needs 256 <= avg_size <= 4 MiB and max_size >= 1024"
                )
            if self.normalization not in (0, 1, 2, 3):
                raise ChunkingParamsError("fastcdc normalization must be 0, 1, 2 or 3")
            if not 0 <= self.seed < 2**32:
                raise ChunkingParamsError("fastcdc seed must fit in 32 bits")

    @classmethod
    def fixed(cls, block_size: int) -> ChunkingParams:
        """Fixed blocks of ``block_size`` bytes."""
        return cls("fixed", block_size, block_size, block_size, 0, 0)

    @classmethod
    def cdc(cls, avg_size: int) -> ChunkingParams:
        """FastCDC with the customary min = avg/4 and max = avg*4."""
        return cls("fastcdc-2020", avg_size, max(avg_size // 4, 64), avg_size * 4, 1, 0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form recorded in a bundle manifest."""
        return {
            "algorithm": self.algorithm,
            "avg_size": self.avg_size,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "normalization": self.normalization,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> ChunkingParams:
        """Parse :meth:`to_dict` output; raises ChunkingParamsError on anything else."""
        if not isinstance(obj, Mapping) or set(obj) != {
            "algorithm",
            "avg_size",
            "min_size",
            "max_size",
            "normalization",
            "seed",
        }:
            raise ChunkingParamsError("chunking parameters have missing or unknown fields")
        return cls(
            obj["algorithm"],
            obj["avg_size"],
            obj["min_size"],
            obj["max_size"],
            obj["normalization"],
            obj["seed"],
        )

    def describe(self) -> str:
        """Short human form, e.g. ``fastcdc-2020 16K/64K/256K`` or ``fixed 4K``."""
        if self.algorithm == "fixed":
            return f"fixed {_kib(self.avg_size)}"
        sizes = "/".join(_kib(n) for n in (self.min_size, self.avg_size, self.max_size))
        return f"{self.algorithm} {sizes}"


def _kib(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n}B"


#: FastCDC 16K/64K/256K (``--chunking NAME=cdc:64K``): ADR 0002's default for every
#: payload until ADR 0005 made the writer pick one per payload type
#: (``skylift.bundle.default_chunking``). Tests of the chunker and planner still use it.
DEFAULT_CDC = ChunkingParams("fastcdc-2020", 65536, 16384, 262144, 1, 0)
