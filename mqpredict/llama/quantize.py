"""llama.cpp's quantizer through its C API: real quantizations, and dry runs that let llama.cpp decide.

``llama_model_quantize`` with ``params.pure`` writes every quantizable tensor as one type; with
``params.tt_overrides`` it applies ``--tensor-type`` patterns (a ctypes array terminated by a NULL
pattern), byte-identical to ``llama-quantize``. ``params.dry_run`` prints, per tensor, the type
llama.cpp's rules choose (fallbacks included) without writing a file: that is how presets resolve.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Sequence
from pathlib import Path

from gguf.constants import GGMLQuantizationType

from mqpredict.errors import LlamaError
from mqpredict.llama import runtime
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import FTYPE, PURE_PRESET, Preset
from mqpredict.quant.resolve import EffectiveTypes, export_preset, tensor_type_lines
from mqpredict.quant.types import QuantType
from mqpredict.util.atomic import atomic_path

# "[  12/  30]   blk.1.attn_k.weight - [  256,   128,     1,     1], type =    f32, size = ... (q6_K)"
_DRY_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(\S+),\s+size\s+=.*?(?:\((\S+)\))?\s*$")


def _ggml_type(name: str) -> QuantType:
    return GGMLQuantizationType[name.upper()]


def parse_type_lines(lines: Sequence[str]) -> list[tuple[str, QuantType]]:
    """``pattern=type`` lines (llama-quantize's tensor-type file) → (pattern, type), lower-cased."""
    out = []
    for line in lines:
        pattern, _, t = line.strip().rpartition("=")
        out.append((pattern.lower(), _ggml_type(t)))
    return out


def _imatrix_params(llama_cpp, params, imatrix: Imatrix, keep: list) -> None:
    """What llama-quantize --imatrix passes: the per-tensor weights and the quantize.imatrix.* keys."""
    names = sorted(imatrix.entries)
    arr = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, name in enumerate(names):
        w = imatrix.entries[name]
        b = name.encode()
        keep += [b, w]
        arr[i].name = b
        arr[i].data = w.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = len(w)
    arr[len(names)].name = None
    keep.append(arr)
    params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    kvs = imatrix.output_kvs()
    over = (llama_cpp.llama_model_kv_override * (len(kvs) + 1))()
    for i, (key, value) in enumerate(kvs):
        over[i].key = key.encode()
        if isinstance(value, str):
            over[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            over[i].value.val_str = value.encode()
        else:
            over[i].tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            over[i].value.val_i64 = value
    over[len(kvs)].key = b""
    keep.append(over)
    params.kv_overrides = ctypes.cast(over, ctypes.POINTER(llama_cpp.llama_model_kv_override))


def quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike | None,
    preset: Preset,
    *,
    pure: bool = False,
    tensor_types: Sequence[tuple[str, QuantType]] = (),
    threads: int = 0,
    dry_run: bool = False,
    allow_requantize: bool = False,
    imatrix: Imatrix | None = None,
) -> list[str]:
    """Run llama.cpp's quantizer; return its log lines. ``dst`` is written atomically.

    With ``imatrix``, exactly what ``llama-quantize --imatrix`` does: the weights go to every tensor
    they name, the ``quantize.imatrix.*`` keys into the file, and llama.cpp's presets choose their types
    knowing that an imatrix is there."""
    llama_cpp = runtime.lib()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(FTYPE[preset])
    params.nthread = threads
    params.pure = pure
    params.dry_run = dry_run
    params.allow_requantize = allow_requantize
    keep: list = []
    if imatrix is not None:
        _imatrix_params(llama_cpp, params, imatrix, keep)
    if tensor_types:
        arr = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, qt) in enumerate(tensor_types):
            b = pattern.encode()
            keep.append(b)
            arr[i].pattern = b
            arr[i].type = int(qt)
        arr[len(tensor_types)].pattern = None
        arr[len(tensor_types)].type = 0
        keep.append(arr)
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    src = str(src)
    with runtime.LOG.capture() as lines:
        if dry_run:
            rc = llama_cpp.llama_model_quantize(src.encode(), b"", ctypes.byref(params))
        else:
            with atomic_path(dst, fsync=False) as tmp:
                rc = llama_cpp.llama_model_quantize(src.encode(), str(tmp).encode(), ctypes.byref(params))
                if rc != 0:
                    raise _failed(src, lines)
    if rc != 0:
        raise _failed(src, lines)
    return lines


def _failed(src: str, lines: list[str]) -> LlamaError:
    errs = [x.strip() for x in lines if "error" in x.lower() or "failed" in x.lower() or "exception" in x.lower()]
    why = " | ".join(errs[-3:]) or runtime.LOG.last_error()
    return LlamaError(f"llama.cpp could not quantize {src}: {why}", "run with --debug to see llama.cpp's log")


def parse_dry_run(lines: Sequence[str]) -> EffectiveTypes:
    types: EffectiveTypes = {}
    for line in lines:
        m = _DRY_LINE.match(line.strip())
        if m:
            name, cur, new = m.groups()
            types[name] = _ggml_type(new or cur)
    return types


def dry_run_types(model: ModelInfo, config: Config, threads: int = 0, imatrix: Imatrix | None = None) -> EffectiveTypes:
    """The per-tensor types llama.cpp writes for ``config`` on ``model`` (with or without an imatrix:
    some presets choose differently when one is given), decided by llama.cpp."""
    lines = quantize(
        model.path,
        None,
        export_preset(config),
        pure=not config.is_preset,
        tensor_types=parse_type_lines(tensor_type_lines(model, config)),
        threads=threads,
        dry_run=True,
        allow_requantize=True,
        imatrix=imatrix,
    )
    types = parse_dry_run(lines)
    missing = [t.name for t in model.tensors if t.name not in types]
    if missing:
        raise LlamaError(
            f"llama.cpp's dry run on {model.path} reported no type for {len(missing)} tensors (e.g. {missing[0]})",
            "this llama.cpp build may not support the model's architecture; run with --debug",
        )
    return types


def pure_quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    qtype: QuantType,
    threads: int = 0,
    allow_requantize: bool = False,
    imatrix: Imatrix | None = None,
    keep_types: Sequence[tuple[str, QuantType]] = (),
) -> Path:
    """Every quantizable tensor of ``src`` as ``qtype`` (llama.cpp's fallbacks apply) → ``dst``.

    ``keep_types`` (tensor patterns → type) spare tensors llama.cpp could not write at ``qtype`` — the
    low-bit IQ types need imatrix weights, which no imatrix holds for ``token_embd``."""
    quantize(src, dst, PURE_PRESET[qtype], pure=True, threads=threads, allow_requantize=allow_requantize,
             imatrix=imatrix, tensor_types=keep_types)  # fmt: skip
    return Path(dst)
