"""Measurement maths: llama-perplexity's compression and KLD, statistics, corpus windows."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mqpredict.errors import InputError
from mqpredict.measure.corpus import Corpus, EvalSpec
from mqpredict.measure.kld import TokenScores, dense_kld, exact_kld, score_rows
from mqpredict.measure.logprobs import LogProbFile, LogProbWriter, compress
from mqpredict.measure.stats import KLDStats


def _logits(rng, n=40, v=3000, spread=4.0):
    base = (rng.standard_normal((n, v)) * spread).astype(np.float32)
    quant = (base + rng.standard_normal((n, v)).astype(np.float32) * 0.3).astype(np.float32)
    return base, quant


def test_compression_keeps_log_probs_within_half_a_step():
    rng = np.random.default_rng(1)
    base, _ = _logits(rng)
    rows, lse = compress(base)
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)
    lp = rows[:, 4:].astype(np.float32) * head[:, :1] + head[:, 1:2]
    true = base - lse[:, None]
    kept = true > true.max(1, keepdims=True) - 16 + 1e-3
    assert np.abs(lp - true)[kept].max() <= head[:, 0].max() * 0.51 + 1e-5


def test_sparse_scoring_equals_dense_reference():
    rng = np.random.default_rng(2)
    for spread in (1.0, 4.0, 9.0):  # from nothing cut to most of the vocabulary cut
        base, quant = _logits(rng, spread=spread)
        rows, _ = compress(base)
        tok = rng.integers(0, base.shape[1], base.shape[0])
        s = score_rows(quant, rows, tok)
        assert np.allclose(s.kld, dense_kld(quant, rows, base.shape[1]), rtol=1e-5, atol=1e-7)


def test_cut_at_minus_16_drops_the_tail():
    """llama-perplexity's KLD leaves out base log-probs ≤ -16. Build a base whose tail sits just below the
    cut and a quantized model that puts 20× more mass there: the exact KLD counts the (negative) tail
    terms, llama.cpp's does not."""
    rng = np.random.default_rng(3)
    n, v, head = 20, 3000, 50
    base = np.full((n, v), -12.6, np.float32)  # log p ≈ -16.5 after normalisation
    base[:, :head] = rng.standard_normal((n, head)).astype(np.float32) * 0.1
    quant = base.copy()
    quant[:, head:] += 3.0
    rows, _ = compress(base)
    llama = score_rows(quant, rows, np.zeros(n, dtype=int)).kld.mean()
    exact = exact_kld(base, quant).mean()
    assert llama > 1.1 * exact > 0
    assert llama == pytest.approx(dense_kld(quant, rows, v).mean(), rel=1e-5)
    base_s, quant_s = _logits(rng, spread=1.0)  # nothing below -16: the two definitions agree
    rows_s, _ = compress(base_s)
    assert score_rows(quant_s, rows_s, np.zeros(len(base_s), dtype=int)).kld.mean() == pytest.approx(
        exact_kld(base_s, quant_s).mean(), rel=2e-3
    )


def test_identical_model_scores_zero():
    rng = np.random.default_rng(4)
    base, _ = _logits(rng)
    rows, _ = compress(base)
    s = score_rows(base, rows, rng.integers(0, base.shape[1], len(base)))
    assert np.abs(s.kld).max() < 2e-4
    assert s.same_top.all()


def test_stats_follow_llama_perplexity_formulas():
    rng = np.random.default_rng(5)
    n = 1000
    kld = rng.gamma(0.5, 0.02, n).astype(np.float32)
    nll = rng.gamma(2, 1.5, n).astype(np.float32)
    nll_base = (nll - rng.normal(0, 0.05, n)).astype(np.float32)
    same = rng.random(n) < 0.9
    p_diff = (np.exp(-nll) - np.exp(-nll_base)).astype(np.float32)
    s = KLDStats.from_scores(TokenScores(kld, p_diff, nll, nll_base, same))
    k = kld.astype(np.float64)
    assert s.kld_mean == pytest.approx(k.mean())
    assert s.kld_mean_err == pytest.approx(math.sqrt((np.mean(k * k) - k.mean() ** 2) / (n - 1)))
    assert s.kld_median == pytest.approx(np.median(k), rel=1e-6)
    assert s.kld_p99 == pytest.approx(np.percentile(k, 99), rel=1e-5)  # linear interpolation
    assert s.kld_max == pytest.approx(k.max())
    assert s.same_top_p == pytest.approx(same.mean())
    assert s.ppl == pytest.approx(math.exp(nll.astype(np.float64).mean()))
    assert s.ln_ppl_ratio == pytest.approx(nll.astype(np.float64).mean() - nll_base.astype(np.float64).mean())
    assert 0 < s.ln_ppl_ratio_err < s.ppl_err / s.ppl  # paired: far tighter than either error alone


def test_logprob_file_round_trip_and_slice(tmp_path):
    rng = np.random.default_rng(6)
    ctx, n_chunk, v = 32, 3, 101
    tokens = rng.integers(0, v, (n_chunk, ctx)).astype(np.int32)
    w = LogProbWriter(tmp_path / "b.kld", ctx, v, tokens)
    chunks = []
    for _ in range(n_chunk):
        rows, _ = compress((rng.standard_normal((ctx - 1 - ctx // 2, v)) * 3).astype(np.float32))
        chunks.append(rows)
        w.write(rows)
    w.close()
    f = LogProbFile.open(tmp_path / "b.kld")
    assert (f.n_ctx, f.n_vocab, f.n_chunk) == (ctx, v, n_chunk)
    assert np.array_equal(np.asarray(f.tokens), tokens)
    assert np.array_equal(np.asarray(f.rows[2]), chunks[2])
    g = LogProbFile.open(f.slice(tmp_path / "s.kld", 1, 2))
    assert np.array_equal(np.asarray(g.tokens), tokens[1:]) and np.array_equal(np.asarray(g.rows[0]), chunks[1])
    (tmp_path / "bad.kld").write_bytes((tmp_path / "b.kld").read_bytes()[:-7])
    with pytest.raises(InputError, match="truncated"):
        LogProbFile.open(tmp_path / "bad.kld")


def test_interrupted_writer_leaves_nothing(tmp_path):
    w = LogProbWriter(tmp_path / "x.kld", 16, 10, np.zeros((1, 16), np.int32))
    w.close(ok=False)
    assert list(tmp_path.iterdir()) == []


def test_windows_like_llama_perplexity(corpus):
    spec = EvalSpec.from_tokens(4096, 512)
    assert (spec.n_chunks, spec.scored_per_chunk, spec.n_tokens) == (16, 255, 4080)
    c = Corpus.load(corpus)
    assert not c.text.endswith("\n")  # -f drops one trailing newline
    with pytest.raises(InputError, match="fewer than two windows"):
        spec.check_corpus(700, corpus)
    with pytest.raises(InputError, match="windows"):
        EvalSpec(ctx=512, n_chunks=10, chunk_offset=5).check_corpus(512 * 12, corpus)


def test_corpus_errors(tmp_path):
    with pytest.raises(InputError, match="no such corpus"):
        Corpus.load(tmp_path / "none.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(InputError, match="not UTF-8"):
        Corpus.load(tmp_path / "bin.txt")
