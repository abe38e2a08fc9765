"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzipped).

An IDX file is two zero bytes, a type code, the number of dimensions, that many
big-endian uint32 sizes, then the array in big-endian C order. Every check that fails
raises a one-line ValueError naming the file, so a truncated download is reported as
such instead of surfacing later as a reshape error.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

# Type code -> big-endian element type, from the format's definition.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
    """Whole file contents, gunzipped when the name ends in ``.gz``."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ValueError(f"IDX file {path} does not exist: check the path or --data_dir") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise ValueError(
            f"IDX file {path} is corrupt or truncated ({type(e).__name__}: {e}); "
            "download it again"
        ) from None


def parse_idx(data: bytes, source: str = "<bytes>") -> np.ndarray:
    """Parses IDX bytes into a native-endian array; ``source`` names it in errors."""
    if len(data) < 4:
        raise ValueError(
            f"IDX file {source} is truncated: {len(data)} bytes, shorter than the 4-byte "
            "header; download it again"
        )
    if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"IDX file {source} has a bad magic number {data[:4].hex()} (expected "
            "0000 then a type code and a rank): it is not an IDX file; download it again"
        )
    dtype = _IDX_DTYPES[data[2]]
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise ValueError(
            f"IDX file {source} is truncated inside its header ({len(data)} of "
            f"{header_size} bytes); download it again"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"IDX file {source} is {what}: {len(data)} bytes, expected {expected} for "
            f"shape {shape}; download it again"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file (``.gz`` or plain) into a native-endian NumPy array."""
    path = os.fspath(path)
    return parse_idx(_read_bytes(path), source=path)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Writes ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``).

    Used by the tests to make small fixtures; also handy to export a subset.
    """
    path = os.fspath(path)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of {list(codes)}")
    header = bytes([0, 0, codes[native], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=native.newbyteorder(">")).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
