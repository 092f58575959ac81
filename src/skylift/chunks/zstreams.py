"""Deltas of payloads made of zlib streams: a squashfs image compressed with gzip.

A squashfs image is a sequence of compressed blocks. A change of a few
bytes in a file changes its whole compressed block, and the compressed
bytes of the old and the new block share almost nothing, so a delta of the
images themselves is large: 2.04 MB on the corpus's small update, against
0.19 MB for the same change made to the files. As Android's imgdiff does
for the deflate streams of an APK, a delta can work on the *inflated* form
of both payloads, where each zlib stream is replaced by the bytes it
inflates to, and the device compresses the changed streams again. Deflate
is deterministic for one zlib and one set of parameters: the hub keeps
only the streams it saw compress back to the same bytes, the device
checks each stream's length as it makes it, and the payload's SHA-256
from the signed manifest is checked at the end as for any delta.

squashfs compressed with xz (``mksquashfs -comp xz``, OpenWrt's choice)
works the same way: each block is an xz stream of one LZMA2 block, which
Python's ``lzma`` makes again byte for byte at the preset the image was
made with (6 by default); the xz container around it (block header with
both sizes, check, index, footer, as liblzma's buffer encoder writes it)
is rebuilt here, since Python's stream encoder writes another.

A stream the new payload shares with the old one (same compressed bytes)
is copied from the old payload compressed: the device deflates only the
streams that changed (about 5 MB/s for zlib's level 9 on this kind of
machine, on :data:`DEFLATE_THREADS` threads: zlib lets go of the GIL). It
still inflates the old streams the delta copies (about 200 MB/s): the
unchanged streams' bytes are what the literals of the changed ones
compress against (left out of the inflated form, the corpus's small
squashfs update took 0.28 MB instead of 0.20).

Layout of a *zlib delta*, big-endian::

    header  = "SKZ1" | 32-byte sha256 of the old payload | 32-byte sha256 of the new
              | u64 old size | u64 new size
              | u32 old stream count | u32 length of the old table frame
              | u32 new stream count | u32 length of the new table frame
    tables  = two zstd frames (declaring their size) of one record per stream, in order
    record  = varint gap | varint compressed length | varint inflated length
              | varint level | varint source
    inner   = a delta (:mod:`skylift.chunks.delta`) from the old payload's inflated
              form to the new payload's

``gap`` is the count of bytes between the previous stream's end (or the
payload's start) and this stream; they are the same in the payload and in
its inflated form. In the new table, ``level`` is the zlib level that makes
the stream's bytes (0 to 9), or :data:`XZ` and the xz stream's recipe, and
``source`` is 0 when the device compresses it, or one more than the offset
in the old payload of the same compressed bytes. The old table's streams
are only inflated: ``level`` says which codec (0 zlib, :data:`XZ` xz) and
``source`` is 0.

Pure: reads and writes go through callables; no I/O of its own.
"""

from __future__ import annotations

import hashlib
import lzma
import re
import struct
import zlib
from array import array
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from skylift.chunks import delta as plain
from skylift.chunks.delta import DeltaError

__all__ = [
    "DEFLATE_THREADS",
    "MAX_CANDIDATES_PER_MIB",
    "MAX_STREAMS",
    "MAX_STREAM_BYTES",
    "ZLIB_DELTA_MAGIC",
    "InflatedView",
    "Stream",
    "ZlibDeltaHeader",
    "deflate_pieces",
    "encode_table",
    "encode_zlib_header",
    "find_streams",
    "inflated_size",
    "parse_table",
    "rebuild",
    "reproducible",
    "write_inflated",
]

