"""Reader for Quiver's `.qcsr` binary CSR (spec: compute/src/formats/qcsr.rs), for the peer scripts.

Maps the file and returns numpy views of its arrays: no parsing, no copy.
"""
import struct

import numpy as np

MAGIC = b"QUIVCSR\0"


def _pad64(n):
    return (n + 63) // 64 * 64


def read(path):
    """Returns (n, offsets u64[n+1], sources u32[m], out_degree u32[n])."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    head = bytes(raw[:64])
    if head[:8] != MAGIC:
        raise ValueError(f"{path}: not a qcsr file")
    version, flags, n, m = struct.unpack_from("<IIQQ", head, 8)
    if version != 1:
        raise ValueError(f"{path}: unsupported qcsr version {version}")
    pos = 64

    def take(dtype, count):
        nonlocal pos
        size = np.dtype(dtype).itemsize * count
        arr = raw[pos : pos + size].view(dtype)
        pos += _pad64(size)
        return arr

    offsets = take("<u8", n + 1)
    sources = take("<u4", m)
    if flags & 1:
        take("<f4", m)
    out_degree = take("<u4", n)
    return n, offsets.astype(np.int64), sources, out_degree
