"""Weight errors that scale: rows quantized in memory by llama.cpp's own quantizer (byte-identical to
llama-quantize, with and without an imatrix), tables keyed by (model, imatrix), within 2% of the old method."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mqpredict.errors import LlamaError
from mqpredict.llama.qchunk import dequantize_rows, quantize_rows
from mqpredict.llama.tools import find_tool
from mqpredict.quant.header import read_header
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import T
from mqpredict.surrogate.weight_error import (
    ERROR_TYPES, IMATRIX_ONLY_TYPES, READ_BY, ErrorTable, cached_table, compute, objective_weights, sample_rows,
    stream_readers, table_file, table_for,
)  # fmt: skip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_imatrix(tiny, tmp_path_factory):
    """An imatrix of the tiny model computed by llama-imatrix on the shipped calibration text (4 × 128 tokens)."""
    from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
    from mqpredict.util.paths import DEFAULT_CALIBRATION

    out = tmp_path_factory.mktemp("imatrix") / "tiny.imatrix.gguf"
    im, _ = compute_imatrix(tiny, DEFAULT_CALIBRATION, out, ImatrixSettings(4, 128), threads=2)
    return im


def _rows(h, name: str) -> np.ndarray:
    t = h.tensor_map[name]
    mm = np.memmap(h.path, dtype=np.uint8, mode="r")
    return np.asarray(mm[h.data_offset + t.offset : h.data_offset + t.offset + t.nbytes]).reshape(t.n_elements // t.shape[0], -1)


@pytest.mark.parametrize("qtype,with_imatrix", [(T.Q4_K, False), (T.Q6_K, False), (T.IQ4_NL, False), (T.Q4_K, True),
                                                (T.Q5_0, True), (T.IQ3_S, True), (T.IQ2_XS, True)])  # fmt: skip
def test_rows_quantized_in_memory_are_llama_quantize_bytes(tiny, tiny_imatrix, tmp_path, qtype, with_imatrix):
    """The real llama-quantize binary quantizes the whole model; the same rows quantized in memory (all of
    them, and a sample) are the same bytes — with the imatrix's weights when it is given."""
    out = tmp_path / "pure.gguf"
    cmd = [str(find_tool("llama-quantize"))]
    if with_imatrix:
        cmd += ["--imatrix", str(tiny_imatrix.path)]
    if qtype in (T.IQ2_XS,):  # the imatrix holds no weights for token_embd/output: llama.cpp would abort there
        cmd += ["--tensor-type", r"^token_embd\.weight$=q8_0", "--tensor-type", r"^output\.weight$=q8_0"]
    p = subprocess.run(cmd + ["--pure", str(tiny), str(out), qtype.name, "2"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-400:]
    model, h = ModelInfo.load(tiny), read_header(out)
    checked = 0
    for t in model.assignable:
        if h.tensor_map[t.name].qtype != qtype:
            continue
        rows = _rows(model.header, t.name).view(np.float32)
        w = tiny_imatrix.entries.get(t.name) if with_imatrix else None
        want = _rows(h, t.name)
        assert np.array_equal(quantize_rows(qtype, rows, w), want), t.name
        pick = sample_rows(model, t, 2048, 3, 0)
        assert len(pick) < len(rows) and np.array_equal(quantize_rows(qtype, rows[pick], w), want[pick])
        checked += 1
        back = dequantize_rows(qtype, want[:4], t.shape[0])  # and ggml reads them back close to the weights
        assert back.shape == (4, t.shape[0]) and ((back - rows[:4]) ** 2).sum() < 0.2 * (rows[:4] ** 2).sum()
    assert checked >= 28  # every block tensor at least


def test_types_that_need_weights_are_refused_not_aborted():
    rows = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    with pytest.raises(LlamaError, match="IQ2_XXS"):
        quantize_rows(T.IQ2_XXS, rows)  # ggml would abort the process
    assert quantize_rows(T.IQ2_XXS, rows, np.ones(256, np.float32)).shape == (2, 66)


def test_table_within_two_percent_of_the_pure_quantization_method(any_tiny, tmp_path):
    """The version-1 table (full pure quantizations) and the sampled in-memory one agree per (group, type)."""
    from mqpredict.bench.weights import agreement, from_pure, old_picks
    from mqpredict.llama.inprocess import InProcessEngine

    model = ModelInfo.load(any_tiny)
    new = compute(model, "m", None, ERROR_TYPES, threads=2)
    with InProcessEngine(any_tiny, None, threads=2, cache=tmp_path) as eng:
        old = from_pure(model, "m", {qt: eng.pure_header(qt) for qt in ERROR_TYPES})
    pairs = agreement(old, new)
    assert len(pairs) >= 5 * len(model.groups)
    worst = max(pairs, key=lambda p: p.rel_diff)
    assert worst.rel_diff < 0.02, worst
    assert not list(tmp_path.rglob("weight_errors*"))  # the new table writes nothing
    # `bench weights --reference rows`: the old method's own rows quantized in memory give its values
    same = compute(model, "m", None, ERROR_TYPES, threads=2, rows=old_picks)
    assert max(p.rel_diff for p in agreement(old, same)) < 1e-5


def test_table_holds_per_tensor_errors_and_energies(tiny):
    model = ModelInfo.load(tiny)
    t = compute(model, "m", None, (T.Q8_0, T.Q4_K, T.Q2_K), threads=1)
    assert t.imatrix_id is None and not t.weighted and t.key == "m" and t.types == ("Q8_0", "Q4_K", "Q2_K")
    for g, ts in model.groups.items():  # a group's error is the energy-weighted mean of its tensors'
        for q in ("Q8_0", "Q4_K", "Q2_K"):
            e = sum(t.tensors[x.name][q] * t.energy[x.name] for x in ts) / sum(t.energy[x.name] for x in ts)
            assert t.mse(g, q) == pytest.approx(e, rel=1e-12)
    name = "blk.0.ffn_down.weight"
    w = np.asarray(_rows(model.header, name).view(np.float32), dtype=np.float64)
    assert t.energy[name] == pytest.approx(float((w * w).sum()), rel=0.02)  # extrapolated from the sample
    assert t.abs_error(name, "Q4_K") == pytest.approx(t.tensors[name]["Q4_K"] * model.header.tensor_map[name].n_elements)
    assert t.tensors[name]["Q8_0"] < t.tensors[name]["Q4_K"] < t.tensors[name]["Q2_K"]
    assert ErrorTable.from_json(json.loads(json.dumps(t.to_json()))) == t


def test_imatrix_table_is_weighted_and_holds_the_low_bit_types(tiny, tiny_imatrix):
    model = ModelInfo.load(tiny)
    types = (T.Q4_K, *IMATRIX_ONLY_TYPES)
    plain = compute(model, "m", None, (T.Q4_K,), threads=2, sample_elements=8192)
    weighted = compute(model, "m", tiny_imatrix, types, threads=2, sample_elements=8192)
    assert weighted.key == f"m-im{tiny_imatrix.id}" and weighted.weighted and weighted.imatrix_id == tiny_imatrix.id
    blk = "blk.1.attn_q.weight"
    assert set(weighted.tensors[blk]) == {q.name for q in types}
    # no imatrix weights for token_embd/output: the types that need them are not there (llama.cpp would abort)
    assert "IQ2_XS" not in weighted.tensors["token_embd.weight"] and "IQ3_XXS" in weighted.tensors["output.weight"]
    # the error on the channels the activations use differs from the plain one where the imatrix is uneven
    assert weighted.tensors[blk]["Q4_K"] != pytest.approx(plain.tensors[blk]["Q4_K"], rel=1e-3)
    a = tiny_imatrix.entries[blk].astype(np.float64)
    w = np.asarray(_rows(model.header, blk).view(np.float32), dtype=np.float64)
    assert weighted.energy[blk] == pytest.approx(float((a * w * w).sum()), rel=0.05)  # from 64 of 256 rows


def test_objective_weighs_the_parameters_a_token_uses(tiny, tiny_imatrix, tmp_path):
    """The allocator's objective is Σ relative error × the parameters a token uses; an untied token_embd (its
    error, with an imatrix, each row's error as blk.0.attn_norm sees it) weighs what the layer-0 tensors reading
    the normalised stream weigh — not one row's worth, which made Q2_K embeddings look free."""
    model = ModelInfo.load(tiny)
    emb = model.header.tensor_map["token_embd.weight"]
    assert not model.tied_embeddings
    every_row = lambda t: np.arange(t.n_elements // t.shape[0])  # noqa: E731
    table = compute(model, "m", tiny_imatrix, (T.Q8_0, T.Q2_K), threads=2, rows=every_row)
    readers = stream_readers(model)
    assert sorted(n.split(".")[2] for n in readers) == ["attn_k", "attn_q", "attn_v", "ffn_gate", "ffn_up"]
    assert table.weights == objective_weights(model)
    assert all(table.weights[t.name] == t.n_elements for t in model.assignable if t.name != emb.name)
    assert table.weights[emb.name] == sum(model.header.tensor_map[n].n_elements for n in readers)
    w = dequantize_rows(emb.qtype, _rows(model.header, emb.name), emb.shape[0]).astype(np.float64)
    g = _rows(model.header, f"{READ_BY}.weight").view(np.float32).ravel().astype(np.float64)
    q = dequantize_rows(T.Q2_K, quantize_rows(T.Q2_K, w.astype(np.float32)), emb.shape[0]).astype(np.float64)
    a = g * g / (w * w).mean(axis=1, keepdims=True)
    err = float((a * (w - q) ** 2).sum() / (a * w * w).sum())
    assert table.tensors[emb.name]["Q2_K"] == pytest.approx(err, rel=1e-6)
    assert table.abs_error(emb.name, "Q2_K") == pytest.approx(err * table.weights[emb.name])
    everything_at = {g: {"Q2_K": 1.0} for g in model.groups}  # the objective adds the tensors' terms
    assert table.config_error(everything_at) == pytest.approx(
        sum(table.abs_error(t.name, "Q2_K") for t in model.assignable), rel=0.05)
    plain = compute(model, "m", None, (T.Q2_K,), threads=2, rows=every_row)  # without an imatrix: plain MSE
    assert plain.weights == table.weights and plain.energy[emb.name] == pytest.approx(float((w * w).sum()), rel=1e-6)
    # a cached table of an older mqpredict (weighed by energy, no weights) is recomputed, not used
    path = tmp_path / table_file("m", tiny_imatrix.id)
    path.write_text(json.dumps({k: v for k, v in table.to_json().items() if k != "weights"}))
    assert ErrorTable.load(path).stale and not table.stale and cached_table(path) is None
    got = table_for(model, "m", tiny_imatrix, 2, cache=tmp_path, types=(T.Q2_K,))
    assert got.weights == table.weights and cached_table(path) == got


def test_tables_are_cached_per_model_and_imatrix(tiny, tiny_imatrix, tmp_path):
    model = ModelInfo.load(tiny)
    plain = table_for(model, "m", None, 2, cache=tmp_path, types=(T.Q8_0,))
    assert set(plain.types) == {q.name for q in ERROR_TYPES}  # a cached table holds every type
    assert table_for(model, "m", None, 2, cache=tmp_path, types=(T.Q4_K,)) == plain  # from the file
    path = tmp_path / table_file("m", tiny_imatrix.id)
    path.write_text(json.dumps({**plain.to_json(), "imatrix_id": tiny_imatrix.id, "types": ["Q4_K"]}))
    got = table_for(model, "m", tiny_imatrix, 2, cache=tmp_path, types=(T.Q4_K,))
    assert got.imatrix_id == tiny_imatrix.id and got.types == ("Q4_K",)  # it holds the type asked for
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([table_file("m"), table_file("m", tiny_imatrix.id)])


def test_version_one_tables_stay_readable():
    from mqpredict.surrogate.data import load_tables

    folder = ROOT / "datasets" / "weight_errors"
    old = [p for p in sorted(folder.glob("*.json")) if json.loads(p.read_text())["version"] == 1]
    assert old
    t = ErrorTable.load(old[0])
    assert t.imatrix_id is None and not t.tensors and t.key == t.model_id == old[0].stem
    assert t.config_error({g: {"Q8_0": 1.0} for g in t.errors}) > 0
    assert old[0].stem in load_tables(folder)


def test_bench_weights_cli(tiny):
    from tests.conftest import mq

    p = mq("bench", "weights", tiny, "--reference", "rows", "--json", "-t", "2")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["reference"] == "rows" and doc["old_disk_bytes"] == 0 and doc["n_types"] == len(ERROR_TYPES)
    assert doc["n_pairs"] >= 30 and doc["max_rel_diff"] < 0.02 and doc["share_within_2pct"] == 1.0
    bad = mq("bench", "weights", tiny, "--reference", "nope")
    assert bad.returncode != 0 and "--reference" in bad.stderr
