"""Config: parsing, canonical keys that round-trip, TOML, export to llama-quantize."""

from __future__ import annotations

import random
import re

import pytest

from mqpredict.errors import ConfigError, InputError
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.presets import Preset
from mqpredict.quant.resolve import quantize_command, resolve, tensor_pattern, tensor_type_lines
from mqpredict.quant.types import T, TARGET_TYPES


def test_forms():
    assert Config.parse("Q4_K_M") == Config(preset=Preset.Q4_K_M)
    assert Config.parse("q4_k") == Config(preset=Preset.Q4_K_M)  # llama-quantize's alias
    c = Config.parse("default=Q4_K, ffn_down=q6_k ,embeddings=Q8_0")
    assert c.default == T.Q4_K and c.group_types == {"ffn_down": T.Q6_K, "embeddings": T.Q8_0}
    assert Config.parse("Q4_K_M,ffn_down=Q6_K").preset == Preset.Q4_K_M
    t = Config.parse(r"default=Q5_0,tensor:blk\.0\.ffn_down=Q8_0")
    assert t.tensors == ((r"blk\.0\.ffn_down", T.Q8_0),)


def test_canonical_key_orders_and_drops_redundancy():
    a = Config.parse("default=Q4_K,ffn_down=Q6_K,embeddings=Q8_0,attn_q=Q4_K")
    b = Config.parse("embeddings=Q8_0,default=Q4_K,ffn_down=Q6_K")
    assert a == b
    assert a.key == "default=Q4_K,embeddings=Q8_0,ffn_down=Q6_K"
    assert Config.parse("Q8_0").key == "preset=Q8_0"


def test_key_round_trips_for_random_configs():
    rng = random.Random(0)
    groups = ["embeddings", "lm_head", "attn_q", "attn_kv", "attn_output", "ffn_up_gate", "ffn_down", "attn_q_a"]
    types = list(TARGET_TYPES)
    for _ in range(300):
        if rng.random() < 0.3:
            c = Config(preset=rng.choice(list(Preset)))
        else:
            c = Config(default=rng.choice(types))
        gs = tuple((g, rng.choice(types)) for g in rng.sample(groups, rng.randint(0, 4)))
        ts = tuple((rf"blk\.{i}\.", rng.choice(types)) for i in range(rng.randint(0, 2)))
        c = Config(c.default, c.preset, gs, ts)
        assert Config.parse(c.key) == c
        assert Config.parse(c.key).key == c.key


def test_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('default = "Q4_K"\nffn_down = "Q6_K"\n[groups]\nembeddings = "Q8_0"\n[tensors]\n\'blk\\.0\\.\' = "Q8_0"\n')
    c = Config.parse(str(p))
    assert c == Config(T.Q4_K, None, (("ffn_down", T.Q6_K), ("embeddings", T.Q8_0)), ((r"blk\.0\.", T.Q8_0),))
    p2 = tmp_path / "d.toml"
    p2.write_text(c.to_toml())
    assert Config.from_toml(p2) == c


@pytest.mark.parametrize(
    "text,word",
    [
        ("default=Q9_Z", "Q9_Z"),
        ("default=Q4_K,ffn_down=Q7", "Q7"),
        ("ffn_down=Q6_K", "no default type or preset"),
        ("Q4_K_M,default=Q4_K", "both a preset and a default"),
        ("default=Q4_K,ffn_down=Q6_K,ffn_down=Q8_0", "twice"),
        ("default=Q4_K,Attn-Q=Q8_0", "not a group name"),
        ("default=Q4_K,Q8_0", "not NAME=TYPE"),
        ("Q4_K_X", "not NAME=TYPE"),
        ("", "empty config"),
        ("default=Q4_K,tensor:blk[=Q8_0", "not a valid regular expression"),
    ],
)
def test_malformed_configs_name_the_problem(text, word):
    with pytest.raises(InputError, match=re.escape(word)):
        Config.parse(text)


def test_bad_toml_names_the_file(tmp_path):
    p = tmp_path / "broken.toml"
    p.write_text("default = \n")
    with pytest.raises(InputError, match="broken.toml"):
        Config.parse(str(p))
    q = tmp_path / "typo.toml"
    q.write_text('default = "Q4_K"\nffn_down = "Q6K"\n')
    with pytest.raises(InputError, match=r"typo\.toml.*Q6K"):
        Config.parse(str(q))


def test_config_against_a_model(tiny, tiny576):
    m = ModelInfo.load(tiny)
    with pytest.raises(ConfigError, match="moe_experts_down"):
        resolve(m, Config.parse("default=Q4_K,moe_experts_down=Q6_K"))
    with pytest.raises(ConfigError, match="needs an importance matrix"):
        resolve(m, Config.parse("default=Q4_K,ffn_down=IQ2_XXS"))
    with pytest.raises(ConfigError, match="never quantizes"):
        resolve(m, Config.parse("default=Q4_K,tensor:attn_norm=Q8_0"))
    with pytest.raises(ConfigError, match="matches no tensor"):
        resolve(m, Config.parse("default=Q4_K,tensor:nothing_like_this=Q8_0"))
    tied = ModelInfo.load(tiny576)
    with pytest.raises(ConfigError, match="ties its embeddings"):
        resolve(tied, Config.parse("default=Q4_K,lm_head=Q6_K"))


def test_export_lines_reproduce_the_config(any_tiny):
    """The tensor-type file, read back as llama-quantize reads it, gives the same effective types."""
    m = ModelInfo.load(any_tiny)
    for text in ("default=Q4_K,ffn_down=Q6_K,embeddings=Q8_0", "default=F16,ffn_down=Q4_K",
                 r"default=Q5_0,tensor:blk\.1\.attn_q=Q8_0,attn_kv=Q6_K"):  # fmt: skip
        cfg = Config.parse(text)
        lines = tensor_type_lines(m, cfg)
        assert all(" " not in ln and ln == ln.lower() for ln in lines)
        from mqpredict.llama.quantize import parse_type_lines
        from mqpredict.quant.presets import DEFAULT_TYPE
        from mqpredict.quant.resolve import export_preset

        as_overrides = Config(DEFAULT_TYPE[export_preset(cfg)], None, (), tuple(parse_type_lines(lines)))
        assert resolve(m, as_overrides) == resolve(m, cfg)
    cmd = quantize_command(m, Config.parse("default=Q4_K,ffn_down=Q6_K"), "out.gguf", "tt.txt")
    assert cmd[:4] == ["llama-quantize", "--pure", "--tensor-type-file", "tt.txt"]
    assert cmd[-1] == "Q4_K_M"


def test_tensor_pattern_is_anchored():
    p = tensor_pattern("blk.3.ffn_down.weight")
    assert p == r"^blk\.\d+\.ffn_down\.weight$"
    assert re.search(p, "blk.12.ffn_down.weight") and not re.search(p, "blk.1.ffn_down_exps.weight")
    assert not re.search(tensor_pattern("token_embd.weight"), "per_layer_token_embd.weight")
