"""Codecs that store tensors compactly inside an artifact (format: docs/codec.md)."""

from .bitpack import MAX_BITS, pack, packed_nbytes, unpack, unpacked_dtype

__all__ = ["MAX_BITS", "pack", "packed_nbytes", "unpack", "unpacked_dtype"]
