"""Stream scoring (one pass through the KV cache), one base log-prob cache per evaluation setup, forward
tokens counted as run, and no recomputed windows in the tools engine — on real llama.cpp runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mqpredict.errors import InputError
from mqpredict.llama.engine import load_scores
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.config import Config
from tests.conftest import mq

STREAM = EvalSpec(ctx=128, n_chunks=6, scoring=Scoring.stream)  # 6 chunks of 64 scored tokens
H = STREAM.first
CFG = Config.parse("default=Q4_K,ffn_down=Q6_K")


@pytest.fixture()
def eng(tiny, corpus, tmp_path):
    """A stream engine with a cache of its own (so saved stream states are under the test's control)."""
    from mqpredict.llama.inprocess import InProcessEngine

    with InProcessEngine(tiny, corpus, STREAM, threads=2, cache=tmp_path / "cache") as e:
        yield e


def _vec(m) -> np.ndarray:
    return load_scores(m.per_token_path).kld


def _states(e) -> list:
    return sorted(e._states(STREAM).folder.glob("*.kv"))


def test_every_token_after_the_first_half_window_is_scored_once(eng):
    m = eng.measure(CFG)
    assert (m.scoring, m.n_chunks, m.stats.n_tokens) == ("stream", 6, 6 * H)
    assert m.forward_tokens == 2 * H + 5 * H  # the first window, then half a window per chunk
    assert np.array_equal(_vec(eng.measure(CFG)), _vec(m))  # deterministic: paired comparisons hold
    assert [STREAM.stream_targets(c) for c in (0, 1)] == [slice(H + 1, 2 * H + 1), slice(2 * H + 1, 3 * H + 1)]


def test_a_slice_equals_the_same_positions_of_a_longer_run(eng):
    """Stages continue from the state the first one saved; a slice without a saved state replays the stream
    up to it without scoring; either way every value equals the longer run's, bit for bit."""
    full = _vec(eng.measure(CFG))
    a = eng.measure(CFG, STREAM.part(0, 2))
    b = eng.measure(CFG, STREAM.part(2, 4))  # continues from the state at chunk 2
    assert np.array_equal(np.concatenate([_vec(a), _vec(b)]), full)
    assert b.forward_tokens == 4 * H
    for p in _states(eng):
        p.unlink()
    c = eng.measure(CFG, STREAM.part(4, 2))  # no saved state: replays chunks 0-3, scores 4-5
    assert np.array_equal(_vec(c), full[4 * H :])
    assert c.forward_tokens == 2 * H + 5 * H


def test_saved_states_stay_within_their_budget(eng, monkeypatch):
    """Candidates' states go least recently used first once the folder is over its budget (a restore counts
    as a use); the base's states, every measurement's reference, always stay."""
    a, b, c = (Config.parse(x) for x in ("default=Q4_K,ffn_down=Q6_K", "default=Q5_0", "default=Q8_0"))
    eng.measure(a)
    base = {p.name for p in _states(eng) if p.name.startswith("base-")}
    first = {p.name for p in _states(eng)} - base
    assert base and len(first) == 1
    size = max(p.stat().st_size for p in _states(eng))
    monkeypatch.setenv("MQPREDICT_STREAM_STATES_MB", str(3.5 * size / 1e6))  # the base's and two candidates'
    eng.measure(b)
    eng.measure(c)
    names = {p.name for p in _states(eng)}
    assert base <= names and not first & names and len(names) == 3  # a's, the oldest, went
    b_state, c_state = sorted((p for p in _states(eng) if p.name not in base), key=lambda p: p.stat().st_mtime_ns)
    monkeypatch.setenv("MQPREDICT_STREAM_STATES_MB", str(4.5 * size / 1e6))
    eng.base_logprobs(STREAM.part(6, 1))  # the base's state at chunk 7 joins: 4 states fit
    assert eng.measure(b, STREAM.part(6, 1)).forward_tokens == H  # b's state restored (a use), one at 7 saved
    names = {p.name for p in _states(eng)}
    assert base <= names and b_state.name in names and c_state.name not in names  # c's was the least recent
    assert eng.measure(b, STREAM.part(6, 1)).forward_tokens == H
    before = {p.name for p in _states(eng)}
    for bad in ("lots", "inf"):
        with pytest.raises(InputError, match="MQPREDICT_STREAM_STATES_MB"):
            monkeypatch.setenv("MQPREDICT_STREAM_STATES_MB", bad)
            eng.measure(c, STREAM.part(6, 1))
    monkeypatch.delenv("MQPREDICT_STREAM_STATES_MB")
    assert {p.name for p in _states(eng)} == before  # refused before any work: nothing saved


def test_base_and_candidate_run_the_identical_procedure(eng):
    """The base measured against itself: the same logits at every position, so only the 16-bit storage of the
    base's log-probs is left (as in llama-perplexity's windows)."""
    m = eng.measure(Config.parse("default=F32"))  # the tiny base is F32: this file is the base
    s = load_scores(m.per_token_path)
    assert np.abs(s.kld).max() < 2e-4 and s.same_top.all()
    on_grid = s.nll_base < 15  # below max-16 the 16-bit file holds the grid's floor, not the value
    assert on_grid.mean() > 0.5 and np.abs(s.nll - s.nll_base)[on_grid].max() < 1e-2
    assert (s.nll >= s.nll_base - 1e-2).all()
    q4 = eng.measure(CFG).stats.kld_mean
    assert q4 > 100 * m.stats.kld_mean


def test_stream_and_windows_score_different_tokens_and_records(eng, tiny, corpus):
    from mqpredict.records.context import Context

    windows = EvalSpec(ctx=128, n_chunks=6)
    s, w = eng.measure(CFG), eng.measure(CFG, windows)
    assert (w.scoring, w.stats.n_tokens, w.forward_tokens) == ("windows", 6 * (H - 1), 6 * 128)
    assert s.stats.kld_mean != w.stats.kld_mean
    cs, cw = Context.of(eng, "m", STREAM), Context.of(eng, "m", windows)
    assert cs != cw and cs.key(s.types_key, s.build) != cw.key(w.types_key, w.build)


def test_evaluations_time_their_forward_passes(eng):
    """`decode_seconds` is the part of an evaluation spent in llama_decode, in both modes (`bench measure`'s
    `stream_decode_ratio` is made of it)."""
    path = eng.build(CFG).path
    windows = EvalSpec(ctx=128, n_chunks=6)
    s, w = eng.evaluate(path), eng.evaluate(path, windows)
    for e in (s, w):
        assert 0 < e.decode_seconds < e.seconds


def test_one_base_cache_per_setup_grown_chunk_by_chunk(eng):
    folder = eng.logprob_path(STREAM)
    eng.measure(CFG, STREAM.part(0, 2))
    eng.measure(CFG, STREAM.part(2, 2))
    chunks = sorted(p.name for p in folder.glob("c*.npz"))
    assert chunks == [f"c{c:05d}.npz" for c in range(4)]  # every slice in one folder, each chunk once
    first = (folder / "c00000.npz").stat().st_mtime_ns
    eng.base_logprobs(STREAM.part(0, 6))
    assert (folder / "c00000.npz").stat().st_mtime_ns == first  # only chunks 4 and 5 were computed
    assert len(list(folder.glob("c*.npz"))) == 6
    assert eng.logprob_path(EvalSpec(ctx=128, n_chunks=2)) != folder  # windows keep a cache of their own
    doc = json.loads((folder / "meta.json").read_text())
    assert doc["scoring"] == "stream" and doc["n_vocab"] == eng.model.n_vocab


def test_compact_base_rows_score_like_llama_perplexity_rows():
    """The compact rows keep exactly what the statistics read: scoring them equals scoring the full 16-bit rows."""
    from mqpredict.measure.baselogprobs import SparseRows
    from mqpredict.measure.kld import dense_kld, score_sparse
    from mqpredict.measure.logprobs import compress

    rng = np.random.default_rng(7)
    for spread in (1.0, 4.0, 9.0):
        base = (rng.standard_normal((50, 3001)) * spread).astype(np.float32)
        quant = base + rng.standard_normal(base.shape).astype(np.float32) * 0.3
        tok = rng.integers(0, base.shape[1], len(base))
        rows, _ = compress(base)
        sparse = SparseRows.from_dense(rows, base.shape[1], tok)
        s = score_sparse(quant, sparse, tok)
        assert np.allclose(s.kld, dense_kld(quant, rows, base.shape[1]), rtol=1e-5, atol=1e-7)
        lp = rows[:, 4:].astype(np.float32) * np.ascontiguousarray(rows[:, :4]).view(np.float32)[:, :1]
        assert np.array_equal(s.nll_base, -(lp[np.arange(len(tok)), tok] + np.ascontiguousarray(rows[:, :4]).view(np.float32)[:, 1]))
        parts = [score_sparse(quant[a:b], sparse.part(a, b), tok[a:b]).kld for a, b in ((0, 17), (17, 50))]
        assert np.array_equal(np.concatenate(parts), s.kld)
        if spread > 4:  # most of the vocabulary below the cut, as on real models: far smaller
            assert sparse.mask.nbytes + sparse.codes.nbytes < 0.5 * rows.nbytes


def test_tools_engine_refuses_to_stream(tiny, corpus, spec):
    from mqpredict.llama.tools import ToolsEngine

    with pytest.raises(InputError, match="--scoring windows"):
        ToolsEngine(tiny, corpus, STREAM, threads=2)
    p = mq("measure", tiny, "-c", "Q8_0", "--ctx", 128, "--tokens", 256, "--engine", "tools", "--scoring", "stream",
           "--no-track")  # fmt: skip
    lines = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode != 0 and len(lines) == 1 and "--scoring windows" in lines[0]


def test_measure_json_rows_say_their_scoring(tiny, corpus):
    for mode, n in (("stream", 4 * H), ("windows", 4 * (H - 1))):
        p = mq("measure", tiny, "-c", "Q8_0", "--ctx", 128, "--tokens", 256, "--scoring", mode, "--no-track", "--json")
        assert p.returncode == 0, p.stderr
        (row,) = json.loads(p.stdout)
        assert (row["scoring"], row["n_tokens"]) == (mode, n)
    p = mq("measure", tiny, "-c", "Q8_0", "--ctx", 128, "--tokens", 256, "--no-track", "--json")
    assert json.loads(p.stdout)[0]["scoring"] == "stream"  # the default


def _round_trip_offset(tiny, corpus, ctx: int, n: int) -> int:
    """A window offset whose text round-trips through the tiny model's tokenizer (its SentencePiece vocabulary
    adds a space prefix, so a window starting inside a word does not)."""
    from mqpredict.llama.inprocess import LoadedModel
    from mqpredict.measure.corpus import Corpus

    vocab = LoadedModel(tiny, vocab_only=True)
    try:
        toks = vocab.tokenize(Corpus.load(corpus).text)
        for o in range(1, len(toks) // ctx - n - 1):
            want = toks[o * ctx : (o + n + 1) * ctx]
            again = vocab.tokenize(vocab.detokenize(want[1:]))
            if np.array_equal(again[1 : n * ctx], want[1 : n * ctx]):
                return o
    finally:
        vocab.close()
    raise AssertionError("no window of the corpus round-trips")


def test_tools_engine_evaluates_only_the_requested_windows(tiny, corpus, spec, tmp_path):
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.llama.tools import KLDSource, ToolsEngine

    o = _round_trip_offset(tiny, corpus, 128, 2)
    later = spec.part(o, 2)
    cache = tmp_path / "cache"
    with ToolsEngine(tiny, corpus, spec, threads=2, cache=cache) as t, \
            InProcessEngine(tiny, corpus, spec, threads=2, cache=cache) as ip:  # fmt: skip
        stats = t.measure(CFG, later)
        # a base file of just those windows: each run of the tool evaluates 2 windows, never the o before them
        # (one run; two when it lost its statistics and ran again; three when both lost them and the saved
        # log-probs were scored instead — llama.cpp's logger loses its last lines now and then, more under load)
        assert stats.forward_tokens in tuple(k * 2 * 128 for k in range(1, t.retries + 3))
        t.kld_source = KLDSource.logits
        logits = t.measure(CFG, later)
        assert logits.forward_tokens == 2 * 128  # save mode on a text of just those windows
        ref = ip.measure(CFG, later)
        assert logits.stats.kld_mean == pytest.approx(ref.stats.kld_mean, rel=5e-3)
        assert np.corrcoef(_vec(logits), _vec(ref))[0, 1] > 0.999  # the same tokens, paired
        cached = sorted(p.name for p in (cache / "logprobs").glob("*tools*"))
        assert len(cached) == 1 and cached[0].endswith(".kld")  # one base file for every slice


def test_bench_measure_reports_the_stream_ratio_and_its_floor(tiny, corpus):
    """`bench measure` times stream scoring beside llama-perplexity on the same files and reports the
    floor the model's shapes allow (head and body multiply-adds read independently with gguf-py here)."""
    import math

    import gguf

    from mqpredict.bench.measure import stream_floor

    p = mq("bench", "measure", tiny, "--corpus", corpus, "--ctx", "128", "--tokens", "256", "--repeats", "1",
           "--threads", "1", "--json", check=True, timeout=900)  # fmt: skip
    res = json.loads(p.stdout)
    assert res["tokens_stream"] == 256 and res["tokens_windows"] == 4 * 63  # 4 chunks of 128
    assert res["stream_ratio"] == pytest.approx((res["eval_stream_s"] / 256) / (res["eval_tool_s"] / 252))
    reader = gguf.GGUFReader(str(tiny))
    body = sum(math.prod(int(x) for x in t.shape) for t in reader.tensors
               if t.name.startswith("blk.") and len(t.shape) == 2)  # fmt: skip
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head = math.prod(int(x) for x in embd.shape)  # n_embd × n_vocab
    assert res["head_to_body"] == pytest.approx(head / body)
    assert res["stream_floor"] == pytest.approx(stream_floor(head / body, 128, 4))
    # with no head the floor is the forward tokens' ratio alone: (128 + 3·64)/256 ÷ 128/63
    assert stream_floor(0.0, 128, 4) == pytest.approx((320 / 256) / (128 / 63))
    assert 0.5 < res["stream_floor"] < 1 and res["stream_ratio"] > 0
    # the forward passes alone: part of each evaluation's time, so below the whole-time ratio
    assert 0 < res["decode_stream_s"] < res["eval_stream_s"] and 0 < res["decode_inprocess_s"] < res["eval_inprocess_s"]
    assert res["stream_decode_ratio"] == pytest.approx((res["decode_stream_s"] / 256) / (res["eval_tool_s"] / 252))
    assert res["stream_decode_vs_windows"] == pytest.approx((res["decode_stream_s"] / 256) / (res["decode_inprocess_s"] / 252))
    assert res["stream_decode_ratio"] < res["stream_ratio"]
