"""The VQNF container: a JSON header followed by CRC-protected, tagged chunks.

Layout (little-endian; full specification in ``docs/format.md``)::

    "VQNF" | major u8 | minor u8 | header length u32 | header CRC32 u32 | header (UTF-8 JSON)
    first chunk (since 1.1): tag "SIZE", lod 255, payload: the complete file's size, u64
    chunk*: tag 4s | lod u8 | flags u8 | reserved u16 | payload length u32 | CRC32 u32 | payload
    final chunk: tag "END!", lod 255, empty payload

The SIZE chunk tells a file cut short (truncated: fewer bytes than it records) from a damaged one (a chunk
length that runs past the recorded end).

Producers write chunks coarse to fine, so every prefix that ends on a chunk
boundary holds a complete coarser model; :func:`read_container` with
``allow_truncated=True`` returns exactly those complete chunks.
"""

from __future__ import annotations

import json
import operator
import os
import re
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

from .errors import BadMagicError, ChecksumError, FormatError, TruncatedError, UnsupportedVersionError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "REQUIRING_VERSION",
    "END_TAG",
    "SIZE_TAG",
    "NO_LOD",
    "MAX_FILE_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_HEADER_DEPTH",
    "Chunk",
    "Container",
    "write_container",
    "write_container_file",
    "read_container",
    "load_source",
    "describe",
    "check_requirements",
]

MAGIC = b"VQNF"
FORMAT_VERSION = (1, 1)
"""The version of files whose header lists no requirements: every 1.x reader reads them."""
REQUIRING_VERSION = (2, 0)
"""The version of files whose header lists ``requires``, features a reader must implement to decode the file (1.x
readers refuse them by their major version; see :func:`check_requirements`)."""
SUPPORTED_MAJORS = (1, 2)
END_TAG = "END!"
SIZE_TAG = "SIZE"
_CONTAINER_TAGS = (END_TAG, SIZE_TAG)
NO_LOD = 255
MAX_FILE_BYTES = 1 << 31
"""Largest file the reader loads (2 GiB)."""
MAX_HEADER_BYTES = 1 << 16
"""Largest header (64 KiB)."""
MAX_HEADER_DEPTH = 16
"""Deepest nesting of arrays and objects in a header."""
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_PREAMBLE = struct.Struct("<4sBBII")  # magic, major, minor, header length, header CRC32
_CHUNK_HEAD = struct.Struct("<4sBBHI")  # tag, lod, flags, reserved, payload length (CRC32 follows)
_CRC = struct.Struct("<I")
_SIZE = struct.Struct("<Q")
CHUNK_OVERHEAD = _CHUNK_HEAD.size + _CRC.size

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


def _check_tag(tag: object) -> str:
    if not (isinstance(tag, str) and len(tag) == 4 and all(" " <= ch <= "~" for ch in tag)):
        raise ValueError(f"chunk tag must be 4 printable ASCII characters, got {tag!r}")
    return tag


@dataclass(frozen=True)
class Chunk:
    """One tagged payload; ``lod`` is a level of detail 0..254, or None when not tied to one."""

    tag: str
    lod: int | None
    payload: bytes

    def __post_init__(self) -> None:
        _check_tag(self.tag)
        if self.lod is not None:
            try:
                lod = operator.index(self.lod)
            except TypeError:
                lod = -1
            if isinstance(self.lod, bool) or not 0 <= lod < NO_LOD:
                raise ValueError(f"chunk {self.tag!r}: lod must be None or an int in 0..{NO_LOD - 1}, got {self.lod!r}")
            object.__setattr__(self, "lod", lod)
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise ValueError(f"chunk {self.tag!r}: payload must be bytes, got {type(self.payload).__name__}")
        object.__setattr__(self, "payload", bytes(self.payload))


@dataclass
class Container:
    """A parsed file. ``chunks`` excludes the SIZE and END! chunks; ``complete`` tells whether END! was present;
    ``file_bytes`` is the complete file's size its SIZE chunk records (None in a 1.0 file)."""

    version: tuple[int, int]
    header: dict[str, Any]
    chunks: list[Chunk]
    complete: bool
    bytes_read: int
    file_bytes: int | None = None


