"""The embedded real model (SmolLM2-135M, restored by dithering): small budgets, real llama.cpp runs."""

from __future__ import annotations

import pytest

from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.size import size_of
from tests.conftest import CORPUS

pytestmark = pytest.mark.real
SPEC = EvalSpec(ctx=512, n_chunks=2)  # 510 scored tokens: enough to order types, ~1.5 s per config


@pytest.fixture(scope="module")
def smollm2():
    from mqpredict.base.embedded import prepare_embedded

    return prepare_embedded("smollm2")


def test_restored_base_records_its_origin(smollm2):
    m = ModelInfo.load(smollm2)
    assert m.base_origin == "dither:Q4_1+Q8_0"
    assert not m.quantized_tensors and m.n_embd == 576 and m.tied_embeddings
    assert m.header.get("mqpredict.base.source_sha256")
    k_capable = [g for g, ts in m.groups.items() if all(t.shape[0] % 256 == 0 for t in ts)]
    assert k_capable == ["ffn_down"]


def test_preset_sizes_exact_and_collapsing_configs(smollm2):
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.quant.resolve import types_key

    with InProcessEngine(smollm2, None, SPEC, threads=2) as eng:
        for text in ("Q8_0", "Q4_K_M", "Q3_K_M", "default=Q5_0,ffn_down=Q6_K"):
            b = eng.build(Config.parse(text))
            assert b.path.stat().st_size == size_of(eng.model, eng.resolve(Config.parse(text))).size_bytes
        # on a 576-wide model Q4_K and Q5_0 are the same file everywhere but ffn_down
        a = eng.resolve(Config.parse("default=Q4_K,ffn_down=Q6_K"))
        b = eng.resolve(Config.parse("default=Q5_0,ffn_down=Q6_K"))
        assert types_key(eng.model, a) == types_key(eng.model, b)


def test_engines_agree_and_dither_orders_types(smollm2):
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.llama.tools import ToolsEngine

    with InProcessEngine(smollm2, CORPUS, SPEC, threads=2) as a, ToolsEngine(smollm2, CORPUS, SPEC, threads=2) as b:
        ma = {c: a.measure(Config.parse(c)).stats for c in ("Q8_0", "Q4_1", "Q4_K_M")}
        mb = b.measure(Config.parse("Q4_K_M")).stats
    assert ma["Q4_K_M"].kld_mean == pytest.approx(mb.kld_mean, rel=0.01)
    assert abs(ma["Q4_K_M"].same_top_p - mb.same_top_p) <= 0.005
    assert ma["Q8_0"].kld_mean < ma["Q4_K_M"].kld_mean < ma["Q4_1"].kld_mean  # as on a true F16 model
