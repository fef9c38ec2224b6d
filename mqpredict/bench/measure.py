"""Benchmark: InProcessEngine vs the llama.cpp tools, measured side by side in one run.

* **evaluate**: seconds per config for ``InProcessEngine.evaluate`` vs ``llama-perplexity --kl-divergence``
  reading its saved base-logits file — same GGUF files, model, corpus, ctx and threads, runs interleaved
  (in-process, tool, in-process stream, in-process, tool, in-process stream …) so machine noise hits all
  alike; the median of each is compared.
* **stream**: the in-process engine's stream scoring on the same files, same number of chunks: seconds per
  *scored token* against llama-perplexity's (``stream_ratio``; target ≤ 0.55 — windows mode scores
  ``ctx/2 - 1`` tokens per ``ctx`` forward tokens, a stream ``ctx/2`` per ``ctx/2``), and the ratio of
  mean KLD stream / windows per config (the two modes score different tokens; see docs/measurement.md).
  Both in-process evaluations also time their ``llama_decode`` calls (``Evaluation.decode_seconds``):
  ``stream_decode_ratio`` is the stream's forward passes *alone* per scored token over llama-perplexity's
  whole time — what ``stream_ratio`` would be with scoring, file reads and start-up free, so the least any
  work outside llama.cpp's forward pass can reach — and ``stream_decode_vs_windows`` the same forward
  passes over the in-process windows' (the number ``stream_floor`` bounds).
* **build**: seconds to build one hybrid by stitching (pure quantizations cached) vs
  ``llama-quantize --pure --tensor-type-file`` for the same config, interleaved likewise.

Base log-probs and pure quantizations are prepared before timing (their one-off cost is reported).
Targets: evaluate ≤ 1.0× (aim 0.8×), build ≤ 0.1× (foundation issue); stream ≤ 0.55× per scored token (issue 13).

**The stream's floor** (``stream_floor``, :func:`stream_floor`): a stream halves the *body's* forward
tokens per scored token, not the output head's — both modes compute the logits of every scored token
once (``n_vocab × n_embd`` multiply-adds each). With ``r`` = head / body multiply-adds per token (body:
the ``blk.*`` matrices a token uses, routed experts at ``n_expert_used / n_expert``; attention over the
cache left out, so this is a lower bound), the stream's cost per scored token over the windows' is at
least ``((ctx + (n−1)·h) + n·h·r) / (n·h)  ÷  (n·ctx + n·h·r) / (n·(h−1))`` — about ``(1 + r) / (2 + r)``
for many chunks. SmolLM2 (49,152 × 576 head on a 106 M-parameter body, r = 0.27) cannot go below 0.58
at 16 chunks of 512 by arithmetic alone; ``stream_decode_vs_windows`` measured beside it says how close
llama.cpp's forward passes get (the cache's attention and K-shift are what the count leaves out). The
count is of multiply-adds; ``benchmarks/stream_breakdown.py`` times a stream step's parts against a window
(on SmolLM2 the head's share of the time is about ``r``, as counted).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.llama.tools import ToolsEngine, run_tool
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import quantize_command, tensor_type_lines

EVAL_CONFIGS = ("Q8_0", "Q4_K_M", "default=Q5_0,ffn_down=Q6_K")
BUILD_CONFIG = "default=Q5_0,ffn_down=Q6_K,embeddings=Q8_0"


@dataclass(frozen=True)
class BenchResult:
    model: str
    n_chunks: int
    ctx: int
    threads: int
    repeats: int
    eval_inprocess_s: float  # median seconds per config
    eval_tool_s: float
    eval_ratio: float
    kld_agreement: float  # max relative difference of mean KLD between the two, over the configs
    eval_stream_s: float  # median seconds per config, stream scoring (in-process)
    decode_inprocess_s: float  # of eval_inprocess_s, the median seconds inside llama_decode (forward passes)
    decode_stream_s: float  # of eval_stream_s, likewise
    tokens_windows: int  # tokens scored per config: windows (both engines) …
    tokens_stream: int  # … and stream
    stream_ratio: float  # stream seconds per scored token / llama-perplexity's
    stream_decode_ratio: float  # the stream's llama_decode seconds alone per scored token / llama-perplexity's whole
    stream_decode_vs_windows: float  # stream / in-process windows, llama_decode seconds per scored token
    stream_floor: float  # the least stream_decode_vs_windows the model's shapes allow (module doc)
    head_to_body: float  # r: output-head multiply-adds per token / the body's
    kld_stream_vs_windows: dict[str, float]  # mean KLD stream / windows, per config
    build_stitch_s: float
    build_tool_s: float
    build_ratio: float
    setup_base_logprobs_s: float
    setup_stream_base_s: float
    setup_pure_cache_s: float

    def to_json(self) -> dict:
        return asdict(self)


def run(base: Path, corpus: Path, spec: EvalSpec, threads: int, repeats: int, progress=None) -> BenchResult:
    progress = progress or (lambda *a: None)
    inproc = InProcessEngine(base, corpus, spec, threads=threads)
    tools = ToolsEngine(base, corpus, spec, threads=threads)
    try:
        stream = EvalSpec(spec.ctx, spec.n_chunks, spec.chunk_offset, scoring=Scoring.stream)
        t0 = time.perf_counter()
        inproc.base_logprobs(spec)
        tool_base = tools.base_logprobs(spec)
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        inproc.base_logprobs(stream)
        t_stream_base = time.perf_counter() - t0

        t0 = time.perf_counter()
        files = {c: inproc.build(Config.parse(c)).path for c in EVAL_CONFIGS}  # fills the pure cache
        hybrid = Config.parse(BUILD_CONFIG)
        inproc.build(hybrid)
        t_pure = time.perf_counter() - t0

        t_in: list[float] = []
        t_tool: list[float] = []
        t_stream: list[float] = []
        d_in: list[float] = []
        d_stream: list[float] = []
        agree = 0.0
        kld_ratio: dict[str, float] = {}
        total = repeats * len(files)
        for r in range(repeats):
            for i, (c, path) in enumerate(files.items()):
                progress("evaluate (side by side)", r * len(files) + i, total)
                t0 = time.perf_counter()
                ei = inproc.evaluate(path)
                t_in.append(time.perf_counter() - t0)
                mi = ei.stats
                t0 = time.perf_counter()
                mt = tools._evaluate(path, spec).stats
                t_tool.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                es = inproc.evaluate(path, stream)
                t_stream.append(time.perf_counter() - t0)
                ms = es.stats
                d_in.append(ei.decode_seconds)
                d_stream.append(es.decode_seconds)
                agree = max(agree, abs(mi.kld_mean / mt.kld_mean - 1))
                kld_ratio[c] = ms.kld_mean / mi.kld_mean
        progress("evaluate (side by side)", total, total)

        tt = inproc.workdir / "bench.tensor-types.txt"
        tt.write_text("\n".join(tensor_type_lines(inproc.model, hybrid)) + "\n")
        b_st, b_tool = [], []
        n_build = max(5, repeats)
        for r in range(n_build):  # each build writes a fresh file, removed outside the timed region
            progress("build (side by side)", r, n_build)
            stitched = inproc.workdir / f"stitched-{r}.gguf"
            t0 = time.perf_counter()
            inproc.build(hybrid, stitched)
            b_st.append(time.perf_counter() - t0)
            out = inproc.workdir / f"quantized-{r}.gguf"
            cmd = quantize_command(inproc.model, hybrid, str(out), str(tt), threads)
            cmd[0] = str(tools.quantize_bin)
            t0 = time.perf_counter()
            run_tool(cmd, "llama-quantize")
            b_tool.append(time.perf_counter() - t0)
            if stitched.read_bytes() != out.read_bytes():
                raise AssertionError("stitched and llama-quantize files differ")
            stitched.unlink()
            out.unlink()
        progress("build (side by side)", n_build, n_build)
        assert Path(tool_base).exists()
        m_in, m_tool, m_stream = statistics.median(t_in), statistics.median(t_tool), statistics.median(t_stream)
        md_in, md_stream = statistics.median(d_in), statistics.median(d_stream)
        per_tool = m_tool / spec.n_tokens  # llama-perplexity's seconds per scored token
        r = head_to_body(inproc.model)
        s_st, s_tool = statistics.median(b_st), statistics.median(b_tool)
        return BenchResult(
            model=inproc.model.path.name,
            n_chunks=spec.n_chunks,
            ctx=spec.ctx,
            threads=inproc.threads,
            repeats=repeats,
            eval_inprocess_s=m_in,
            eval_tool_s=m_tool,
            eval_ratio=m_in / m_tool,
            kld_agreement=agree,
            eval_stream_s=m_stream,
            decode_inprocess_s=md_in,
            decode_stream_s=md_stream,
            tokens_windows=spec.n_tokens,
            tokens_stream=stream.n_tokens,
            stream_ratio=(m_stream / stream.n_tokens) / per_tool,
            stream_decode_ratio=(md_stream / stream.n_tokens) / per_tool,
            stream_decode_vs_windows=(md_stream / stream.n_tokens) / (md_in / spec.n_tokens),
            stream_floor=stream_floor(r, spec.ctx, spec.n_chunks),
            head_to_body=r,
            kld_stream_vs_windows=kld_ratio,
            build_stitch_s=s_st,
            build_tool_s=s_tool,
            build_ratio=s_st / s_tool,
            setup_base_logprobs_s=t_base,
            setup_stream_base_s=t_stream_base,
            setup_pure_cache_s=t_pure,
        )
    finally:
        inproc.close()
        tools.close()


def head_to_body(model: ModelInfo) -> float:
    """Output-head multiply-adds per token over the body's: ``n_vocab × n_embd`` over the ``blk.*`` weight
    matrices' elements (3-D routed-expert tensors at ``n_expert_used / n_expert`` of theirs)."""
    body = 0.0
    for t in model.tensors:
        if not t.name.startswith("blk.") or t.n_dims < 2:
            continue
        n = math.prod(t.shape)
        if t.n_dims == 3 and model.n_expert:
            n *= model.n_expert_used / model.n_expert
        body += n
    return model.n_vocab * model.n_embd / body


def stream_floor(r: float, ctx: int, n_chunks: int) -> float:
    """The least stream/windows cost per scored token for head/body ratio ``r`` (module doc): forward tokens
    of the body, plus one head evaluation per scored token in both modes, attention left out."""
    h = ctx // 2
    stream = ((ctx + (n_chunks - 1) * h) + n_chunks * h * r) / (n_chunks * h)
    windows = (n_chunks * ctx + n_chunks * h * r) / (n_chunks * (h - 1))
    return stream / windows


def llama_perplexity_version() -> str:
    from mqpredict.llama.tools import find_tool

    p = subprocess.run([str(find_tool("llama-perplexity")), "--version"], capture_output=True, text=True)
    return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "unknown"