def _header_bytes(header: Mapping[str, Any]) -> bytes:
    if not isinstance(header, Mapping):
        raise ValueError(f"header must be a mapping, got {type(header).__name__}")
    text = json.dumps(dict(header), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = text.encode("utf-8")
    if len(data) > MAX_HEADER_BYTES or _nesting_depth(data) > MAX_HEADER_DEPTH:
        raise ValueError(f"header must be at most {MAX_HEADER_BYTES} bytes nested at most {MAX_HEADER_DEPTH} deep")
    return data


def _nesting_depth(text: bytes) -> int:
    """Deepest nesting of JSON arrays and objects in ``text`` (brackets inside strings do not count)."""
    depth = deepest = 0
    for char in _JSON_STRING.sub(b'""', text):
        if char in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in b"]}":
            depth -= 1
    return deepest


def _header_crc(major: int, minor: int, header: bytes) -> int:
    return zlib.crc32(header, zlib.crc32(struct.pack("<BBI", major, minor, len(header))))


def _chunk_bytes(tag: str, lod: int, payload: bytes) -> bytes:
    head = _CHUNK_HEAD.pack(tag.encode("ascii"), lod, 0, 0, len(payload))
    return head + _CRC.pack(zlib.crc32(payload, zlib.crc32(head))) + payload


def write_container(header: Mapping[str, Any], chunks: Iterable[Chunk]) -> bytes:
    """Serialise a header and chunks (in the given order) into a complete VQNF file.

    The header is written as compact JSON with sorted keys, so equal inputs give
    equal bytes. LOD-tagged chunks must come in non-decreasing ``lod`` order.
    """
    header_bytes = _header_bytes(header)
    major, minor = REQUIRING_VERSION if header.get("requires") else FORMAT_VERSION
    parts = [
        _PREAMBLE.pack(MAGIC, major, minor, len(header_bytes), _header_crc(major, minor, header_bytes)),
        header_bytes,
    ]
    last_lod: int | None = None
    for index, chunk in enumerate(chunks):
        if not isinstance(chunk, Chunk):
            raise ValueError(f"chunk {index}: expected a Chunk, got {type(chunk).__name__}")
        if chunk.tag in _CONTAINER_TAGS:
            raise ValueError(f"chunk {index}: tag {chunk.tag!r} is reserved for the container's own chunks")
        if chunk.lod is not None:
            if last_lod is not None and chunk.lod < last_lod:
                raise ValueError(
                    f"chunk {index} {chunk.tag!r} has lod {chunk.lod} after a chunk with lod {last_lod}; "
                    "chunks must go from coarse to fine"
                )
            last_lod = chunk.lod
        if len(chunk.payload) > 0xFFFFFFFF:
            raise ValueError(f"chunk {index} {chunk.tag!r}: payload of {len(chunk.payload)} bytes exceeds 2**32 - 1")
        parts.append(_chunk_bytes(chunk.tag, NO_LOD if chunk.lod is None else chunk.lod, chunk.payload))
    parts.append(_chunk_bytes(END_TAG, NO_LOD, b""))
    size_chunk_bytes = CHUNK_OVERHEAD + _SIZE.size
    file_bytes = sum(len(part) for part in parts) + size_chunk_bytes
    parts.insert(2, _chunk_bytes(SIZE_TAG, NO_LOD, _SIZE.pack(file_bytes)))
    return b"".join(parts)


def write_container_file(
    path: str | os.PathLike[str],
    header: Mapping[str, Any],
    chunks: Iterable[Chunk],
    overwrite: bool = False,
) -> int:
    """Write a VQNF file atomically (temporary file + rename); return its size in bytes.

    Raises ``FileExistsError`` if ``path`` exists and ``overwrite`` is False.
    """
    path = os.fspath(path)
    data = write_container(header, chunks)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(f"{path} already exists (pass overwrite=True to replace it)")
    directory, name = os.path.split(os.path.abspath(path))
    temp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    handle = open(temp, "xb")
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        os.remove(temp)
        raise
    return len(data)


def load_source(source: Source) -> bytes:
    """The bytes of ``source`` (bytes, or a file's path); FormatError if over :data:`MAX_FILE_BYTES`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    else:
        raise TypeError(f"expected bytes or a path, got {type(source).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise FormatError(f"file larger than {MAX_FILE_BYTES} bytes; VQNF readers load at most that")
    return data


def _read_preamble(data: bytes) -> tuple[int, int, dict[str, Any], int]:
    """Check magic, version and header; return ``(major, minor, header, offset after header)``."""
    if data[:4] != MAGIC[: len(data)]:
        raise BadMagicError(f"not a VQNF file: starts with {data[:4]!r}, expected {MAGIC!r}")
    if len(data) < _PREAMBLE.size:
        raise TruncatedError(f"file truncated inside the {_PREAMBLE.size}-byte preamble ({len(data)} bytes)")
    _, major, minor, header_length, stored = _PREAMBLE.unpack_from(data)
    if major not in SUPPORTED_MAJORS:
        handled = " and ".join(f"{supported}.x" for supported in SUPPORTED_MAJORS)
        raise UnsupportedVersionError(
            f"format version {major}.{minor} is not supported (this reader handles {handled})"
        )
    if header_length > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_length} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    end = _PREAMBLE.size + header_length
    if len(data) < end:
        raise TruncatedError(f"file truncated inside the header ({len(data)} of {end} bytes)")
    header_bytes = data[_PREAMBLE.size : end]
    computed = _header_crc(major, minor, header_bytes)
    if computed != stored:
        raise ChecksumError(f"header: CRC32 mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})")
    if _nesting_depth(header_bytes) > MAX_HEADER_DEPTH:
        raise FormatError(f"header nests arrays and objects more than {MAX_HEADER_DEPTH} deep")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"header is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FormatError(f"header must be a JSON object, got {type(header).__name__}")
    return major, minor, header, end


def read_header(source: Source) -> dict[str, Any]:
    """The verified JSON header of a VQNF file (magic, version and header CRC checked; chunks not read)."""
    return _read_preamble(load_source(source))[2]


def check_requirements(header: Mapping[str, Any], known: Iterable[str]) -> None:
    """``UnsupportedVersionError`` unless every feature the header ``requires`` is among ``known`` (the features the
    caller's decoder implements); ``FormatError`` if ``requires`` is not a list of strings."""
    required = header.get("requires", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        raise FormatError(f"header: requires must be a list of feature names, got {required!r}")
    missing = sorted(set(required) - set(known))
    if missing:
        raise UnsupportedVersionError(f"the file requires {', '.join(missing)}, which this reader does not implement")


def read_container(source: Source, allow_truncated: bool = False) -> Container:
    """Parse and verify a VQNF file from bytes or a path.

    Raises BadMagicError, UnsupportedVersionError (a major version other than 1 and 2),
    ChecksumError, FormatError, or TruncatedError when the data stops before the
    END! chunk. With ``allow_truncated=True`` a file cut after its header yields
    the complete chunks only, with ``complete=False``; a truncated preamble or
    header always raises. A chunk that runs past the end its file's SIZE chunk
    records is damaged, not truncated: FormatError.
    """
    data = load_source(source)
    major, minor, header, offset = _read_preamble(data)
    chunks: list[Chunk] = []
    file_bytes: int | None = None
    complete = False
    problem = "it has no END! chunk"
    index = 0
    while offset < len(data):
        if file_bytes is not None and offset + CHUNK_OVERHEAD > file_bytes:
            raise FormatError(f"chunk {index} starts at byte {offset}, past the file's end ({file_bytes} bytes)")
        if len(data) - offset < CHUNK_OVERHEAD:
            problem = f"it ends inside the header of chunk {index}"
            break
        raw_tag, lod, _flags, _reserved, length = _CHUNK_HEAD.unpack_from(data, offset)
        (stored,) = _CRC.unpack_from(data, offset + _CHUNK_HEAD.size)
        start, end = offset + CHUNK_OVERHEAD, offset + CHUNK_OVERHEAD + length
        tag = raw_tag.decode("latin-1")
        if file_bytes is not None and end > file_bytes:
            raise FormatError(
                f"chunk {index} {tag!r} lod {lod}: its length ({length} bytes) runs past the file's end "
                f"({file_bytes} bytes, as its SIZE chunk records); the chunk header is damaged"
            )
        if end > len(data):
            problem = f"it ends inside chunk {index} ({len(data) - start} of {length} payload bytes)"
            break
        payload = data[start:end]
        computed = zlib.crc32(payload, zlib.crc32(data[offset : offset + _CHUNK_HEAD.size]))
        if computed != stored:
            raise ChecksumError(
                f"chunk {index} {tag!r} lod {lod}: CRC32 mismatch (stored 0x{stored:08x}, computed 0x{computed:08x})"
            )
        try:
            _check_tag(tag)
        except ValueError as exc:
            raise FormatError(f"chunk {index}: {exc}") from None
        if index == 0 and (major, minor) >= (1, 1):
            file_bytes = _size_chunk(tag, lod, payload, end)
        elif tag == SIZE_TAG:
            raise FormatError(f"chunk {index}: a {SIZE_TAG} chunk is only valid first, in a 1.1 or later file")
        offset, index = end, index + 1
        if tag == END_TAG:
            if length or offset != len(data) or (file_bytes is not None and offset != file_bytes):
                raise FormatError(
                    f"chunk {index - 1} END!: payload of {length} bytes and {len(data) - offset} bytes after it, "
                    f"ending at byte {offset} of a file of {file_bytes or len(data)} bytes; it must be empty and last"
                )
            complete = True
            break
        if tag != SIZE_TAG:
            chunks.append(Chunk(tag, None if lod == NO_LOD else lod, payload))
    if not complete and file_bytes is not None and len(data) >= file_bytes:
        raise FormatError(f"the file holds all its {file_bytes} bytes but no END! chunk where they end")
    if not complete and not allow_truncated:
        size = "" if file_bytes is None else f" of the {file_bytes} its SIZE chunk records"
        raise TruncatedError(f"file truncated: {problem}; {len(chunks)} complete chunks read ({offset} bytes{size})")
    return Container((major, minor), header, chunks, complete, offset, file_bytes)


def _size_chunk(tag: str, lod: int, payload: bytes, end: int) -> int:
    """The complete file size a SIZE chunk (ending at byte ``end``) records; FormatError if it is not one."""
    if tag != SIZE_TAG or lod != NO_LOD or len(payload) != _SIZE.size:
        raise FormatError(
            f"chunk 0 is {tag!r} lod {lod} ({len(payload)} bytes); the first chunk of a 1.1 or later file is its "
            f"{SIZE_TAG} chunk (lod {NO_LOD}, {_SIZE.size} bytes)"
        )
    (file_bytes,) = _SIZE.unpack(payload)
    if file_bytes < end + CHUNK_OVERHEAD:
        raise FormatError(f"the {SIZE_TAG} chunk records {file_bytes} bytes, less than the file's first chunks")
    return file_bytes


def describe(container: Container) -> list[dict[str, Any]]:
    """Per-chunk size table: tag, lod, payload bytes, chunk bytes and cumulative file bytes at its end.

    The first chunk's ``end`` includes the preamble and header; a 1.1 file's
    first row is its SIZE chunk; a complete container gets a final END! row
    whose ``end`` equals the file size.
    """
    rows = [(c.tag, c.lod, len(c.payload)) for c in container.chunks]
    if container.file_bytes is not None:
        rows.insert(0, (SIZE_TAG, None, _SIZE.size))
    if container.complete:
        rows.append((END_TAG, None, 0))
    position = container.bytes_read - sum(CHUNK_OVERHEAD + size for _, _, size in rows)
    table = []
    for index, (tag, lod, size) in enumerate(rows):
        position += CHUNK_OVERHEAD + size
        table.append(
            {
                "index": index,
                "tag": tag,
                "lod": lod,
                "payload_bytes": size,
                "chunk_bytes": CHUNK_OVERHEAD + size,
                "end": position,
            }
        )
    return table