ZLIB_DELTA_MAGIC = b"SKZ1"
#: A stream inflates to at most this many bytes (squashfs's largest block is 1 MiB).
MAX_STREAM_BYTES = 1024 * 1024
#: ... and is at most this long compressed (deflate's stored blocks add 5 bytes per 64 KiB).
MAX_STREAM_INPUT = MAX_STREAM_BYTES + 1024
#: At most this many streams in a payload: a 32 GiB squashfs image in 128 KiB
#: blocks. A device holds their positions in four arrays of 8-byte integers.
MAX_STREAMS = 256 * 1024
#: A payload's inflated form is at most this many times its size.
MAX_INFLATION = 8
#: The search for streams stops after this many false starts per MiB of payload.
MAX_CANDIDATES_PER_MIB = 1024

_HEADER = struct.Struct(">4s32s32sQQIIII")
HEADER_SIZE = _HEADER.size
#: The zlib header's first byte for deflate with a 32 KiB window (the only one
#: Python's zlib.compress writes), then the second byte for each FLEVEL
#: (the header's check bits make the pair a multiple of 31).
_CANDIDATE = re.compile(rb"\x78[\x01\x5e\x9c\xda]|\xfd7zXZ\x00")
#: The levels that write each FLEVEL into the header, most likely first.
_LEVELS = {0x01: (1, 0), 0x5E: (5, 4, 3, 2), 0x9C: (6,), 0xDA: (9, 8, 7)}
#: A stream's ``level`` at or above this is an xz stream's recipe (see :func:`_xz_unpack`).
XZ = 1 << 16
_XZ_MAGIC = b"\xfd7zXZ\x00"
#: The liblzma presets tried for an xz stream, in this order (6 is xz's and mksquashfs's).
_XZ_PRESETS = (6, 9, 6 | lzma.PRESET_EXTREME, 9 | lzma.PRESET_EXTREME)
#: xz integrity checks rebuilt (id: bytes); CRC64 is not (Python has no CRC64).
_XZ_CHECKS = {0: 0, 1: 4, 10: 32}
#: Memory an xz decoder may take (a stream's dictionary: squashfs uses its block size).
_XZ_MEMLIMIT = 16 * 1024 * 1024
_SCAN_WINDOW = 8 * 1024 * 1024
#: Inflated streams an InflatedView keeps (at most 1 MiB each).
_VIEW_CACHE = 4
#: Threads that deflate a new payload's changed streams ...
DEFLATE_THREADS = 2
#: ... with at most this many streams waiting or in progress (1 MiB each, in and out),
_DEFLATE_QUEUE = 3
#: ... and at most about this many bytes made and not yet handed on.
_QUEUE_BYTES = 2 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Stream:
    """One zlib stream of a payload.

    ``level`` is the zlib level that writes its bytes (-1 when not known:
    found, not checked), or for an xz stream :data:`XZ` and its recipe
    (:data:`XZ` alone when not known); ``source`` is, in a new payload's table, where the
    same compressed bytes lie in the old payload (-1: none, deflated on the
    device). ``digest`` (of the compressed bytes) lets a maker pair the new
    payload's streams with the old one's; it is not sent.
    """

    offset: int
    length: int
    size: int
    level: int = -1
    source: int = -1
    digest: bytes = b""


@dataclass(frozen=True, slots=True)
class ZlibDeltaHeader:
    """What a zlib delta joins, and the lengths of its two tables."""

    from_sha256: bytes
    to_sha256: bytes
    from_size: int
    to_size: int
    old_count: int
    old_table_length: int
    new_count: int
    new_table_length: int


# -- finding streams (the hub) ----------------------------------------------------------------


