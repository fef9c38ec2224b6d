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


def _decode_head(rows: np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scale, min_log_prob, 16-bit codes) of stored rows: log p = scale·code + min_log_prob."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    return head[:, 0], head[:, 1], rows[:, 4 : 4 + n_vocab]


def _sparse_kld(base_rows: np.ndarray, n_vocab: int, diff) -> np.ndarray:
    """Σ_{i: log p_i > -16} p_i · diff(row, i, log p_i) per row, over the base entries llama-perplexity keeps.

    Those entries (about a fifth of a real vocabulary) are found on the 16-bit codes with a one-code
    margin, then tested and summed with llama-perplexity's float32 arithmetic.
    """
    scale, min_lp, q = _decode_head(base_rows, n_vocab)
    cut = np.float32(-16)
    kld = np.empty(len(base_rows), dtype=np.float64)
    for i in range(len(base_rows)):
        s, m = scale[i], min_lp[i]
        if s > 0:
            thr = int(np.floor((cut - m) / s)) - 1
            idx = np.flatnonzero(q[i] > thr) if thr < 65535 else np.empty(0, np.intp)
        else:  # a flat row: every entry has log p = min_lp
            idx = np.arange(n_vocab) if m > cut else np.empty(0, np.intp)
        lp = s * q[i, idx].astype(np.float32) + m
        keep = lp > cut
        if not keep.all():
            idx, lp = idx[keep], lp[keep]
        kld[i] = (np.exp(lp) * diff(i, idx, lp)).sum(dtype=np.float64)
    return kld


def _scores(kld, nll, base_rows, n_vocab, next_tokens, top) -> TokenScores:
    scale, min_lp, q = _decode_head(base_rows, n_vocab)
    r = np.arange(len(base_rows))
    nll_base = -(scale * q[r, next_tokens].astype(np.float32) + min_lp)
    same_top = top == q.argmax(axis=1)  # log p increases with the code: the same first maximum
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    return TokenScores(kld.astype(np.float32), p_diff.astype(np.float32), nll.astype(np.float32), nll_base, same_top)


def score_rows(logits: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray) -> TokenScores:
    """Score ``n`` positions: quantized ``logits`` (n, V) float32 vs ``base_rows`` (n, nv) uint16.

    The quantized side needs every logit (the normaliser); the base side only the kept entries.
    """
    n, n_vocab = logits.shape
    r = np.arange(n)
    imax = logits.argmax(axis=1)
    max_logit = logits[r, imax]
    tmp = np.empty_like(logits)
    np.subtract(logits, max_logit[:, None], out=tmp)
    np.exp(tmp, out=tmp)
    log_sum_exp = np.log(tmp.sum(axis=1, dtype=np.float64)).astype(np.float32)
    shift = max_logit + log_sum_exp
    nll = shift - logits[r, next_tokens]
    kld = _sparse_kld(base_rows, n_vocab, lambda i, idx, lp: lp - logits[i, idx] + shift[i])
    return _scores(kld, nll, base_rows, n_vocab, next_tokens, imax)


def score_stored(quant_rows: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray, n_vocab: int) -> TokenScores:
    """Score positions whose quantized log-probs are themselves stored 16-bit rows (llama-perplexity's
    file, written by the tools engine's logits path). Agrees with scoring the float logits to 0.01-0.13 %."""
    sq, mq, cq = _decode_head(quant_rows, n_vocab)
    r = np.arange(len(quant_rows))
    nll = -(sq * cq[r, next_tokens].astype(np.float32) + mq)
    kld = _sparse_kld(base_rows, n_vocab, lambda i, idx, lp: lp - (sq[i] * cq[i, idx].astype(np.float32) + mq[i]))
    return _scores(kld, nll, base_rows, n_vocab, next_tokens, cq.argmax(axis=1))


def score_rows_parallel(logits: np.ndarray, base_rows: np.ndarray, next_tokens: np.ndarray, pool) -> TokenScores:
    """:func:`score_rows` split over the threads of ``pool`` (numpy releases the GIL in its kernels).

    Scoring runs between forward passes, when llama.cpp's threads are idle, so it may use every core.
    """
    k = getattr(pool, "_max_workers", 1)
    if k < 2 or len(logits) < 64:
        return score_rows(logits, base_rows, next_tokens)
    cuts = np.linspace(0, len(logits), k + 1).astype(int)
    jobs = [(logits[a:b], base_rows[a:b], next_tokens[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    return TokenScores.concat(list(pool.map(lambda j: score_rows(*j), jobs)))


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
