"""llama.cpp's own quantizer on rows in memory: ``ggml_quantize_chunk`` and ggml's row dequantizers.

``ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix)`` (exported by llama-cpp-python's
``libggml-base``) is the function llama-quantize calls for every slab of rows (``llama_tensor_quantize_impl``
in ``src/llama-quant.cpp``), with the imatrix's weights of the tensor — of the tensor's expert for a 3-D
tensor. Rows are quantized independently, so quantizing a sample of rows here gives exactly the bytes those
rows have in the file llama-quantize writes (tested); no file, no full-model pass.

``dequantize_row_<type>`` (also exported) turns the bytes back into float32, as llama.cpp reads them.
ctypes releases the GIL during both calls, so threads quantize different tensors in parallel.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

import numpy as np

from mqpredict.errors import LlamaError
from mqpredict.quant.header import tensor_nbytes
from mqpredict.quant.types import QuantType, T

_C_FLOAT_P = ctypes.c_void_p


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    """libggml-base of the installed llama-cpp-python (the library llama-quantize's code runs in)."""
    from mqpredict.llama import runtime

    folder = Path(runtime.lib().__file__).parent / "lib"
    found = sorted(folder.glob("libggml-base.*")) + sorted(folder.glob("ggml-base.*"))
    if not found:
        raise LlamaError(f"no libggml-base in {folder}", "reinstall llama-cpp-python as the README set-up does")
    lib = ctypes.CDLL(str(found[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, _C_FLOAT_P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, _C_FLOAT_P]  # fmt: skip
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


@lru_cache(maxsize=None)
def _dequantizer(qtype: QuantType):
    lib = _lib()
    name = lib.ggml_type_name(int(qtype)).decode()
    try:
        fn = getattr(lib, f"dequantize_row_{name}")
    except AttributeError:
        raise LlamaError(f"this llama.cpp build has no dequantizer for {qtype.name}") from None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, _C_FLOAT_P, ctypes.c_int64]
    return fn


def requires_imatrix(qtype: QuantType) -> bool:
    """ggml cannot quantize ``qtype`` at all without importance weights (it would abort the process)."""
    return bool(_lib().ggml_quantize_requires_imatrix(int(qtype)))


def row_size(qtype: QuantType, n_per_row: int) -> int:
    return tensor_nbytes((n_per_row, 1), qtype)


def quantize_rows(qtype: QuantType, rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (n × n_per_row float32) quantized by llama.cpp as ``qtype`` with the importance ``weights``
    (n_per_row float32, or None) → n × row-size bytes, exactly what llama-quantize writes for those rows."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError("quantize_rows needs a 2-D array of rows")
    n, n_per_row = rows.shape
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (n_per_row,):
            raise ValueError(f"importance weights of length {weights.shape} for rows of {n_per_row}")
    elif requires_imatrix(qtype):
        raise LlamaError(f"{qtype.name} cannot be quantized without importance-matrix weights",
                         "pass --imatrix FILE")  # fmt: skip
    size = row_size(qtype, n_per_row)
    if _lib().ggml_row_size(int(qtype), n_per_row) != size:
        raise LlamaError(f"ggml's row size of {qtype.name} differs from gguf's table", "reinstall llama-cpp-python")
    out = np.empty((n, size), dtype=np.uint8)
    if n == 0:
        return out
    got = _lib().ggml_quantize_chunk(int(qtype), rows.ctypes.data, out.ctypes.data, 0, n, n_per_row,
                                     None if weights is None else weights.ctypes.data)  # fmt: skip
    if got != out.nbytes:
        raise LlamaError(f"ggml_quantize_chunk wrote {got} bytes for {n} rows of {qtype.name}, expected {out.nbytes}")
    return out


def dequantize_rows(qtype: QuantType, raw: np.ndarray, n_per_row: int) -> np.ndarray:
    """Rows of ``qtype`` bytes (n × row-size) → n × n_per_row float32, as llama.cpp reads them."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.size // row_size(qtype, n_per_row)
    if qtype == T.F32:
        return raw.view(np.float32).reshape(n, n_per_row).copy()
    if qtype == T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(n, n_per_row)
    if qtype == T.BF16:
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(n, n_per_row)
    out = np.empty((n, n_per_row), dtype=np.float32)
    if n:
        _dequantizer(qtype)(raw.ctypes.data, out.ctypes.data, n * n_per_row)
    return out