def find_streams(
    read: Callable[[int, int], bytes],
    size: int,
    *,
    max_inflated: int | None = None,
) -> list[Stream]:
    """The zlib streams of a payload of ``size`` bytes read with ``read(offset, length)``.

    A stream is kept when it inflates completely (its Adler-32 checked by
    zlib) to at most :data:`MAX_STREAM_BYTES`; the search goes on after
    its end. Streams stop being kept at :data:`MAX_STREAMS`, or once the
    inflated form would pass ``max_inflated`` bytes (default
    :data:`MAX_INFLATION` times ``size``): the rest stays as it is.
    Whether a stream compresses back to its bytes is :func:`reproducible`'s
    question, asked only of the streams a device would have to deflate.

    The search gives up after :data:`MAX_CANDIDATES_PER_MIB` headers per MiB
    that start no stream (random bytes hold about 64; a payload built to
    look like nested stored blocks could hold one in seven bytes, each
    costing an inflate).
    """
    limit = MAX_INFLATION * size if max_inflated is None else max_inflated
    misses = MAX_CANDIDATES_PER_MIB * (size >> 20) + MAX_CANDIDATES_PER_MIB
    found: list[Stream] = []
    grown = 0
    base, window = 0, memoryview(b"")
    position = 0
    while position < size - 8 and len(found) < MAX_STREAMS:
        at_end = base + len(window) >= size
        if not at_end and position - base + MAX_STREAM_INPUT > len(window):
            base = position
            window = memoryview(read(base, min(_SCAN_WINDOW + MAX_STREAM_INPUT, size - base)))
            at_end = base + len(window) >= size
        # A candidate must have a whole stream's worth of bytes after it in the
        # window, unless the window reaches the payload's end.
        last = len(window) if at_end else len(window) - MAX_STREAM_INPUT + 1
        match = _CANDIDATE.search(window, position - base, last)
        if match is None:
            if at_end:
                break
            position = base + last
            continue
        stream = _stream_at(window, match.start(), base)
        if stream is None or grown + stream.size - stream.length > limit - size:
            misses -= 1
            if misses < 0:
                break
            position = base + match.start() + 1
            continue
        found.append(stream)
        grown += stream.size - stream.length
        position = stream.offset + stream.length
    return found


def _stream_at(window: memoryview, start: int, base: int) -> Stream | None:
    piece = window[start : start + MAX_STREAM_INPUT]
    xz = piece[:6] == _XZ_MAGIC
    decoder = _decoder(xz)
    try:
        data = decoder.decompress(piece, MAX_STREAM_BYTES + 1)
    except (zlib.error, lzma.LZMAError):
        return None
    if not decoder.eof or len(data) > MAX_STREAM_BYTES or not data:
        return None
    length = len(piece) - len(decoder.unused_data)
    return Stream(
        base + start,
        length,
        len(data),
        level=XZ if xz else -1,
        digest=hashlib.blake2b(piece[:length], digest_size=16).digest(),
    )


def _decoder(xz: bool) -> zlib._Decompress | lzma.LZMADecompressor:
    if xz:
        return lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_XZ_MEMLIMIT)
    return zlib.decompressobj()


def _inflate(compressed: bytes, level: int) -> bytes:
    """What a stream inflates to (empty when it does not: the caller compares sizes)."""
    decoder = _decoder(level >= XZ)
    try:
        data = decoder.decompress(compressed, MAX_STREAM_BYTES + 1)
    except (zlib.error, lzma.LZMAError):
        return b""
    return data if decoder.eof and not decoder.unused_data else b""


def _compress(data: bytes, level: int) -> bytes:
    """A stream's bytes made again: zlib at ``level``, or xz by its recipe."""
    if level < XZ:
        return zlib.compress(data, level)
    preset, check, props = _xz_unpack(level)
    raw = lzma.compress(
        data,
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": preset, "dict_size": _xz_dict(props)}],
    )
    return _xz_container(raw, data, check, props)


