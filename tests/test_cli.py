"""The command line as a user runs it (subprocess): JSON contracts and every bad input from the issue."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from mqpredict.quant.header import read_header
from mqpredict.quant.ggufwrite import TensorOut, copied_kvs, write_gguf
from tests.conftest import mq

SMALL = ["--ctx", "128", "--tokens", "256"]  # stream: 256 scored tokens (windows: 4 of 128 → 252)


def _json(p: subprocess.CompletedProcess):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)  # stdout holds exactly one JSON document


def _fails(p: subprocess.CompletedProcess, *words: str) -> str:
    """A clean user error: non-zero exit, no traceback, one line on stderr naming the problem."""
    assert p.returncode != 0
    text = p.stderr
    assert "Traceback" not in text and "Traceback" not in p.stdout
    lines = [x for x in text.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1, text
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- contracts
def test_testmodel_inspect_json(tmp_path):
    p = tmp_path / "t.gguf"
    assert mq("testmodel", p, "--seed", 3, "--n-embd", 576, "--n-ff", 1536, "--layers", 2, "--tied").returncode == 0
    doc = _json(mq("inspect", p, "--json"))
    assert doc["architecture"] == "llama" and doc["tied_embeddings"] is True and doc["n_layers"] == 2
    groups = {g["group"]: g for g in doc["groups"]}
    assert "lm_head" not in groups
    assert [g for g, v in groups.items() if v["k_quants"]] == ["ffn_down"]  # 576 wide: only ffn_down
    assert doc["fixed"]["n_tensors"] == 2 * 2 + 1
    human = mq("inspect", p)
    assert "ffn_down" in human.stdout and "fall back" in human.stdout


def test_size_json_contract(tiny):
    one = _json(mq("size", tiny, "--config", "default=Q4_K,ffn_down=Q6_K", "--json"))
    assert {"size_bytes", "bpw", "tensors"} <= set(one)
    t0 = one["tensors"][0]
    assert set(t0) == {"name", "group", "type", "bytes"}
    assert sum(t["bytes"] for t in one["tensors"]) < one["size_bytes"]
    rows = _json(mq("size", tiny, "-c", "Q2_K", "-c", "Q8_0", "-c", "Q4_K_M", "--json"))
    assert [r["config"] for r in rows] == ["preset=Q2_K", "preset=Q8_0", "preset=Q4_K_M"]  # given order


def test_build_and_recipe_command_are_exact(tiny, tmp_path):
    """`recipe` prints the llama-quantize command; running it gives the very file `build` writes."""
    from mqpredict.llama.tools import find_tool

    cfg = r"default=Q5_0,ffn_down=Q6_K,tensor:blk\.0\.attn_q=Q8_0"
    out = tmp_path / "b.gguf"
    doc = _json(mq("build", tiny, "-c", cfg, "-o", out, "--json"))
    assert out.stat().st_size == doc["size_bytes"] == _json(mq("size", tiny, "-c", cfg, "--json"))["size_bytes"]
    rec = _json(mq("recipe", tiny, "-c", cfg, "-o", tmp_path / "tt.txt", "--gguf-out", tmp_path / "r.gguf", "--json"))
    cmd = [str(find_tool("llama-quantize")), *rec["command"][1:]]
    subprocess.run(cmd, check=True, capture_output=True)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256((tmp_path / "r.gguf").read_bytes()).digest()


def test_measure_json_contract(tiny, tmp_path):
    rows = _json(mq("measure", tiny, "-c", "Q2_K", "-c", "Q8_0", *SMALL, "--keep", tmp_path, "--json"))
    need = {"config", "size_bytes", "bpw", "kld_mean", "kld_mean_err", "kld_median", "kld_p99", "kld_max",
            "same_top_p", "ppl_base", "ppl", "n_tokens", "per_token_path", "engine", "llama_version"}  # fmt: skip
    assert all(need <= set(r) for r in rows)
    assert [r["config"] for r in rows] == ["preset=Q2_K", "preset=Q8_0"]
    assert rows[1]["kld_mean"] < rows[0]["kld_mean"]
    assert rows[0]["scoring"] == "stream" and rows[0]["n_tokens"] == 256  # the default: every token once
    kept = sorted(tmp_path.glob("*.gguf"))
    assert len(kept) == 2
    again = _json(mq("measure", tiny, "--gguf", kept[0], *SMALL, "--json"))[0]  # a ready GGUF of the base
    assert again["kld_mean"] == pytest.approx(rows[1 if "Q8_0" in kept[0].name else 0]["kld_mean"], rel=1e-9)


def test_measure_tools_engine(tiny):
    rows = _json(mq("measure", tiny, "-c", "Q4_K_M", *SMALL, "--engine", "tools", "--json"))
    assert rows[0]["engine"] == "tools" and rows[0]["kld_mean"] > 0
    assert rows[0]["kld_source"] in ("llama-perplexity statistics", "llama-perplexity logits")
    logits = _json(mq("measure", tiny, "-c", "Q4_K_M", *SMALL, "--engine", "tools", "--tools-kld", "logits", "--json"))
    assert logits[0]["kld_source"] == "llama-perplexity logits" and logits[0]["per_token_path"]
    assert logits[0]["kld_mean"] == pytest.approx(rows[0]["kld_mean"], rel=5e-3)
    _fails(mq("measure", tiny, "-c", "Q4_K_M", *SMALL, "--engine", "tools", "--tools-kld", "bogus"), "bogus")


def test_help_explains():
    p = mq("measure", "--help")
    assert p.returncode == 0 and "--corpus" in p.stdout and "llama-perplexity" in p.stdout
    assert "demo" in mq("--help").stdout


# ----------------------------------------------------------------------------- bad input
def test_missing_path(tmp_path):
    _fails(mq("size", tmp_path / "nope.gguf", "-c", "Q4_K_M"), "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    f = tmp_path / "notes.gguf"
    f.write_text("hello world\n" * 100)
    _fails(mq("inspect", f), "notes.gguf", "not a GGUF")


@pytest.fixture
def truncated(tiny, tmp_path) -> Path:
    t = tmp_path / "trunc.gguf"
    t.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 3])
    return t


def test_truncated_gguf(truncated, tmp_path):
    _fails(mq("size", truncated, "-c", "Q8_0"), "trunc.gguf", "truncated")
    _fails(mq("measure", truncated, "-c", "Q8_0", *SMALL), "trunc.gguf", "truncated")
    out = tmp_path / "out.gguf"
    _fails(mq("build", truncated, "-c", "Q4_K_M", "-o", out), "trunc.gguf")
    assert not out.exists() and not list(tmp_path.glob(".out.gguf*"))  # no partial output left


def test_header_truncated(tiny, tmp_path):
    t = tmp_path / "head.gguf"
    t.write_bytes(tiny.read_bytes()[:3000])  # cut inside the metadata
    _fails(mq("inspect", t), "head.gguf", "truncated")


def test_quantized_base_refused(tiny, tmp_path):
    q = tmp_path / "q4.gguf"
    assert mq("build", tiny, "-c", "Q4_K_M", "-o", q).returncode == 0
    _fails(mq("measure", q, "-c", "Q8_0", *SMALL), "q4.gguf", "already quantized", "--allow-quantized-base")
    ok = mq("measure", q, "-c", "Q8_0", *SMALL, "--allow-quantized-base", "--json")
    assert ok.returncode == 0, ok.stderr


def test_unknown_quant_type_lists_valid_ones(tiny):
    line = _fails(mq("size", tiny, "-c", "default=Q4_K,ffn_down=Q9_Z"), "Q9_Z", "ffn_down")
    assert "Q6_K" in line and "IQ4_XS" in line


def test_unknown_preset(tiny):
    _fails(mq("size", tiny, "-c", "Q4_K_X"), "Q4_K_X")


def test_group_the_model_lacks(tiny, tiny576):
    _fails(mq("size", tiny, "-c", "default=Q4_K,moe_experts_down=Q6_K"), "moe_experts_down", "tiny.gguf")
    _fails(mq("size", tiny576, "-c", "default=Q4_K,lm_head=Q8_0"), "lm_head", "ties its embeddings")


def test_type_not_allowed_for_a_tensor(tiny):
    _fails(mq("size", tiny, "-c", "default=Q4_K,ffn_down=IQ2_XXS"), "IQ2_XXS", "blk.0.ffn_down.weight", "importance matrix")
    _fails(mq("size", tiny, "-c", "default=Q4_K,tensor:ffn_norm=Q8_0"), "never quantizes")


def test_malformed_config_file(tiny, tmp_path):
    f = tmp_path / "cfg.toml"
    f.write_text("default = [\n")
    _fails(mq("size", tiny, "-c", f), "cfg.toml", "TOML")


def test_corpus_shorter_than_two_windows(tiny, tmp_path):
    c = tmp_path / "tiny-corpus.txt"
    c.write_text("A short text.\n")
    _fails(mq("measure", tiny, "-c", "Q8_0", "--corpus", c, "--ctx", "128"), "tiny-corpus.txt", "two windows")
    _fails(mq("measure", tiny, "-c", "Q8_0", "--corpus", tmp_path / "none.txt"), "none.txt")


def test_vocab_mismatch(tiny, tiny576, tmp_path):
    other = tmp_path / "other-vocab.gguf"
    assert mq("testmodel", other, "--n-vocab", "400").returncode == 0
    q = tmp_path / "other-q8.gguf"
    assert mq("build", other, "-c", "Q8_0", "-o", q).returncode == 0
    _fails(mq("measure", tiny, "--gguf", q, *SMALL), "other-q8.gguf", "vocabulary")
    _fails(mq("measure", tiny, "--gguf", tiny576, *SMALL), "tiny576.gguf")


def _without_key(src: Path, dst: Path, key: str) -> Path:
    h = read_header(src)
    tensors = [TensorOut(t.name, t.shape, t.qtype, lambda t=t: _raw(h, t)) for t in h.tensors]
    return write_gguf(dst, copied_kvs(h, {key}), tensors, h.alignment)


def _raw(h, t):
    import numpy as np

    return np.fromfile(h.path, dtype=np.uint8, count=t.nbytes, offset=h.data_offset + t.offset)


def test_llama_cpp_failing_to_load(tiny, tmp_path):
    q = tmp_path / "q8.gguf"
    assert mq("build", tiny, "-c", "Q8_0", "-o", q).returncode == 0
    broken = _without_key(q, tmp_path / "broken-q8.gguf", "llama.attention.head_count")
    line = _fails(mq("measure", tiny, "--gguf", broken, *SMALL), "broken-q8.gguf", "could not load")
    assert "blk.0.attn_q.weight" in line  # llama.cpp's own reason (a wrong shape without head_count) is passed on
    bad_base = _without_key(tiny, tmp_path / "broken-base.gguf", "llama.block_count")
    _fails(mq("measure", bad_base, "-c", "Q8_0", *SMALL), "broken-base.gguf")


def test_unsupported_architecture(tiny, tmp_path):
    from mqpredict.quant.ggufwrite import kv_str

    h = read_header(tiny)
    kvs = [kv_str("general.architecture", "notanarch") if kv.key == "general.architecture" else h.raw(kv.span)
           for kv in h.kvs.values()]  # fmt: skip
    tensors = [TensorOut(t.name, t.shape, t.qtype, lambda t=t: _raw(h, t)) for t in h.tensors]
    odd = write_gguf(tmp_path / "odd.gguf", kvs, tensors, h.alignment)
    _fails(mq("measure", odd, "-c", "Q8_0", *SMALL), "odd.gguf", "notanarch")


def test_debug_shows_the_traceback(tmp_path):
    p = mq("--debug", "size", tmp_path / "nope.gguf", "-c", "Q8_0")
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_size_reads_only_the_header_of_a_100gb_file(tiny, tmp_path):
    """A 100 GB model as a sparse file (no disk used): `size` of an explicit config answers from the
    header; reading the tensor data would take minutes and fill the page cache."""
    import os

    from mqpredict.quant.header import pad
    from mqpredict.quant.types import T
    from mqpredict.quant.ggufwrite import header_bytes

    h = read_header(tiny)
    d, ff, layers, vocab = 8192, 28672, 100, 512
    kvs = [kv for kv in (h.raw(k.span) for k in h.kvs.values())]
    tensors = [TensorOut("token_embd.weight", (d, vocab), T.F16, None), TensorOut("output.weight", (d, vocab), T.F16, None)]
    for i in range(layers):
        tensors += [
            TensorOut(f"blk.{i}.attn_q.weight", (d, d), T.F16, None),
            TensorOut(f"blk.{i}.ffn_up.weight", (d, ff), T.F16, None),
            TensorOut(f"blk.{i}.ffn_down.weight", (ff, d), T.F16, None),
        ]
    head = header_bytes(kvs, tensors, 32)
    big = tmp_path / "big-f16.gguf"
    with open(big, "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(pad(t.nbytes, 32) for t in tensors))
    assert big.stat().st_size > 100e9 and big.stat().st_blocks * 512 < 10e6  # sparse: nothing on disk
    doc = _json(mq("size", big, "-c", "default=Q4_K,ffn_down=Q6_K", "--json"))
    assert 0.30 < doc["size_bytes"] / big.stat().st_size < 0.36  # 4.5-bit and 6.56-bit weights from 16-bit
    assert {t["type"] for t in doc["tensors"]} == {"Q4_K", "Q6_K"}
    assert big.stat().st_blocks * 512 < 10e6
    os.unlink(big)
