"""Exceptions raised while reading or writing the VQNF bitstream.

Every error is a :class:`CodecError`, which is a :class:`ValueError`, so callers
that only care about "this input is not valid" can catch ``ValueError``.
"""

from __future__ import annotations

__all__ = [
    "CodecError",
    "BadMagicError",
    "UnsupportedVersionError",
    "ChecksumError",
    "TruncatedError",
    "FormatError",
    "UnsupportedMethodError",
]


class CodecError(ValueError):
    """Base class of all bitstream errors."""


class BadMagicError(CodecError):
    """The data does not start with the VQNF magic bytes."""


class UnsupportedVersionError(CodecError):
    """The file uses a major format version this reader does not understand."""


class ChecksumError(CodecError):
    """A stored CRC32 does not match the bytes it protects."""


class TruncatedError(CodecError):
    """The data ends before the structure it describes is complete."""


class FormatError(CodecError):
    """A structure is malformed (impossible field values, inconsistent lengths, ...)."""


class UnsupportedMethodError(CodecError):
    """A file or run names a method whose models this package cannot encode or decode."""