def reproducible(compressed: bytes) -> int:
    """The recipe (``level``) that makes what ``compressed`` inflates to back into it, or -1.

    zlib: only the levels its header's FLEVEL allows are tried (with zlib's
    default window, memory level and strategy, as mksquashfs and most
    writers use them). xz: a stream of one block with both sizes in its
    header and one LZMA2 filter (as liblzma's buffer encoder writes), a
    CRC32, SHA-256 or no check, at the presets of :data:`_XZ_PRESETS`.
    """
    if compressed[:6] == _XZ_MAGIC:
        return _xz_reproducible(compressed)
    levels = _LEVELS.get(compressed[1], ()) if compressed[:1] == b"\x78" else ()
    data = _inflate(compressed, 0) if levels else b""
    if not data:
        return -1
    for level in levels:
        if zlib.compress(data, level) == compressed:
            return level
    return -1


def _xz_reproducible(compressed: bytes) -> int:
    check, props = compressed[7], _xz_props(compressed)
    if props is None or check not in _XZ_CHECKS:
        return -1
    data = _inflate(compressed, XZ)
    if not data:
        return -1
    for index in range(len(_XZ_PRESETS)):
        recipe = XZ | props << 8 | check << 3 | index
        if _compress(data, recipe) == compressed:
            return recipe
    return -1


def _xz_props(compressed: bytes) -> int | None:
    """The LZMA2 dictionary byte of an xz stream whose one block header carries both sizes."""
    raw = bytearray(compressed[12:64])
    if len(raw) < 2 or raw[1] != 0xC0:  # one filter, compressed and uncompressed sizes
        return None
    try:
        at = 2
        for _ in range(2):  # the sizes
            _, at = _get_varint(bytes(raw), at)
        filter_id, at = _get_varint(bytes(raw), at)
        size, at = _get_varint(bytes(raw), at)
    except DeltaError:
        return None
    if filter_id != 0x21 or size != 1 or at >= len(raw) or raw[at] > 40:
        return None
    return raw[at]


def _xz_unpack(recipe: int) -> tuple[int, int, int]:
    """(preset, check, dictionary byte) of an xz recipe."""
    return _XZ_PRESETS[recipe & 7], recipe >> 3 & 0x1F, recipe >> 8 & 0xFF


