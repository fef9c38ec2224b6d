"""Layer-truncated variants of a base: its first k blocks, real weights, a different "model".

llama.cpp prunes the layers (``llama_model_quantize`` with ``prune_layers``, a plain F32 copy of the
rest), then mqpredict records the variant's identity: same family as its source, its own name and an
origin that says what was done (``dither:Q4_1+Q8_0+first8of30``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.quant.header import read_header
from mqpredict.quant.model import KEY_FAMILY, KEY_ORIGIN, ModelInfo
from mqpredict.records.identity import family_name
from mqpredict.quant.ggufwrite import FileRange, TensorOut, copied_kvs, kv_str, write_gguf


def truncate(base: str | os.PathLike, out: str | os.PathLike, keep: int) -> Path:
    """Write the first ``keep`` blocks of ``base`` (an F32/F16 base) to ``out``."""
    import ctypes

    from mqpredict.llama import runtime
    from mqpredict.llama.quantize import _failed
    from mqpredict.quant.presets import FTYPE, Preset

    m = ModelInfo.load(base)
    if not 0 < keep < m.n_layers:
        raise InputError(f"cannot keep {keep} of {m.n_layers} blocks of {m.path.name}", f"choose 1…{m.n_layers - 1}")
    lib = runtime.lib()
    prune = (ctypes.c_int32 * (m.n_layers - keep + 1))(*range(keep, m.n_layers), -1)
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(FTYPE[Preset.F32])
    params.pure = True
    params.prune_layers = ctypes.cast(prune, ctypes.POINTER(ctypes.c_int32))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".truncate-") as d:
        tmp = Path(d) / "pruned.gguf"
        with runtime.LOG.capture() as lines:
            if lib.llama_model_quantize(str(m.path).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
                raise _failed(str(m.path), lines)
        h = read_header(tmp)
        origin = f"{m.base_origin}+first{keep}of{m.n_layers}"
        name = f"{m.name} (first {keep} of {m.n_layers} blocks)"
        kvs = copied_kvs(h, {KEY_ORIGIN, KEY_FAMILY, "general.name"}) + [
            kv_str("general.name", name),
            kv_str(KEY_ORIGIN, origin),
            kv_str(KEY_FAMILY, family_name(m)),
        ]
        tensors = [TensorOut(t.name, t.shape, t.qtype, FileRange(tmp, h.data_offset + t.offset)) for t in h.tensors]
        write_gguf(out, kvs, tensors, h.alignment)
    return out
