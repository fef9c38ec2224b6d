"""Importance matrices on real llama.cpp runs: computed by llama-imatrix, read as llama-quantize reads
them, quantized with byte for byte like `llama-quantize --imatrix`, recorded, and refused where they
would mislead (another model's, a truncated file, the evaluation text as calibration)."""

from __future__ import annotations

import json
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from conftest import CORPUS, ROOT, mq

from mqpredict.errors import ConfigError, InputError
from mqpredict.quant.config import Config
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo

TOOLS = Path(sysconfig.get_paths()["purelib"]) / "bin"
SETTINGS = ["--chunks", "8", "--ctx", "128"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """A calibration text with nothing in common with the evaluation corpus (the README, three times)."""
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text((ROOT / "README.md").read_text() * 3)
    return p


@pytest.fixture(scope="module")
def im_path(tiny, calib, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("im") / "tiny.imatrix.gguf"
    doc = json.loads(mq("imatrix", tiny, "--corpus", calib, "-o", out, *SETTINGS, "--json", check=True).stdout)
    assert doc["path"] == str(out) and doc["entries"] > 0 and doc["imatrix_corpus"].startswith("calib-")
    return out


def _quantize_tool(args: list[str], cwd: Path) -> None:
    p = subprocess.run([str(TOOLS / "llama-quantize"), *args], capture_output=True, text=True, cwd=cwd)
    assert p.returncode == 0, p.stderr[-2000:]


def test_imatrix_is_cached_and_remembers_its_text(tiny, calib, im_path, tmp_path):
    again = json.loads(mq("imatrix", tiny, "--corpus", calib, "-o", tmp_path / "b.gguf", *SETTINGS, "--json",
                          check=True).stdout)  # fmt: skip
    assert again["cached"] is True and again["sha256"] == json.loads(
        mq("imatrix", tiny, "--corpus", calib, "-o", tmp_path / "c.gguf", *SETTINGS, "--json", check=True).stdout)["sha256"]
    im = Imatrix.load(im_path)
    assert im.calibration is not None and im.calibration.id.startswith("calib-") and len(im.calibration.sketch) > 100
    assert im.datasets == ("calib.txt",) and im.chunk_count == 8
    # every weight is the mean squared activation of its channel: positive, one per input channel
    assert all((w > 0).all() for w in im.entries.values())
    assert set(im.entries) <= {t.name for t in ModelInfo.load(tiny).tensors}


def test_low_bit_types_and_imatrix_presets_need_one(tiny, tmp_path):
    for cfg in ("IQ2_XXS", "IQ3_S", "default=Q4_K,ffn_down=IQ2_XS"):
        p = mq("build", tiny, "--config", cfg, "-o", tmp_path / "x.gguf")
        assert p.returncode != 0 and "imatrix" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not (tmp_path / "x.gguf").exists()
    p = mq("size", tiny, "--config", "IQ1_S")
    assert p.returncode != 0 and "--imatrix" in p.stderr


@pytest.mark.parametrize("config", ["IQ2_XXS", "IQ3_M", "default=Q4_K,ffn_down=IQ2_XS,attn_kv=IQ1_S,attn_q=IQ3_XXS"])
def test_builds_equal_llama_quantize_with_imatrix(tiny, im_path, tmp_path, config):
    """The stitched file (and its exact predicted size) is byte-identical to llama-quantize --imatrix's."""
    from mqpredict.quant.resolve import quantize_command, tensor_type_lines

    ours = tmp_path / "ours.gguf"
    size = json.loads(mq("size", tiny, "--config", config, "--imatrix", im_path, "--json", check=True).stdout)["size_bytes"]
    mq("build", tiny, "--config", config, "--imatrix", im_path, "-o", ours, check=True)
    assert ours.stat().st_size == size
    cfg, im, model = Config.parse(config), Imatrix.load(im_path), ModelInfo.load(tiny)
    tt = tmp_path / "types.txt"
    tt.write_text("\n".join(tensor_type_lines(model, cfg)) + "\n")
    cmd = quantize_command(model, cfg, str(tmp_path / "ref.gguf"), str(tt), imatrix=im)
    _quantize_tool(cmd[1:], cwd=im_path.parent)  # run where the imatrix is: the same file name goes into the GGUF
    assert (tmp_path / "ref.gguf").read_bytes() == ours.read_bytes()


def test_imatrix_changes_the_bytes_and_the_types_stay_native(tiny, im_path, tmp_path):
    """With an imatrix the same types are quantized differently (other bytes); a 256-wide model writes the
    imatrix-only types as asked (no fallback)."""
    from mqpredict.llama.inprocess import InProcessEngine
    from mqpredict.measure.corpus import EvalSpec

    cfg = Config.parse("default=Q4_K,ffn_down=IQ2_XXS")
    with InProcessEngine(tiny, None, EvalSpec(), imatrix=im_path) as e:
        b = e.build(cfg, tmp_path / "with.gguf")
        assert b.types["blk.0.ffn_down.weight"].name == "IQ2_XXS"
        assert "im" + e.imatrix_id in str(e.pure_path(cfg.default))
    with InProcessEngine(tiny, None, EvalSpec()) as e:
        e.build(Config.parse("default=Q4_K"), tmp_path / "without.gguf")
    from mqpredict.quant.header import read_header

    a, c = read_header(tmp_path / "with.gguf"), read_header(tmp_path / "without.gguf")
    ta, tc = a.tensor_map["blk.0.attn_q.weight"], c.tensor_map["blk.0.attn_q.weight"]
    ra = (tmp_path / "with.gguf").read_bytes()[a.data_offset + ta.offset:][: ta.nbytes]
    rc = (tmp_path / "without.gguf").read_bytes()[c.data_offset + tc.offset:][: tc.nbytes]
    assert ta.qtype == tc.qtype and ra != rc


def test_types_that_need_weights_refused_where_the_imatrix_has_none(tiny, im_path):
    """llama.cpp aborts when IQ2_XXS meets a tensor without imatrix weights (token_embd never has any)."""
    from mqpredict.quant.resolve import resolve

    im, model = Imatrix.load(im_path), ModelInfo.load(tiny)
    assert not im.has("token_embd.weight")
    with pytest.raises(ConfigError, match="token_embd.weight"):
        resolve(model, Config.parse("default=Q8_0,embeddings=IQ2_XXS"), imatrix=im)
    resolve(model, Config.parse("default=Q8_0,embeddings=IQ3_S"), imatrix=im)  # no weights needed there


def test_measurements_carry_the_imatrix(tiny, im_path, tmp_path):
    rows = json.loads(mq("measure", tiny, "--config", "Q4_K_M", "--config", "IQ2_XXS", "--imatrix", im_path,
                         "--corpus", CORPUS, "--ctx", 128, "--tokens", 256, "--no-track", "--json", check=True).stdout)  # fmt: skip
    im = Imatrix.load(im_path)
    assert [r["imatrix_id"] for r in rows] == [im.id, im.id] and rows[0]["imatrix_corpus"] == im.corpus_id
    assert 0 < rows[0]["kld_mean"] < rows[1]["kld_mean"]
    plain = json.loads(mq("measure", tiny, "--config", "Q4_K_M", "--corpus", CORPUS, "--ctx", 128, "--tokens", 256,
                          "--no-track", "--json", check=True).stdout)[0]  # fmt: skip
    assert plain["imatrix_id"] is None and plain["size_bytes"] < rows[0]["size_bytes"]  # the imatrix keys in the file
    # records: the same file types with and without an imatrix are two records with two keys
    store = tmp_path / "store"
    for extra in (["--imatrix", im_path], ["--no-imatrix"]):
        mq("seed", tiny, "--store", store, "--corpus", CORPUS, "--ctx", 128, "--tokens", 256, "--no-track", *extra,
           "--json", check=True)  # fmt: skip
    from mqpredict.records.store import Store

    df = Store(store).load()
    q8 = df[df["config"] == "preset=Q8_0"]
    assert sorted(q8["imatrix_id"].fillna("none")) == sorted([im.id, "none"]) and q8["key"].nunique() == 2
    with_im = df[df["imatrix_id"] == im.id]
    assert {"preset=IQ2_XXS", "preset=IQ1_S", "preset=Q2_K_S"} <= set(with_im["config"])  # the imatrix presets join
    assert not df[df["imatrix_id"].isna()]["config"].str.contains("IQ2_XXS").any()


def test_evaluation_on_the_calibration_text_is_refused(tiny, im_path, tmp_path):
    own = tmp_path / "own.imatrix.gguf"
    mq("imatrix", tiny, "--corpus", CORPUS, "-o", own, *SETTINGS, check=True)  # computing one on any text is fine
    p = mq("measure", tiny, "--config", "Q4_K_M", "--imatrix", own, "--corpus", CORPUS, "--no-track")
    assert p.returncode != 0 and "calibrated on" in p.stderr and "Traceback" not in p.stderr
    part = tmp_path / "alice-part.txt"  # a heavy overlap is refused too (70% of the evaluation text's start)
    text = CORPUS.read_text()
    part.write_text(text[: int(0.7 * len(text))] + "\n" + (ROOT / "README.md").read_text())
    p = mq("measure", tiny, "--config", "Q4_K_M", "--imatrix", own, "--corpus", part, "--ctx", 128, "--tokens", 256,
           "--no-track")  # fmt: skip
    assert p.returncode != 0 and "contains about" in p.stderr, p.stderr
    # the README imatrix on Alice is fine (checked in test_measurements_carry_the_imatrix)


def test_other_models_and_truncated_imatrices_are_refused(tiny, tiny576, im_path, tmp_path):
    p = mq("build", tiny576, "--config", "Q4_K_M", "--imatrix", im_path, "-o", tmp_path / "x.gguf")
    assert p.returncode != 0 and "not an importance matrix of" in p.stderr and "blk." in p.stderr, p.stderr
    cut = tmp_path / "cut.imatrix.gguf"
    data = im_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    p = mq("size", tiny, "--config", "Q4_K_M", "--imatrix", cut)
    assert p.returncode != 0 and str(cut) in p.stderr and "Traceback" not in p.stderr, p.stderr
    with pytest.raises(InputError, match="no such imatrix"):
        Imatrix.load(tmp_path / "missing.gguf")


def test_legacy_dat_reads_like_the_gguf_format(tiny, calib, tmp_path):
    """llama-imatrix's older binary format gives the same weights as its GGUF format."""
    args = ["-m", str(tiny), "-f", str(calib), "--chunks", "4", "-c", "128", "-b", "128", "-t", "2", "--no-ppl"]
    for fmt, name in (("dat", "a.dat"), ("gguf", "a.gguf")):
        p = subprocess.run([str(TOOLS / "llama-imatrix"), *args, "--output-format", fmt, "-o", str(tmp_path / name)],
                           capture_output=True, text=True)  # fmt: skip
        assert p.returncode == 0, p.stderr[-1500:]
    a, b = Imatrix.load(tmp_path / "a.dat"), Imatrix.load(tmp_path / "a.gguf")
    assert a.legacy and not b.legacy and set(a.entries) == set(b.entries)
    for n in a.entries:
        np.testing.assert_allclose(a.entries[n], b.entries[n], rtol=1e-5)


def test_the_recipe_command_rebuilds_the_same_file(tiny, im_path, tmp_path):
    """`recipe --imatrix` prints the llama-quantize command (run in the imatrix's folder) that writes exactly
    the file `build --imatrix` writes."""
    cfg = "default=Q4_K,ffn_down=IQ2_XS,attn_q=Q6_K"
    p = json.loads(mq("recipe", tiny, "--config", cfg, "--imatrix", im_path, "-o", tmp_path / "t.txt",
                      "--gguf-out", tmp_path / "ref.gguf", "--json", check=True).stdout)  # fmt: skip
    assert p["command"][:3] == ["llama-quantize", "--imatrix", im_path.name] and p["cwd"] == str(im_path.parent)
    _quantize_tool(p["command"][1:], cwd=Path(p["cwd"]))
    mq("build", tiny, "--config", cfg, "--imatrix", im_path, "-o", tmp_path / "ours.gguf", check=True)
    assert (tmp_path / "ref.gguf").read_bytes() == (tmp_path / "ours.gguf").read_bytes()


def test_presets_resolve_knowing_the_imatrix(tiny, im_path):
    """llama.cpp's rules choose other types for some presets when an imatrix is given (IQ3_XXS keeps
    ffn_down at IQ3_XXS with one, Q3_K without): mqpredict asks llama.cpp's dry run with the imatrix."""
    from mqpredict.llama.quantize import dry_run_types

    model, cfg = ModelInfo.load(tiny), Config.parse("IQ3_XXS")
    without = dry_run_types(model, cfg)
    with_im = dry_run_types(model, cfg, imatrix=Imatrix.load(im_path))
    assert without["blk.1.ffn_down.weight"].name == "Q3_K" and with_im["blk.1.ffn_down.weight"].name == "IQ3_XXS"
