"""Bases: the tiny test model, in-bin dithering of every supported type, and why it matters."""

from __future__ import annotations

import numpy as np
import pytest

from mqpredict.base.dither import DITHERABLE, bin_steps, restore
from mqpredict.base.prepare import Restore, prepare_base
from mqpredict.base.testmodel import TinyShape, write_test_model
from mqpredict.errors import InputError
from mqpredict.llama.quantize import pure_quantize
from mqpredict.quant.header import read_header
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.types import T

SUBBLOCK = {T.Q2_K: 16, T.Q3_K: 16, T.Q6_K: 16}  # others: 32


def test_testmodel_is_deterministic(tmp_path):
    a = write_test_model(tmp_path / "a.gguf", seed=7)
    b = write_test_model(tmp_path / "b.gguf", seed=7)
    c = write_test_model(tmp_path / "c.gguf", seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    m = ModelInfo.load(write_test_model(tmp_path / "d.gguf", shape=TinyShape(n_embd=576, n_ff=1536, n_layers=2, tied=True)))
    assert (m.n_embd, m.n_ff, m.n_layers, m.tied_embeddings) == (576, 1536, 2, True)
    with pytest.raises(InputError):
        write_test_model(tmp_path / "e.gguf", shape=TinyShape(n_embd=100))


@pytest.fixture(scope="module")
def quantized(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    return {t: read_header(pure_quantize(tiny, d / f"{t.name}.gguf", t)) for t in sorted(DITHERABLE, key=lambda x: x.name)}


@pytest.mark.parametrize("qtype", sorted(DITHERABLE, key=lambda t: t.name), ids=lambda t: t.name)
def test_steps_are_the_grid_spacing(quantized, qtype):
    """Within each (sub-)block, dequantized weights differ by whole multiples of the step."""
    h = quantized[qtype]
    t = h.tensor_map["blk.1.ffn_down.weight"]
    assert t.qtype == qtype
    raw = np.memmap(h.path, dtype=np.uint8, mode="r", offset=h.data_offset + t.offset, shape=(t.nbytes,))
    w = restore(raw, qtype, t.shape, t.name, 0, dither=False).reshape(-1)
    step = bin_steps(raw, qtype)
    sub = SUBBLOCK.get(qtype, 32)
    ws, ss = w.reshape(-1, sub), step.reshape(-1, sub)
    assert np.all(ss == ss[:, :1])  # one step per sub-block
    ok = ss[:, 0] > 0
    k = (ws[ok] - ws[ok][:, :1]) / ss[ok][:, :1]
    assert np.abs(k - np.round(k)).max() < 2e-3


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_dither_stays_in_bin_and_is_seeded(quantized, qtype):
    h = quantized[qtype]
    t = h.tensor_map["blk.0.attn_q.weight"]
    raw = np.memmap(h.path, dtype=np.uint8, mode="r", offset=h.data_offset + t.offset, shape=(t.nbytes,))
    plain = restore(raw, qtype, t.shape, t.name, 0, dither=False).reshape(-1)
    a = restore(raw, qtype, t.shape, t.name, 0, dither=True).reshape(-1)
    b = restore(raw, qtype, t.shape, t.name, 0, dither=True).reshape(-1)
    c = restore(raw, qtype, t.shape, t.name, 1, dither=True).reshape(-1)
    step = bin_steps(raw, qtype)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.all(np.abs(a - plain) <= step / 2 + 1e-6)
    assert np.abs(a - plain).mean() > 0.2 * step.mean()  # actually moved off the grid


def test_nonuniform_grid_is_refused(tiny, tmp_path):
    q = pure_quantize(tiny, tmp_path / "iq4nl.gguf", T.IQ4_NL)
    with pytest.raises(InputError, match="plain"):
        prepare_base(q, tmp_path / "base.gguf", Restore.DITHER)
    assert not (tmp_path / "base.gguf").exists()
    assert ModelInfo.load(prepare_base(q, tmp_path / "plain.gguf", Restore.PLAIN)).base_origin == "plain:IQ4_NL"


def test_plain_dequantization_makes_its_grid_look_free(tiny, tmp_path, corpus, spec):
    """The pitfall, measured: restore the tiny model from its own Q4_1 quantization. Plainly dequantized,
    Q4_1 looks almost free (its grid is the base's grid); dithered, Q4_1 costs about what it costs on the
    true original."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.quant.config import Config

    def q41_kld(base) -> float:
        with InProcessEngine(base, corpus, spec, threads=2) as eng:
            return eng.measure(Config.parse("Q4_1")).stats.kld_mean

    truth = q41_kld(tiny)
    q41 = pure_quantize(tiny, tmp_path / "q41.gguf", T.Q4_1)
    got = {}
    for mode in Restore:
        base = prepare_base(q41, tmp_path / f"{mode.value}.gguf", mode, seed=0)
        m = ModelInfo.load(base)
        assert m.base_origin == f"{mode.value}:Q4_1" and not m.quantized_tensors
        assert m.header.get("mqpredict.base.seed") == 0
        got[mode] = q41_kld(base)
    assert got[Restore.PLAIN] < 0.1 * truth  # the artefact: its own grid looks free
    assert 0.67 * truth < got[Restore.DITHER] < 1.5 * truth  # a plausible original