def _xz_dict(props: int) -> int:
    """The dictionary size an LZMA2 dictionary byte stands for (at most 40)."""
    return (2 | props & 1) << (props // 2 + 11)


def _xz_container(raw: bytes, data: bytes, check: int, props: int) -> bytes:
    """The xz stream of one block of LZMA2 data ``raw`` (of ``data``), as liblzma writes it."""
    flags = bytes((0, check))
    header = _XZ_MAGIC + flags + zlib.crc32(flags).to_bytes(4, "little")
    block = bytearray((0, 0xC0))
    for value in (len(raw), len(data), 0x21, 1):
        _put_varint(block, value)
    block.append(props)
    block += bytes(-len(block) % 4)
    block[0] = len(block) // 4  # (header size / 4) - 1, the CRC32 to come included
    block += zlib.crc32(block).to_bytes(4, "little")
    if check == 1:
        check_value = zlib.crc32(data).to_bytes(4, "little")
    elif check == 10:
        check_value = hashlib.sha256(data).digest()
    else:
        check_value = b""
    unpadded = len(block) + len(raw) + len(check_value)
    body = bytes(block) + raw + bytes(-len(raw) % 4) + check_value
    index = bytearray(1)
    for value in (1, unpadded, len(data)):
        _put_varint(index, value)
    index += bytes(-len(index) % 4)
    index += zlib.crc32(index).to_bytes(4, "little")
    backward = (len(index) // 4 - 1).to_bytes(4, "little")
    footer = zlib.crc32(backward + flags).to_bytes(4, "little") + backward + flags + b"YZ"
    return header + body + bytes(index) + footer


def inflated_size(size: int, streams: Sequence[Stream]) -> int:
    """The size of the inflated form of a payload of ``size`` bytes with ``streams``."""
    return size + sum(s.size - s.length for s in streams)


def write_inflated(
    read: Callable[[int, int], bytes],
    size: int,
    streams: Sequence[Stream],
    write: Callable[[bytes], object],
    *,
    piece: int = 1024 * 1024,
) -> None:
    """Write the inflated form of a payload: its bytes, each stream replaced by its inflation."""
    position = 0
    for s in [*streams, Stream(size, 0, 0)]:
        for start in range(position, s.offset, piece):
            write(read(start, min(piece, s.offset - start)))
        if s.length:
            data = _inflate(read(s.offset, s.length), s.level)
            if len(data) != s.size:
                raise DeltaError(f"the stream at {s.offset} does not inflate as it did")
            write(data)
        position = s.offset + s.length


# -- the format -----------------------------------------------------------------------------------


def encode_zlib_header(header: ZlibDeltaHeader) -> bytes:
    """The header's bytes."""
    return _HEADER.pack(
        ZLIB_DELTA_MAGIC,
        header.from_sha256,
        header.to_sha256,
        header.from_size,
        header.to_size,
        header.old_count,
        header.old_table_length,
        header.new_count,
        header.new_table_length,
    )


def _parse_header(data: bytes) -> ZlibDeltaHeader:
    magic, old, new, from_size, to_size, old_count, old_len, new_count, new_len = _HEADER.unpack(
        data
    )
    if magic != ZLIB_DELTA_MAGIC:
        raise DeltaError("not a Skylift zlib delta (bad magic)")
    if not 0 < from_size <= plain.MAX_PAYLOAD_BYTES or not 0 < to_size <= plain.MAX_PAYLOAD_BYTES:
        raise DeltaError("a delta joins payloads of impossible sizes")
    for count, length in ((old_count, old_len), (new_count, new_len)):
        if count > MAX_STREAMS or not 0 < length <= _MAX_TABLE_BYTES:
            raise DeltaError("a zlib delta's stream table is out of range")
    return ZlibDeltaHeader(old, new, from_size, to_size, old_count, old_len, new_count, new_len)


#: A record is at most five varints of at most 7 bytes (every field < 2**44).
_MAX_RECORD_BYTES = 35
_MAX_TABLE_BYTES = MAX_STREAMS * _MAX_RECORD_BYTES


def encode_table(streams: Sequence[Stream]) -> bytes:
    """The streams' records, as one zstd frame (offsets as gaps, see the module docstring)."""
    raw = bytearray()
    position = 0
    for s in streams:
        for value in (s.offset - position, s.length, s.size, max(s.level, 0), s.source + 1):
            _put_varint(raw, value)
        position = s.offset + s.length
    return zstandard.ZstdCompressor(level=19, write_content_size=True).compress(bytes(raw))


def parse_table(frame: bytes, count: int, size: int) -> list[Stream]:
    """The ``count`` streams of a table frame, checked against a payload of ``size`` bytes.

    Streams must lie in order inside the payload, inflate to 1 to
    :data:`MAX_STREAM_BYTES` bytes, and be at most :data:`MAX_STREAM_INPUT`
    long; levels are zlib's 0 to 9, or an xz recipe (:data:`XZ` alone: an
    xz stream only inflated, never made).

    Raises:
        DeltaError: the frame is corrupt, or a record is out of range.
    """
    raw = plain.one_frame(frame, "a zlib delta's stream table", limit=count * _MAX_RECORD_BYTES)
    streams: list[Stream] = []
    at = 0
    position = 0
    for i in range(count):
        gap, at = _get_varint(raw, at)
        length, at = _get_varint(raw, at)
        inflated, at = _get_varint(raw, at)
        level, at = _get_varint(raw, at)
        source, at = _get_varint(raw, at)
        offset = position + gap
        if not 0 < length <= MAX_STREAM_INPUT or not 0 < inflated <= MAX_STREAM_BYTES:
            raise DeltaError(f"stream {i} of a zlib delta has an impossible size")
        if offset + length > size:
            raise DeltaError(f"stream {i} of a zlib delta lies outside its payload")
        if not _known_level(level):
            raise DeltaError(f"stream {i} of a zlib delta names an unknown codec or level")
        streams.append(Stream(offset, length, inflated, level, source - 1))
        position = offset + length
    if at != len(raw):
        raise DeltaError("a zlib delta's stream table has bytes after its last record")
    return streams


def _known_level(level: int) -> bool:
    """A zlib level, or an xz recipe this module can make (or XZ alone: only inflated)."""
    if level < XZ:
        return 0 <= level <= 9
    index, check, props = level & 7, level >> 3 & 0x1F, level >> 8 & 0xFF
    return (
        level >> 16 == 1
        and index < len(_XZ_PRESETS)
        and (check in _XZ_CHECKS or level == XZ)
        and props <= 40
    )


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _get_varint(raw: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 49:
            raise DeltaError("a zlib delta's stream table ends inside a record")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


# -- applying (the device, and the hub's check) ------------------------------------------------


class InflatedView:
    """Reads of a payload's inflated form at any offset, from the payload itself.

    Each stream is inflated when a read reaches it; the last few are kept
    (at most 4 MiB), since a delta's copies and dictionaries read forward.
    """

    def __init__(
        self, read: Callable[[int, int], bytes], size: int, streams: Sequence[Stream]
    ) -> None:
        self._read = read
        self.size = inflated_size(size, streams)
        # Segment k starts at starts[k] in the inflated form and at sources[k]
        # in the payload; it is a stream when lengths[k] > 0 (its compressed
        # length), else raw up to the next segment.
        self._starts = array("q")
        self._sources = array("q")
        self._lengths = array("q")
        self._levels = array("q")
        position = inflated = 0
        for s in streams:
            if s.offset > position:
                self._segment(inflated, position, 0)
                inflated += s.offset - position
            self._segment(inflated, s.offset, s.length, s.level)
            inflated += s.size
            position = s.offset + s.length
        if position < size:
            self._segment(inflated, position, 0)
        self._segment(self.size, size, 0)  # the end
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def _segment(self, start: int, source: int, length: int, level: int = 0) -> None:
        self._starts.append(start)
        self._sources.append(source)
        self._lengths.append(length)
        self._levels.append(level)

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the inflated form from ``offset`` (fewer at its end).

        Raises:
            DeltaError: a stream of the payload does not inflate (the payload
                is not the one the delta was made from).
        """
        parts: list[bytes] = []
        end = min(offset + length, self.size)
        while offset < end:
            k = bisect_right(self._starts, offset) - 1
            start, next_start = self._starts[k], self._starts[k + 1]
            n = min(end, next_start) - offset
            if self._lengths[k]:
                data = self._inflated(k)
                parts.append(data[offset - start : offset - start + n])
            else:
                parts.append(self._read(self._sources[k] + offset - start, n))
            offset += n
        return b"".join(parts)

    def _inflated(self, k: int) -> bytes:
        data = self._cache.get(k)
        if data is not None:
            self._cache.move_to_end(k)
            return data
        expected = self._starts[k + 1] - self._starts[k]
        data = _inflate(self._read(self._sources[k], self._lengths[k]), self._levels[k])
        if len(data) != expected:
            raise DeltaError("a stream of the old payload does not inflate as the delta says")
        self._cache[k] = data
        if len(self._cache) > _VIEW_CACHE:
            self._cache.popitem(last=False)
        return data


def deflate_pieces(
    pieces: Iterable[tuple[int, bytes]],
    streams: Sequence[Stream],
    size: int,
    read_old: Callable[[int, int], bytes],
) -> Iterator[tuple[int, bytes]]:
    """The new payload as ``(offset, bytes)`` pieces, from the pieces of its inflated form.

    Each stream of ``streams`` (the new payload's, of a payload of ``size``
    bytes) is taken from the old payload compressed when it names a source
    there, else deflated at its level from the inflated bytes (on
    :data:`DEFLATE_THREADS` threads, in order); the bytes between streams
    pass through. Memory: a piece, and at most :data:`_DEFLATE_QUEUE`
    streams being deflated.

    Raises:
        DeltaError: a stream deflates to another length than the delta says
            (this device's zlib writes other bytes than the hub's), or the
            pieces do not make the inflated form.
    """
    plan = iter([*streams, Stream(size, 0, 0)])
    target = next(plan)
    position = 0  # in the new payload, of what is queued
    pending = bytearray()  # inflated bytes of the stream being gathered, if deflated here
    gathered = 0  # ... and how many
    queue: deque[tuple[int, int, bytes | Future[bytes]]] = deque()
    deflating = queued = 0  # streams being deflated, bytes in the queue

    def done(block: bool) -> Iterator[tuple[int, bytes]]:
        # The queue's head, in order; deflates are waited for only when told
        # to, or when too much is waiting.
        nonlocal deflating, queued
        while queue:
            offset, expected, item = queue[0]
            if isinstance(item, Future):
                full = deflating >= _DEFLATE_QUEUE or queued > _QUEUE_BYTES
                if not (block or full or item.done()):
                    return
                item = item.result()
                deflating -= 1
            queue.popleft()
            queued -= expected
            if len(item) != expected:
                raise DeltaError(
                    f"the zlib stream at {offset} of the new payload deflates to "
                    f"{len(item)} bytes, not {expected}: this zlib writes other bytes "
                    "than the hub's"
                )
            yield offset, item

    with ThreadPoolExecutor(DEFLATE_THREADS, thread_name_prefix="skylift-deflate") as pool:
        for _, data in pieces:
            view = memoryview(data)
            while view:
                if position < target.offset:  # raw bytes before the next stream
                    n = min(len(view), target.offset - position)
                    queue.append((position, n, bytes(view[:n])))
                    queued += n
                    position += n
                    view = view[n:]
                    continue
                if target.length == 0:
                    raise DeltaError("the delta makes more than the new payload")
                n = min(len(view), target.size - gathered)
                if target.source < 0:
                    pending += view[:n]
                gathered += n
                view = view[n:]
                if gathered < target.size:
                    continue
                if target.source >= 0:  # the same compressed bytes as in the old payload
                    item: bytes | Future[bytes] = read_old(target.source, target.length)
                else:
                    item = pool.submit(_compress, bytes(pending), target.level)
                    deflating += 1
                queue.append((position, target.length, item))
                queued += target.length
                position += target.length
                pending.clear()
                gathered = 0
                target = next(plan)
            yield from done(block=False)
        yield from done(block=True)
    if position != size or target.length:
        raise DeltaError("the delta does not make the whole new payload")


def rebuild(
    read: Callable[[int], bytes],
    read_old: Callable[[int, int], bytes],
    *,
    from_sha256: str,
    from_size: int,
    to_sha256: str,
    to_size: int,
) -> Iterator[tuple[int, bytes]]:
    """A whole delta, plain or zlib, applied and checked: the new payload as pieces.

    What a device and the hub's check both do; see
    :func:`skylift.chunks.delta.rebuild`, which this calls for a plain delta.
    A zlib delta's inner delta is replayed over the old payload's inflated
    form without making the bytes of the streams copied compressed (see
    :func:`_copied_only`). The result's SHA-256 is checked after the last
    piece, as there.

    Raises:
        DeltaError: malformed, truncated, other payloads, trailing bytes, a
            stream this device deflates otherwise, or it does not make the
            new payload.
    """
    magic = plain.read_exactly(read, 4, "header")
    if magic == plain.DELTA_MAGIC:
        yield from plain.rebuild(
            _prefixed(magic, read),
            read_old,
            from_sha256=from_sha256,
            from_size=from_size,
            to_sha256=to_sha256,
            to_size=to_size,
        )
        return
    if magic != ZLIB_DELTA_MAGIC:
        raise DeltaError("not a Skylift delta (bad magic)")
    header = _parse_header(magic + plain.read_exactly(read, HEADER_SIZE - 4, "header"))
    plain.check_joins(
        header, from_sha256=from_sha256, from_size=from_size, to_sha256=to_sha256, to_size=to_size
    )
    old_streams = parse_table(
        plain.read_exactly(read, header.old_table_length, "stream table"),
        header.old_count,
        from_size,
    )
    new_streams = parse_table(
        plain.read_exactly(read, header.new_table_length, "stream table"),
        header.new_count,
        to_size,
    )
    if any(s.level not in (0, XZ) or s.source >= 0 for s in old_streams):
        raise DeltaError("a zlib delta's old stream table names levels or sources")
    for s in new_streams:
        if s.source >= 0 and s.source + s.length > from_size:
            raise DeltaError("a zlib delta copies a stream from outside the old payload")
        if s.source < 0 and s.level == XZ:
            raise DeltaError("a zlib delta's xz stream to be made names no recipe")
    old = InflatedView(read_old, from_size, old_streams)
    inner, ops = plain.read_delta(read)
    if inner.from_size != old.size or inner.to_size != inflated_size(to_size, new_streams):
        raise DeltaError("a zlib delta's inner delta joins other sizes than its tables say")
    pieces = plain.replay(ops, read, old.read, unused=_copied_only(ops, new_streams))
    yield from plain.hashed(deflate_pieces(pieces, new_streams, to_size, read_old), read, to_sha256)


def _copied_only(
    ops: Sequence[plain.DeltaOp], streams: Sequence[Stream]
) -> Callable[[int, int], tuple[bool, int]]:
    """Which bytes of the inflated form are only those of streams copied compressed.

    Such bytes need not be made (deflate_pieces drops them), unless a
    literal's dictionary takes them. ``f(offset, length)`` says whether the
    range's first bytes are such, and how many of them are alike (at least
    one). The inner delta's hash is then not checked (what it makes is not
    all there); the payload's is.
    """
    starts, ends = array("q"), array("q")  # of streams copied compressed, merged
    shift = 0
    for s in streams:
        if s.source >= 0:
            start = s.offset + shift
            if ends and ends[-1] == start:  # streams one after the other: one range
                ends[-1] = start + s.size
            else:
                starts.append(start)
                ends.append(start + s.size)
        shift += s.size - s.length
    windows: list[tuple[int, int]] = []
    position = 0
    for op in ops:
        if op.kind == plain.LITERAL and op.recent_length:
            windows.append((position - op.recent_length, position))
        position += op.length
    taken_starts, taken_ends = array("q"), array("q")  # the literals' windows, merged
    for a, b in sorted(windows):
        if taken_ends and a <= taken_ends[-1]:
            taken_ends[-1] = max(taken_ends[-1], b)
        else:
            taken_starts.append(a)
            taken_ends.append(b)

    def copied_only(offset: int, length: int) -> tuple[bool, int]:
        end = offset + length
        j = bisect_right(taken_starts, offset) - 1
        if j >= 0 and taken_ends[j] > offset:  # a dictionary takes them
            return False, min(end, taken_ends[j]) - offset
        next_taken = taken_starts[j + 1] if j + 1 < len(taken_starts) else end
        k = bisect_right(starts, offset) - 1
        if k >= 0 and ends[k] > offset:
            return True, min(end, ends[k], next_taken) - offset
        next_copied = starts[k + 1] if k + 1 < len(starts) else end
        return False, min(end, next_copied) - offset

    return copied_only


def _prefixed(first: bytes, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
    """``read``, with ``first`` read again before it."""
    held = [first]

    def again(n: int) -> bytes:
        if not held:
            return read(n)
        head = held.pop()
        if n <= len(head):
            if n < len(head):
                held.append(head[n:])
            return head[:n]
        return head + read(n - len(head))

    return again
