"""Per-token KLD against the stored base log-probabilities, computed as llama-perplexity computes it.

For each scored position, with quantized logits ``l`` and stored base log-probs ``b`` (16-bit)::

    kld   = Σ_{i : b_i > -16} e^{b_i} (b_i − l_i + logsumexp(l))     (a float64 sum of float32 terms)
    nll   = logsumexp(l) − l_tok;   nll_base = −b_tok
    same  = argmax(l) == argmax(b);   Δp = e^{−nll} − e^{−nll_base}

The ``b_i > -16`` cut is llama-perplexity's: the 16-bit base file cannot hold smaller log-probs.
It also drops the tail's (usually negative) terms, which is why this "llama.cpp KLD" is a few percent
*higher* than the exact full-vocabulary KLD on a real model (measured on SmolLM2, see
docs/measurement.md). :func:`exact_kld` gives the exact value from float logits for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqpredict.measure.baselogprobs import SparseRows


@dataclass
class TokenScores:
    """Per-token results of scored positions (one chunk, or the concatenation of many)."""

    kld: np.ndarray  # float32
    p_diff: np.ndarray  # float32
    nll: np.ndarray  # float32
    nll_base: np.ndarray  # float32
    same_top: np.ndarray  # bool

    @classmethod
    def concat(cls, parts: list[TokenScores]) -> TokenScores:
        names = ("kld", "p_diff", "nll", "nll_base", "same_top")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in names))


def _kld_terms(base: SparseRows, diff) -> np.ndarray:
    """Σ_{i: log p_i > -16} p_i · diff(pos, flat index, vocabulary index, log p_i) per position: float32 terms
    summed in float64 (llama-perplexity's arithmetic), vectorised over every kept entry of every position."""
    r, flat, c, lp = base.entries()
    kld = np.zeros(len(base), dtype=np.float64)
    if len(lp):
        terms = (np.exp(lp) * diff(r, flat, c, lp)).astype(np.float64)
        nz = base.nnz > 0
        starts = np.concatenate([[0], np.cumsum(base.nnz[:-1], dtype=np.int64)])
        kld[nz] = np.add.reduceat(terms, starts[nz])
    return kld


def _log_sum_exp(logits: np.ndarray, max_logit: np.ndarray, block: int = 16) -> np.ndarray:
    """log Σ_j e^{l_j - max} per row: float32 exponentials summed in float64 (as llama-perplexity), a few
    rows at a time so the temporary stays in cache."""
    n = len(logits)
    buf = np.empty((min(block, n), logits.shape[1]), dtype=np.float32)
    out = np.empty(n, dtype=np.float64)
    for a in range(0, n, block):
        b = buf[: min(block, n - a)]
        np.subtract(logits[a : a + block], max_logit[a : a + block, None], out=b)
        np.exp(b, out=b)
        out[a : a + block] = b.sum(axis=1, dtype=np.float64)
    return np.log(out).astype(np.float32)


def _scores(kld: np.ndarray, nll: np.ndarray, base: SparseRows, top: np.ndarray) -> TokenScores:
    p_diff = np.exp(-nll) - np.exp(-base.nll_base)
    return TokenScores(kld.astype(np.float32), p_diff.astype(np.float32), nll.astype(np.float32), base.nll_base,
                       top == base.top)  # fmt: skip


def score_sparse(logits: np.ndarray, base: SparseRows, next_tokens: np.ndarray) -> TokenScores:
    """Score ``n`` positions: quantized ``logits`` (n, V) float32 against the base's :class:`SparseRows`.

    The quantized side needs every logit (the normaliser); the base side only its kept entries.
    """
    n = len(logits)
    r = np.arange(n)
    imax = logits.argmax(axis=1)
    max_logit = logits[r, imax]
    shift = max_logit + _log_sum_exp(logits, max_logit)
    nll = shift - logits[r, next_tokens]
    flat_logits = np.ascontiguousarray(logits).reshape(-1)
    kld = _kld_terms(base, lambda rr, flat, cc, lp: lp - flat_logits[flat] + shift[rr])
    return _scores(kld, nll, base, imax)


def score_rows(logits: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray) -> TokenScores:
    """:func:`score_sparse` against llama-perplexity's 16-bit rows ``base_rows`` (n, nv) uint16."""
    return score_sparse(logits, SparseRows.from_dense(base_rows, logits.shape[1], next_tokens), next_tokens)


def score_stored(quant_rows: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray, n_vocab: int) -> TokenScores:
    """Score positions whose quantized log-probs are themselves stored 16-bit rows (llama-perplexity's
    file, written by the tools engine's logits path). Agrees with scoring the float logits to 0.01-0.13 %."""
    quant_rows = np.asarray(quant_rows)
    base = SparseRows.from_dense(base_rows, n_vocab, next_tokens)
    head = np.ascontiguousarray(quant_rows[:, :4]).view(np.float32)
    sq, mq, cq = head[:, 0], head[:, 1], quant_rows[:, 4 : 4 + n_vocab]
    r = np.arange(len(quant_rows))
    nll = -(sq * cq[r, next_tokens].astype(np.float32) + mq)
    nv = quant_rows.shape[1]
    flat_q = np.ascontiguousarray(quant_rows).reshape(-1)
    kld = _kld_terms(base, lambda rr, flat, cc, lp: lp - (sq[rr] * flat_q[rr * nv + 4 + cc].astype(np.float32) + mq[rr]))
    return _scores(kld, nll, base, cq.argmax(axis=1))


def score_parallel(logits: np.ndarray, base: SparseRows, next_tokens: np.ndarray, pool) -> TokenScores:
    """:func:`score_sparse` split over the threads of ``pool`` (numpy releases the GIL in its kernels).

    Scoring runs between forward passes, when llama.cpp's threads are idle, so it may use every core.
    """
    k = getattr(pool, "_max_workers", 1)
    if k < 2 or len(logits) < 64:
        return score_sparse(logits, base, next_tokens)
    cuts = np.linspace(0, len(logits), k + 1).astype(int)
    jobs = [(logits[a:b], base.part(a, b), next_tokens[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return TokenScores.concat(list(pool.map(lambda j: score_sparse(*j), jobs)))


def dense_kld(lg: np.ndarray, rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Reference for the tests: the same KLD on dense arrays, element for element as llama-perplexity."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    lp = rows[:, 4 : 4 + n_vocab].astype(np.float32) * head[:, :1] + head[:, 1:2]
    mx = lg.max(axis=1)
    shift = mx + np.log(np.exp(lg - mx[:, None]).sum(axis=1, dtype=np.float64)).astype(np.float32)
    terms = np.exp(lp) * (lp - lg + shift[:, None])
    return np.where(lp > -16, terms, 0).sum(axis=1, dtype=np.float64)


def exact_kld(base_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Exact full-vocabulary KL(base ‖ quantized) per row, in float64 (for documentation/tests)."""
    b = base_logits.astype(np.float64)
    q = logits.astype(np.float64)
    lb = b - b.max(1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(1, keepdims=True))
    lq = q - q.max(1, keepdims=True)
    lq -= np.log(np.exp(lq).sum(1, keepdims=True))
    return (np.exp(lb) * (lb - lq)).sum(1)
