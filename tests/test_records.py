"""Records: schema, store (atomic, idempotent, concurrent, kill-safe), ingest, exchange, seed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mqpredict.quant.config import Config
from mqpredict.quant.derive import config_from_types
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve
from mqpredict.records.schema import RowError, parse_row
from mqpredict.records.store import Store, StoreError
from tests.conftest import MQ, mq

SMALL = ["--ctx", "128", "--tokens", "256"]


def _json(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _fails(p, *words):
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    for w in words:
        assert w.lower() in p.stderr.lower(), (w, p.stderr)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for f in sorted(files):
            if f != ".lock":
                h.update((Path(root) / f).read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def seeded(tiny, tmp_path_factory) -> Path:
    """A store seeded with the 16 presets of the tiny model (real measurements)."""
    store = tmp_path_factory.mktemp("seeded") / "store"
    _json(mq("seed", tiny, "--no-imatrix", "--store", store, *SMALL, "--json"))
    return store


# ---------------------------------------------------------------------------------- derive
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q3_K_M", "Q5_K_S", "Q2_K", "IQ4_XS", "Q6_K"])
def test_derived_config_rebuilds_the_types(any_tiny, preset):
    from mqpredict.llama.quantize import dry_run_types

    m = ModelInfo.load(any_tiny)
    types = resolve(m, Config.parse(preset), dry_run_types)
    derived = config_from_types(m, types)
    assert resolve(m, Config.parse(derived.key)) == types  # header-only, exact


# ---------------------------------------------------------------------------------- schema
def test_row_round_trip_and_errors(seeded):
    recs = Store(seeded).records()
    assert len(recs) == 16 and all(r["status"] == "ok" for r in recs)
    r = recs[0]
    assert parse_row(r.to_row()).values == r.values
    bad = dict(r.to_row(), kld_mean="abc", size_bytes="-3", status="maybe", config="default=Q9_X")
    with pytest.raises(RowError) as e:
        parse_row(bad)
    text = " ".join(e.value.reasons)
    assert "kld_mean" in text and "size_bytes" in text
    with pytest.raises(RowError) as e2:
        parse_row(dict(r.to_row(), status="maybe"))
    assert "status" in e2.value.reasons[0]
    with pytest.raises(RowError, match="Q9_X"):
        parse_row(dict(r.to_row(), config="default=Q9_X"))


def test_records_carry_identity_and_provenance(seeded, tiny):
    df = Store(seeded).load()
    assert set(df["source"]) == {"preset"} and df["model_id"].nunique() == 1
    assert df["family"].iloc[0] == "synthetic-tiny-256" and bool(df["synthetic"].iloc[0])
    assert (df["scoring"] == "stream").all() and (df["n_tokens"] == 4 * 64).all()  # seed's default: streamed
    assert (df["ctx"] == 128).all() and (df["n_batch"] == 128).all()
    assert df["per_token_path"].notna().all()
    assert all((seeded / p).exists() for p in df["per_token_path"])
    q4km = df[df["config"] == "preset=Q4_K_M"].iloc[0]
    assert q4km["fractions"]["ffn_down"] == {"Q4_K": 0.5, "Q6_K": 0.5}
    assert resolve(ModelInfo.load(tiny), Config.parse(q4km["effective_config"]))  # rebuildable header-only


# ----------------------------------------------------------------------------------- store
# the store's contract (every format: atomic, idempotent, concurrent, kill-safe) is tests/test_store.py
def test_csv_store_edited_by_hand(seeded, tmp_path):
    st = tmp_path / "hand"
    Store(st, "csv").append(_portable(seeded))
    lines = (st / "records.csv").read_text().splitlines()
    lines[3] = lines[3].replace(",ok,", ",maybe,")
    (st / "records.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError, match=r"records.csv row 4: status='maybe'"):
        Store(st).records()
    p = mq("data", "validate", "--store", st)
    assert p.returncode == 1 and "row 4" in p.stderr
    _fails(mq("data", "list", "--store", st), "row 4", "edited by hand")
    (st / "records.csv").write_text("\n".join(lines[:2] + [lines[2][: len(lines[2]) // 2]]) + "\n")
    _fails(mq("data", "list", "--store", st), "row 3")


def _portable(store: Path) -> list:
    """A store's records without their per-token vectors (which live in that store only)."""
    return [r.replace(per_token_path=None) for r in Store(store).records()]


