"""Damaging saved files on purpose, for the tests of what pyinf does with a damaged file."""
import json
import struct


def flip_tensor_byte(path, key: str) -> None:
    """Flips a byte in the middle of tensor ``key``'s data in the safetensors file at ``path``
    (its header, which says where each tensor's bytes are, stays whole)."""
    raw = bytearray(path.read_bytes())
    (size,) = struct.unpack("<Q", raw[:8])
    start, end = json.loads(raw[8:8 + size])[key]["data_offsets"]
    raw[8 + size + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
