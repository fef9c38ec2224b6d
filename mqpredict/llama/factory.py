"""The engines by name: what ``--engine`` / ``--llama-bin`` / ``--tools-kld`` build (CLI and Ray workers)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.measure.corpus import EvalSpec


class EngineName(StrEnum):
    inprocess = "inprocess"
    tools = "tools"


def make_engine(
    base: Path,
    corpus: Path | None,
    spec: EvalSpec,
    engine: EngineName,
    llama_bin: Path | None,
    threads: int,
    allow_quantized_base: bool,
    progress,
    tools_kld: str = "statistics",
    imatrix=None,
):
    if engine == EngineName.tools:
        from mqpredict.llama.tools import KLDSource, ToolsEngine

        try:
            source = KLDSource(tools_kld)
        except ValueError:
            raise InputError(f"--tools-kld {tools_kld!r} is not one of: statistics, logits") from None
        return ToolsEngine(
            base, corpus, spec, threads=threads, allow_quantized_base=allow_quantized_base,
            progress=progress, llama_bin=llama_bin, kld_source=source, imatrix=imatrix,
        )  # fmt: skip
    from mqpredict.llama.inprocess import InProcessEngine

    return InProcessEngine(base, corpus, spec, threads=threads, allow_quantized_base=allow_quantized_base, progress=progress,
                           imatrix=imatrix)  # fmt: skip
