"""llama.cpp's presets (file types) as a table of facts.

A **preset** is a named config family of llama.cpp (``Q4_K_M`` …): its per-tensor types come from
llama.cpp's own rules on the actual model, which mqpredict never re-implements — it asks llama.cpp
(a dry run, :func:`mqpredict.llama.quantize.dry_run`). This module only knows the names
``llama-quantize`` accepts, their ``llama_ftype`` numbers (from gguf's ``LlamaFileType``), the default
type of each (``llama_ftype_get_default_type``), and which file type produces a *pure* file of a
given quant type.
"""

from __future__ import annotations

from enum import StrEnum

from gguf.constants import LlamaFileType as F

from mqpredict.errors import InputError
from mqpredict.quant.types import QuantType, T


class Preset(StrEnum):
    """The names ``llama-quantize`` accepts (QUANT_OPTIONS), aliases and COPY excluded."""

    Q4_0 = "Q4_0"
    Q4_1 = "Q4_1"
    MXFP4_MOE = "MXFP4_MOE"
    Q5_0 = "Q5_0"
    Q5_1 = "Q5_1"
    IQ2_XXS = "IQ2_XXS"
    IQ2_XS = "IQ2_XS"
    IQ2_S = "IQ2_S"
    IQ2_M = "IQ2_M"
    IQ1_S = "IQ1_S"
    IQ1_M = "IQ1_M"
    TQ1_0 = "TQ1_0"
    TQ2_0 = "TQ2_0"
    Q2_K = "Q2_K"
    Q2_K_S = "Q2_K_S"
    IQ3_XXS = "IQ3_XXS"
    IQ3_S = "IQ3_S"
    IQ3_M = "IQ3_M"
    IQ3_XS = "IQ3_XS"
    Q3_K_S = "Q3_K_S"
    Q3_K_M = "Q3_K_M"
    Q3_K_L = "Q3_K_L"
    IQ4_NL = "IQ4_NL"
    IQ4_XS = "IQ4_XS"
    Q4_K_S = "Q4_K_S"
    Q4_K_M = "Q4_K_M"
    Q5_K_S = "Q5_K_S"
    Q5_K_M = "Q5_K_M"
    Q6_K = "Q6_K"
    Q8_0 = "Q8_0"
    F16 = "F16"
    BF16 = "BF16"
    F32 = "F32"


#: llama-quantize's aliases ("Q4_K" means Q4_K_M there, and here).
ALIASES: dict[str, Preset] = {"Q3_K": Preset.Q3_K_M, "Q4_K": Preset.Q4_K_M, "Q5_K": Preset.Q5_K_M}

FTYPE: dict[Preset, F] = {
    Preset.Q4_0: F.MOSTLY_Q4_0, Preset.Q4_1: F.MOSTLY_Q4_1, Preset.MXFP4_MOE: F.MOSTLY_MXFP4_MOE,
    Preset.Q5_0: F.MOSTLY_Q5_0, Preset.Q5_1: F.MOSTLY_Q5_1, Preset.IQ2_XXS: F.MOSTLY_IQ2_XXS,
    Preset.IQ2_XS: F.MOSTLY_IQ2_XS, Preset.IQ2_S: F.MOSTLY_IQ2_S, Preset.IQ2_M: F.MOSTLY_IQ2_M,
    Preset.IQ1_S: F.MOSTLY_IQ1_S, Preset.IQ1_M: F.MOSTLY_IQ1_M, Preset.TQ1_0: F.MOSTLY_TQ1_0,
    Preset.TQ2_0: F.MOSTLY_TQ2_0, Preset.Q2_K: F.MOSTLY_Q2_K, Preset.Q2_K_S: F.MOSTLY_Q2_K_S,
    Preset.IQ3_XXS: F.MOSTLY_IQ3_XXS, Preset.IQ3_S: F.MOSTLY_IQ3_S, Preset.IQ3_M: F.MOSTLY_IQ3_M,
    Preset.IQ3_XS: F.MOSTLY_IQ3_XS, Preset.Q3_K_S: F.MOSTLY_Q3_K_S, Preset.Q3_K_M: F.MOSTLY_Q3_K_M,
    Preset.Q3_K_L: F.MOSTLY_Q3_K_L, Preset.IQ4_NL: F.MOSTLY_IQ4_NL, Preset.IQ4_XS: F.MOSTLY_IQ4_XS,
    Preset.Q4_K_S: F.MOSTLY_Q4_K_S, Preset.Q4_K_M: F.MOSTLY_Q4_K_M, Preset.Q5_K_S: F.MOSTLY_Q5_K_S,
    Preset.Q5_K_M: F.MOSTLY_Q5_K_M, Preset.Q6_K: F.MOSTLY_Q6_K, Preset.Q8_0: F.MOSTLY_Q8_0,
    Preset.F16: F.MOSTLY_F16, Preset.BF16: F.MOSTLY_BF16, Preset.F32: F.ALL_F32,
}  # fmt: skip