# ---------------------------------------------------------------------------------- ingest
def test_from_gguf_rebuilds_llama_quantize_files(tiny, tiny576, tmp_path):
    """Q4_K_M / Q3_K_M written by the real llama-quantize → configs that rebuild them tensor for tensor."""
    for base, preset in ((tiny, "Q4_K_M"), (tiny576, "Q3_K_M"), (tiny576, "Q4_K_M")):
        q = tmp_path / f"{base.stem}-{preset}.gguf"
        assert mq("build", base, "-c", preset, "-o", q, "--engine", "tools").returncode == 0
        doc = _json(mq("data", "from-gguf", q, "--check", base, "--json"))[0]
        assert doc["check"]["types_match"] and doc["check"]["bytes_match"], doc["check"]
        assert set(doc["check"]["header_differ"]) <= {"general.file_type"}  # reported, not hidden
        assert doc["config"].startswith("default=")
        assert sum(doc["fractions"]["ffn_down"].values()) == pytest.approx(1)


def test_from_gguf_lists_unknown_tensors_as_dynamic_groups(tiny, tmp_path):
    from mqpredict.quant.header import read_header
    from mqpredict.quant.types import T
    from mqpredict.quant.ggufwrite import TensorOut, header_bytes

    h = read_header(tiny)
    tensors = [TensorOut("token_embd.weight", (256, 512), T.Q8_0, None),
               TensorOut("blk.0.attn_q_a.weight", (256, 64), T.Q6_K, None),
               TensorOut("blk.1.attn_q_a.weight", (256, 64), T.Q6_K, None),
               TensorOut("blk.0.mystery_proj.weight", (256, 256), T.Q4_0, None),
               TensorOut("blk.0.attn_norm.weight", (256,), T.F32, None)]  # fmt: skip
    head = header_bytes([h.raw(kv.span) for kv in h.kvs.values()], tensors, 32)
    f = tmp_path / "odd.gguf"
    with open(f, "wb") as fh:
        fh.write(head)
        fh.truncate(len(head) + sum(-(-t.nbytes // 32) * 32 for t in tensors))
    doc = _json(mq("data", "from-gguf", f, "--json"))[0]
    assert doc["dynamic_groups"] == {"attn_q_a": ["blk.0.attn_q_a.weight", "blk.1.attn_q_a.weight"],
                                     "mystery_proj": ["blk.0.mystery_proj.weight"]}  # fmt: skip
    assert "attn_q_a=Q6_K" in doc["config"] and "mystery_proj=Q4_0" in doc["config"]


def test_from_gguf_bad_files(tmp_path, tiny):
    (tmp_path / "x.gguf").write_text("not a model")
    _fails(mq("data", "from-gguf", tmp_path / "x.gguf"), "x.gguf", "not a GGUF")
    (tmp_path / "t.gguf").write_bytes(tiny.read_bytes()[:5000])
    _fails(mq("data", "from-gguf", tmp_path / "t.gguf"), "t.gguf", "truncated")


def test_recipes_shipped_and_malformed(tmp_path):
    from mqpredict.errors import InputError
    from mqpredict.records.ingest import load_recipes, read_type_file
    from mqpredict.util.paths import DATASETS

    recipes, skipped = load_recipes(DATASETS / "recipes")
    assert len(recipes) >= 5 and all(r.url for r in recipes)
    assert any("partial" in s for s in skipped)
    for text, word in (("ffn_down q6_k\n", "line 1"), ("ffn_down=q9_x\n", "q9_x"), ("blk[=q6_k\n", "regular expression")):
        f = tmp_path / "r.txt"
        f.write_text(text)
        with pytest.raises(InputError, match=word):
            read_type_file(f)
    f.write_text("blk.0.ffn_down.weight=q8_0\n")
    assert read_type_file(f)[0][0] == r"^blk\.0\.ffn_down\.weight$"  # a plain tensor name is taken literally


def test_adapt_to_tied_and_smaller_models(tiny576):
    from mqpredict.records.ingest import adapt
    from mqpredict.quant.types import T

    m = ModelInfo.load(tiny576)
    c, notes = adapt(Config.parse(r"preset=Q2_K,tensor:token_embd\.weight=Q4_K,tensor:^output\.weight$=Q6_K,"
                                  r"tensor:ffn_down_exps=Q3_K"), m)  # fmt: skip
    assert c.tensors[0] == (r"^token_embd\.weight$", T.Q6_K)  # the shared tensor takes the output's higher type
    assert any("ffn_down_exps" in n and "dropped" in n for n in notes)
    g, _ = adapt(Config.parse("default=Q4_K,lm_head=Q8_0,embeddings=Q4_K"), m)
    assert g.group_types["embeddings"] == T.Q8_0 and "lm_head" not in g.group_types


# -------------------------------------------------------------------------------- exchange
def test_export_import_round_trip(seeded, tmp_path):
    out = tmp_path / "all.csv"
    _json(mq("data", "export", "--store", seeded, "-o", out, "--json"))
    _json(mq("data", "import", out, "--store", tmp_path / "s2", "--json"))
    a = {r.key: r.measured() for r in Store(seeded).records()}
    b = {r.key: r.measured() for r in Store(tmp_path / "s2").records()}
    assert a.keys() == b.keys()
    assert all(a[k] == {**b[k], "per_token_path": a[k].get("per_token_path")} or a[k] == b[k] for k in a)
    assert _json(mq("data", "import", out, "--store", tmp_path / "s2", "--json"))["records"] == 16  # idempotent
    assert len(Store(tmp_path / "s2").records()) == 16


def _corrupt(src: Path, dst: Path, edit) -> Path:
    rows = list(csv.reader(src.open()))
    edit(rows[0], rows)
    with dst.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return dst


@pytest.mark.parametrize(
    "case,edit,words",
    [
        ("missing-column", lambda h, r: [x.pop(i) for i in [h.index("kld_mean")] for x in r], ["missing column", "kld_mean"]),
        ("non-numeric-kld", lambda h, r: r[3].__setitem__(h.index("kld_mean"), "abc"), ["row 4", "kld_mean"]),
        ("negative-size", lambda h, r: r[2].__setitem__(h.index("size_bytes"), "-5"), ["row 3", "size_bytes"]),
        ("unknown-type", lambda h, r: r[5].__setitem__(h.index("config"), "default=Q9_X"), ["row 6", "Q9_X"]),
        ("duplicate-conflict", lambda h, r: r.append(r[1][: h.index("kld_mean")] + ["0.5"] + r[1][h.index("kld_mean") + 1 :]),
         ["row 18", "same key as row 2"]),
        ("wrong-field-count", lambda h, r: r[4].pop(), ["row 5", "number of fields"]),
    ],
)  # fmt: skip
def test_malformed_imports_are_rejected_whole(seeded, tmp_path, case, edit, words):
    good = tmp_path / "good.csv"
    mq("data", "export", "--store", seeded, "-o", good, check=True)
    store = tmp_path / "target"
    mq("data", "import", good, "--store", store, check=True)
    before = _digest(store)
    bad = _corrupt(good, tmp_path / f"{case}.csv", edit)
    _fails(mq("data", "import", bad, "--store", store), f"{case}.csv", *words)
    assert _digest(store) == before


def test_community_table_against_its_base(tiny, tmp_path):
    t = tmp_path / "community.csv"
    size = _json(mq("size", tiny, "-c", "Q4_K_M", "--json"))["size_bytes"]
    rows = [["model", "config", "size_bytes", "corpus", "ctx", "tool", "tool_version", "kld_mean", "ppl", "n_tokens"],
            ["tiny", "Q4_K_M", str(size), "wiki.test", "512", "llama-perplexity", "b6000", "0.11", "12.5", "40000"]]  # fmt: skip
    with t.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    _fails(mq("data", "import", t, "--store", tmp_path / "s"), "community", "--base")
    doc = _json(mq("data", "import", t, "--store", tmp_path / "s", "--base", tiny, "--json"))
    assert doc["format"] == "community" and doc["records"] == 1
    r = Store(tmp_path / "s").records()[0]
    assert r["source"] == "community" and r["engine"] == "llama-perplexity" and r["kld_mean"] == 0.11
    rows[1][2] = str(size + 1)  # a size that is not this config's file
    with t.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    _fails(mq("data", "import", t, "--store", tmp_path / "s2", "--base", tiny), "row 2", "not the size")


def test_import_llama_perplexity_output(tiny, corpus, tmp_path):
    from mqpredict.errors import LlamaError
    from mqpredict.llama.tools import ToolsEngine, find_tool, parse_kld_output

    spec_args = ["-c", "128", "-b", "128", "-t", "2"]
    with ToolsEngine(tiny, corpus, __import__("mqpredict.measure.corpus", fromlist=["EvalSpec"]).EvalSpec(ctx=128, n_chunks=4),
                     threads=2) as eng:  # fmt: skip
        base_kld = eng.base_logprobs(eng.spec)
        q = eng.build(Config.parse("Q4_K_M"), tmp_path / "q.gguf").path
        ref = eng.measure(Config.parse("Q4_K_M"))
        # the base's log-probs live in the engine's work folder: run the tool while the engine is open
        for _ in range(10):  # the real tool sometimes loses its statistics at exit (docs/measurement.md): a run
            # counts only when every statistic the importer reads is there (its own parser decides)
            p = subprocess.run([str(find_tool("llama-perplexity")), "-m", str(q), "--kl-divergence-base", str(base_kld),
                                "--kl-divergence", *spec_args], capture_output=True, text=True)  # fmt: skip
            try:
                parse_kld_output(p.stderr + p.stdout, ref.stats.n_tokens, "run.txt")
            except LlamaError:
                continue
            if "kl_divergence: computing over" in p.stderr + p.stdout:  # the importer's header line came through too
                break
        else:
            pytest.fail(f"llama-perplexity never printed its statistics in 10 runs; the last said:\n{p.stderr[-2000:]}")
    out = tmp_path / "run.txt"
    out.write_text(p.stderr + p.stdout)
    doc = _json(mq("data", "import", out, "--store", tmp_path / "s", "--base", tiny, "--gguf", q, "--corpus", corpus,
                   "--author", "me", "--json"))  # fmt: skip
    assert doc["format"] == "llama-perplexity"
    r = Store(tmp_path / "s").records()[0]
    assert r["kld_mean"] == pytest.approx(ref.stats.kld_mean, rel=1e-4) and r["provenance_author"] == "me"
    assert r["config"] == config_from_types(ModelInfo.load(tiny), {t.name: t.qtype for t in ModelInfo.load(q).tensors}).key
    (tmp_path / "junk.txt").write_text("hello\n")
    _fails(mq("data", "import", tmp_path / "junk.txt", "--store", tmp_path / "s", "--base", tiny, "--gguf", q,
              "--corpus", corpus), "junk.txt", "not the output")  # fmt: skip


# ------------------------------------------------------------------------------------ seed
def test_seed_is_resumable_and_shows_the_line(seeded, tiny):
    doc = _json(mq("seed", tiny, "--no-imatrix", "--store", seeded, *SMALL, "--json"))
    assert doc["measured"] == [] and len(doc["same_file"]) == 16  # nothing measured twice
    human = mq("seed", tiny, "--no-imatrix", "--store", seeded, *SMALL)
    assert "on the line" in human.stdout and "preset=Q8_0" in human.stdout


def test_seed_only_some_presets(tiny, tmp_path):
    doc = _json(mq("seed", tiny, "--no-imatrix", "--store", tmp_path / "s", *SMALL, "--only", "Q8_0", "--only", "q4_k_m",
                   "--no-track", "--json"))  # fmt: skip
    assert sorted(doc["measured"]) == ["preset=Q4_K_M", "preset=Q8_0"]
    _fails(mq("seed", tiny, "--no-imatrix", "--store", tmp_path / "s", *SMALL, "--only", "Q9_K"), "Q9_K", "valid presets")
    _fails(mq("seed", tiny, "--no-imatrix", "--store", tmp_path / "s", *SMALL, "--only", "IQ2_XXS"), "IQ2_XXS", "imatrix")
    assert len(Store(tmp_path / "s").records()) == 2  # a refused seed measures nothing


def test_seed_recipes_and_gguf_configs(tiny, tmp_path):
    from mqpredict.util.paths import DATASETS

    q = tmp_path / "someone.gguf"
    mq("build", tiny, "-c", "default=Q5_0,ffn_down=Q6_K,lm_head=Q8_0", "-o", q, check=True)
    doc = _json(mq("seed", tiny, "--no-imatrix", "--store", tmp_path / "s", *SMALL, "--no-presets", "--recipes", DATASETS / "recipes",
                   "--from-gguf", q, "--json"))  # fmt: skip
    recs = Store(tmp_path / "s").records()
    sources = {r["source"] for r in recs}
    assert sources == {"recipe", "community"}
    assert any(r["provenance_url"] and "unsloth" in r["provenance_url"] for r in recs)
    assert any("importance matrix" in s["reason"] for s in doc["skipped"])  # the IQ3_XXS recipe
    assert any(r["provenance_file"] == str(q) for r in recs)


def test_seed_killed_mid_measurement_loses_nothing(tiny, tmp_path):
    """A real kill -9 while seeding: the store stays valid with every finished record; a re-run finishes."""
    store = tmp_path / "k"
    env = dict(os.environ, MQPREDICT_NO_PROGRESS="1")
    p = subprocess.Popen([*MQ, "seed", str(tiny), "--no-imatrix", "--store", str(store), "--ctx", "128", "--tokens", "1024"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    t0 = time.time()
    while time.time() - t0 < 120:
        if (store / "STORE.json").exists() and len(Store(store).keys()) >= 2:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    st = Store(store)
    assert st.validate() == []
    done = len(st.records())
    assert 2 <= done < 16
    assert not list(store.glob(".*.part"))  # no half-written temp left by the store
    _json(mq("seed", tiny, "--no-imatrix", "--store", store, "--ctx", "128", "--tokens", "1024", "--json"))
    assert len(Store(store).records()) == 16


def test_two_concurrent_seeds_on_one_store(tiny, tmp_path):
    store = tmp_path / "two"
    env = dict(os.environ, MQPREDICT_NO_PROGRESS="1")
    procs = [subprocess.Popen([*MQ, "seed", str(tiny), "--no-imatrix", "--store", str(store), *SMALL], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]  # fmt: skip
    for p in procs:
        _, e = p.communicate(timeout=300)
        assert p.returncode == 0, e
    st = Store(store)
    assert st.validate() == [] and len(st.records()) == 16  # each file once, no conflicts


def test_llama_failure_becomes_a_failed_record(tiny, corpus, tmp_path):
    """llama-quantize dying on one config: a `failed` record with the reason; the others are measured."""
    import stat

    from mqpredict.llama.tools import ToolsEngine, find_tool
    from mqpredict.measure.corpus import EvalSpec
    from mqpredict.workflows import seed as seeding

    d = tmp_path / "bin"
    d.mkdir()
    os.symlink(find_tool("llama-perplexity"), d / "llama-perplexity")
    w = d / "llama-quantize"
    w.write_text(f'#!/usr/bin/env bash\nif [[ " $* " == *" Q2_K "* && " $* " != *" --dry-run "* ]]; then '
                 f'echo "boom: out of memory" >&2; exit 1; fi\n'
                 f'exec "{find_tool("llama-quantize")}" "$@"\n')  # fmt: skip
    w.chmod(w.stat().st_mode | stat.S_IEXEC)
    st = Store(tmp_path / "s")
    with ToolsEngine(tiny, corpus, EvalSpec(ctx=128, n_chunks=4), threads=2, llama_bin=d) as eng:
        rep = seeding.seed(eng, st, seeding.preset_candidates([seeding.Preset.Q8_0, seeding.Preset.Q2_K]))
    by = {r["config"]: r for r in st.records()}
    assert by["preset=Q8_0"]["status"] == "ok"
    assert by["preset=Q2_K"]["status"] == "failed" and "boom" in by["preset=Q2_K"]["status_reason"]
    assert len(rep.failed) == 1
    by_key = {r.key: r for r in st.records()}  # the report names the record holding each candidate
    assert {i: by_key[k]["config"] for i, k in rep.keys.items()} == {0: "preset=Q8_0", 1: "preset=Q2_K"}


def test_every_column_is_documented():
    from mqpredict.records.schema import COLUMNS
    from mqpredict.util.paths import DATASETS

    doc = (DATASETS / "README.md").read_text()
    assert all(f"| `{c.name}` |" in doc for c in COLUMNS)


@pytest.mark.parametrize(
    "imatrix_id,imatrix_corpus,words",
    [
        ("", "calibration-v1", ["imatrix_corpus='calibration-v1' without an imatrix_id"]),
        ("my-imatrix", "calibration-v1", ["imatrix_id='my-imatrix' is not a hex hash"]),
        ("0123456789abcdef", "wiki.test", ["imatrix_corpus='wiki.test' is the evaluation corpus itself"]),
    ],
)  # fmt: skip
def test_community_rows_with_inconsistent_imatrix_fields_are_refused(tiny, tmp_path, imatrix_id, imatrix_corpus, words):
    size = _json(mq("size", tiny, "-c", "Q4_K_M", "--json"))["size_bytes"]
    head = ["model", "config", "size_bytes", "corpus", "ctx", "tool", "tool_version", "kld_mean", "imatrix_id", "imatrix_corpus"]
    good = ["tiny", "Q4_K_M", str(size), "wiki.test", "512", "llama-perplexity", "b6000", "0.11", "", ""]
    bad = ["tiny", "Q4_K_M", str(size), "wiki.test", "256", "llama-perplexity", "b6000", "0.12", imatrix_id, imatrix_corpus]
    t = tmp_path / "community.csv"
    with t.open("w", newline="") as f:
        csv.writer(f).writerows([head, good, bad])
    store = tmp_path / "s"
    p = mq("data", "import", t, "--store", store, "--base", tiny)
    _fails(p, "community.csv", "row 3", *words)
    assert len([x for x in p.stderr.splitlines() if x.strip()]) == 1  # one line
    assert not (store / "STORE.json").exists() or Store(store).records() == []  # nothing written, the good row neither


def test_community_imatrix_id_is_the_files_hash(tiny, tmp_path):
    size = _json(mq("size", tiny, "-c", "Q4_K_M", "--json"))["size_bytes"]
    full = hashlib.sha256(b"an imatrix file").hexdigest().upper()  # all 64 digits, as sha256sum prints them
    t = tmp_path / "community.csv"
    with t.open("w", newline="") as f:
        csv.writer(f).writerows([
            ["model", "config", "size_bytes", "corpus", "ctx", "tool", "tool_version", "kld_mean", "imatrix_id", "imatrix_corpus"],
            ["tiny", "Q4_K_M", str(size), "wiki.test", "512", "llama-perplexity", "b6000", "0.11", full, "calibration-v1"]])  # fmt: skip
    _json(mq("data", "import", t, "--store", tmp_path / "s", "--base", tiny, "--json"))
    (r,) = Store(tmp_path / "s").records()
    assert r["imatrix_id"] == full.lower()[:16] and r["imatrix_corpus"] == "calibration-v1"  # mqpredict's id of it
