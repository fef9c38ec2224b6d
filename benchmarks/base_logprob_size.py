"""Compact base log-probs: their size against llama-perplexity's file, and every statistic from both.

    .venv/bin/python benchmarks/base_logprob_size.py                 # SmolLM2, 16 windows of 512, Q4_K_M
    .venv/bin/python benchmarks/base_logprob_size.py qwen2.5-0.5b --chunks 4

The base's logits are compressed as llama-perplexity compresses them (16-bit codes, every vocabulary entry:
the size of its ``--kl-divergence-base`` file follows from its format) and kept compactly as the in-process
cache keeps them (:class:`~mqpredict.measure.baselogprobs.SparseRows`; the size is that of the cache's files,
the whole corpus's tokens included). A quantized model's logits are then
scored against both — the full rows with the dense reference formulas, the compact ones as measurements do
— and every statistic is compared.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mqpredict.base.embedded import prepare_embedded
from mqpredict.llama.inprocess import InProcessEngine, LoadedModel, evaluator
from mqpredict.measure.baselogprobs import SparseRows
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.kld import TokenScores, dense_kld, score_sparse
from mqpredict.measure.logprobs import HEADER, compress, row_width
from mqpredict.measure.stats import FIELDS, KLDStats
from mqpredict.quant.config import Config
from mqpredict.util.paths import DEFAULT_CORPUS


def _logits(path, spec, windows, threads) -> list[np.ndarray]:
    model = LoadedModel(path)
    try:
        with evaluator(path, spec, threads, model) as ev:
            return [x.copy() for _, x in ev.run(windows)]
    finally:
        model.close()


def dense_scores(logits: np.ndarray, rows: np.ndarray, nxt: np.ndarray) -> TokenScores:
    """The statistics' inputs straight from full 16-bit rows (no compact form involved)."""
    n, v = logits.shape
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    q = rows[:, 4 : 4 + v]
    r = np.arange(n)
    mx = logits.max(axis=1)
    shift = mx + np.log(np.exp(logits - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    nll = shift - logits[r, nxt]
    nll_base = -(head[:, 0] * q[r, nxt].astype(np.float32) + head[:, 1])
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    kld = dense_kld(logits, rows, v).astype(np.float32)
    return TokenScores(kld, p_diff.astype(np.float32), nll.astype(np.float32), nll_base, logits.argmax(1) == q.argmax(1))


def run(name: str, chunks: int, config: str, threads: int) -> dict:
    base = prepare_embedded(name)
    spec = EvalSpec(ctx=512, n_chunks=chunks)
    with InProcessEngine(base, DEFAULT_CORPUS, spec, threads=threads) as eng:
        bl = eng.base_logprobs(spec)
        tokens = bl.tokens
        compact_bytes = bl.size_bytes() + (bl.folder / "tokens.npy").stat().st_size  # the cache's files
        windows = tokens[: chunks * spec.ctx].reshape(chunks, spec.ctx)
        b = _logits(base, spec, windows, eng.threads)
        built = eng.build(Config.parse(config))
        q = _logits(built.path, spec, windows, eng.threads)
        n_vocab = eng.model.n_vocab
    dense_bytes = HEADER + chunks * spec.ctx * 4 + chunks * spec.scored_per_chunk * row_width(n_vocab) * 2
    dense_parts, compact_parts, kept = [], [], []
    for i in range(chunks):
        nxt = windows[i, spec.first + 1 :]
        rows, _ = compress(b[i])
        sparse = SparseRows.from_dense(rows, n_vocab, nxt)
        kept.append(sparse.nnz.mean() / n_vocab)
        dense_parts.append(dense_scores(q[i], rows, nxt))
        compact_parts.append(score_sparse(q[i], sparse, nxt))
    d = KLDStats.from_scores(TokenScores.concat(dense_parts)).to_json()
    c = KLDStats.from_scores(TokenScores.concat(compact_parts)).to_json()
    worst = max(FIELDS, key=lambda f: abs(c[f] - d[f]) / max(abs(d[f]), 1e-300))
    return {
        "model": name, "chunks": chunks, "ctx": spec.ctx, "n_vocab": n_vocab, "config": config,
        "kept_fraction": float(np.mean(kept)), "llama_perplexity_bytes": dense_bytes,
        "compact_bytes": compact_bytes, "size_ratio": compact_bytes / dense_bytes,
        "max_relative_change": abs(c[worst] - d[worst]) / max(abs(d[worst]), 1e-300), "worst_statistic": worst,
        "kld_mean_dense": d["kld_mean"], "kld_mean_compact": c["kld_mean"],
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=["smollm2"])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--config", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    for m in a.models:
        r = run(m, a.chunks, a.config, a.threads)
        if a.json:
            print(json.dumps(r))
            continue
        print(f"{m} ({r['n_vocab']} tokens, {r['chunks']}×{r['ctx']}): llama-perplexity's file "
              f"{r['llama_perplexity_bytes'] / 1e6:.1f} MB, compact {r['compact_bytes'] / 1e6:.1f} MB "
              f"({r['size_ratio']:.3f}×; {100 * r['kept_fraction']:.1f}% of the entries summed); {r['config']}: every "
              f"statistic within {100 * r['max_relative_change']:.2g}% ({r['worst_statistic']}; mean KLD "
              f"{r['kld_mean_dense']:.6f} vs {r['kld_mean_compact']:.6f})")  # fmt: skip


if __name__ == "__main__":
    main()