#: llama_ftype_get_default_type
DEFAULT_TYPE: dict[Preset, QuantType] = {
    Preset.Q4_0: T.Q4_0, Preset.Q4_1: T.Q4_1, Preset.MXFP4_MOE: T.MXFP4, Preset.Q5_0: T.Q5_0,
    Preset.Q5_1: T.Q5_1, Preset.IQ2_XXS: T.IQ2_XXS, Preset.IQ2_XS: T.IQ2_XS, Preset.IQ2_S: T.IQ2_XS,
    Preset.IQ2_M: T.IQ2_S, Preset.IQ1_S: T.IQ1_S, Preset.IQ1_M: T.IQ1_M, Preset.TQ1_0: T.TQ1_0,
    Preset.TQ2_0: T.TQ2_0, Preset.Q2_K: T.Q2_K, Preset.Q2_K_S: T.Q2_K, Preset.IQ3_XXS: T.IQ3_XXS,
    Preset.IQ3_S: T.IQ3_S, Preset.IQ3_M: T.IQ3_S, Preset.IQ3_XS: T.IQ3_S, Preset.Q3_K_S: T.Q3_K,
    Preset.Q3_K_M: T.Q3_K, Preset.Q3_K_L: T.Q3_K, Preset.IQ4_NL: T.IQ4_NL, Preset.IQ4_XS: T.IQ4_XS,
    Preset.Q4_K_S: T.Q4_K, Preset.Q4_K_M: T.Q4_K, Preset.Q5_K_S: T.Q5_K, Preset.Q5_K_M: T.Q5_K,
    Preset.Q6_K: T.Q6_K, Preset.Q8_0: T.Q8_0, Preset.F16: T.F16, Preset.BF16: T.BF16, Preset.F32: T.F32,
}  # fmt: skip

#: the file type whose ``--pure`` quantization writes every quantizable tensor as this type
PURE_PRESET: dict[QuantType, Preset] = {
    T.F32: Preset.F32, T.F16: Preset.F16, T.BF16: Preset.BF16, T.Q8_0: Preset.Q8_0, T.Q6_K: Preset.Q6_K,
    T.Q5_K: Preset.Q5_K_M, T.Q5_1: Preset.Q5_1, T.Q5_0: Preset.Q5_0, T.Q4_K: Preset.Q4_K_M,
    T.Q4_1: Preset.Q4_1, T.Q4_0: Preset.Q4_0, T.IQ4_NL: Preset.IQ4_NL, T.IQ4_XS: Preset.IQ4_XS,
    T.MXFP4: Preset.MXFP4_MOE, T.Q3_K: Preset.Q3_K_M, T.IQ3_S: Preset.IQ3_S, T.IQ3_XXS: Preset.IQ3_XXS,
    T.Q2_K: Preset.Q2_K, T.IQ2_S: Preset.IQ2_M, T.IQ2_XS: Preset.IQ2_XS, T.IQ2_XXS: Preset.IQ2_XXS,
    T.TQ2_0: Preset.TQ2_0, T.TQ1_0: Preset.TQ1_0, T.IQ1_M: Preset.IQ1_M, T.IQ1_S: Preset.IQ1_S,
}  # fmt: skip

#: presets built for use with an importance matrix: mqpredict asks for one (llama.cpp itself refuses
#: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and Q2_K_S without one; IQ2_M, IQ3_XS, IQ3_S and IQ3_M
#: mix in those types or are published only as imatrix builds)
IMATRIX_PRESETS: tuple[Preset, ...] = (
    Preset.IQ3_M, Preset.IQ3_S, Preset.IQ3_XS, Preset.IQ3_XXS, Preset.Q2_K_S, Preset.IQ2_M, Preset.IQ2_S,
    Preset.IQ2_XS, Preset.IQ2_XXS, Preset.IQ1_M, Preset.IQ1_S,
)  # fmt: skip

#: presets a seed/demo measures by default (the ones people publish), high to low
STANDARD_PRESETS: tuple[Preset, ...] = (
    Preset.Q8_0, Preset.Q6_K, Preset.Q5_K_M, Preset.Q5_0, Preset.Q4_K_M, Preset.Q4_1,
    Preset.IQ4_NL, Preset.Q4_0, Preset.Q3_K_M, Preset.Q2_K,
)  # fmt: skip


def parse_preset(text: str) -> Preset | None:
    """A preset from a name (aliases resolved, any case), or None if ``text`` is not one."""
    name = text.strip().upper()
    if name in ALIASES:
        return ALIASES[name]
    try:
        return Preset(name)
    except ValueError:
        return None


def require_preset(text: str) -> Preset:
    p = parse_preset(text)
    if p is None:
        valid = ", ".join(p.value for p in Preset)
        raise InputError(f"unknown llama.cpp preset {text.strip()!r}", f"valid presets: {valid}")
    return p
