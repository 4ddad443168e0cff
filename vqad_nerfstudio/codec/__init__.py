"""Pure bitstream codec of the VQNF file format.

Depends only on the standard library, numpy and (for entropy coding)
constriction, so a file can be decoded without torch or nerfstudio.
See ``docs/format.md`` for the byte-level specification.
"""

from .arrays import decode_array, decode_named_arrays, encode_array, encode_named_arrays
from .bitpack import pack_bits, packed_size, unpack_bits
from .container import (
    END_TAG,
    FORMAT_VERSION,
    MAGIC,
    NO_LOD,
    REQUIRING_VERSION,
    Chunk,
    Container,
    check_requirements,
    describe,
    read_container,
    read_header,
    write_container,
    write_container_file,
)
from .entropy import (
    ContextMode,
    FrequencyTable,
    decode_categorical,
    decode_with_tables,
    encode_categorical,
    encode_with_tables,
    entropy_bits,
    quantize_pmf,
    rescale_frequencies,
    tables_from_bytes,
    tables_to_bytes,
)
from .errors import (
    BadMagicError,
    ChecksumError,
    CodecError,
    FormatError,
    TruncatedError,
    UnsupportedMethodError,
    UnsupportedVersionError,
)
from .neighbour_indices import decode_neighbour_indices, encode_neighbour_indices
from .varint import decode_svarint, decode_uvarint, decode_uvarints, encode_svarint, encode_uvarint, encode_uvarints

__all__ = [
    "BadMagicError",
    "ChecksumError",
    "Chunk",
    "CodecError",
    "Container",
    "ContextMode",
    "END_TAG",
    "FORMAT_VERSION",
    "REQUIRING_VERSION",
    "check_requirements",
    "FormatError",
    "FrequencyTable",
    "MAGIC",
    "NO_LOD",
    "TruncatedError",
    "UnsupportedMethodError",
    "UnsupportedVersionError",
    "decode_array",
    "decode_categorical",
    "decode_named_arrays",
    "decode_neighbour_indices",
    "decode_svarint",
    "decode_uvarint",
    "decode_uvarints",
    "decode_with_tables",
    "describe",
    "encode_array",
    "encode_categorical",
    "encode_named_arrays",
    "encode_neighbour_indices",
    "encode_svarint",
    "encode_uvarint",
    "encode_uvarints",
    "encode_with_tables",
    "entropy_bits",
    "pack_bits",
    "packed_size",
    "quantize_pmf",
    "read_container",
    "read_header",
    "rescale_frequencies",
    "tables_from_bytes",
    "tables_to_bytes",
    "unpack_bits",
    "write_container",
    "write_container_file",
]
