"""Measure the exhaustive ground truths that ``mqpredict bench search`` simulates searches on.

Two are defined (``--truth``): ``tiny256-s0`` (below) and ``smollm2-imatrix``, a real model: the
SmolLM2-135M base (``mqpredict base prepare smollm2``) with an importance matrix computed on the shipped
calibration text (:func:`mqpredict.llama.imatrix.compute_imatrix`), 12 windows of 128 tokens (the first 8
for the search, the last 4 held out for re-confirmation), its six groups (tied embeddings: no lm_head)
each at Q8_0, Q5_0 or IQ4_NL — 3^6 = 729 configs, every one checked to be written as asked (n_embd 576
takes only 32-blocks outside ffn_down, so these three types have no fallback anywhere) and to be a distinct
file —, its 27 seed presets (the 16 standard ones and the 11 made for an imatrix) and, with ``--extra
FILE``, further configs (one per line: ``SOURCE CONFIG``, e.g. the allocator's answers).

The tiny truth: one tiny model (``write_test_model(seed=0)``: 4 layers, n_embd 256, family ``synthetic-tiny-256``),
the bundled corpus, 8 windows of 128 tokens (504 scored; no held-out windows: a search confirms on all 8
and its re-confirmation cannot be simulated), one window per batch, in process:

* the 16 seed presets (they draw the line), and
* every config of the **reduced space**: embeddings fixed at Q8_0, each of the other six groups
  (lm_head, attn_q, attn_kv, attn_output, ffn_up_gate, ffn_down) at Q8_0, Q6_K, Q4_K or Q3_K —
  4^6 = 4096 configs, checked to be 4096 distinct files (deduplicated by types_key otherwise).

Writes ``datasets/ground_truth/tiny256-s0/`` (or ``--out``): ``truth.csv`` (one row per measured
config), ``vectors.npz`` (per-token KLD, float16, one row per truth.csv row, same order), the model's
weight-error table, ``meta.json`` and a README with provenance and the measured wall time.

Resumable: every measurement is appended to a work folder (``--work``, default in the cache) as soon
as it is made; running again skips what is there. Progress goes to stderr. llama.cpp runs with one
thread: on a shared 2-core machine two spinning threads are ~40x slower per tiny evaluation.

    nice -n 10 .venv/bin/python benchmarks/search_ground_truth.py
    MQPREDICT_THREADS=1 nice -n 5 .venv/bin/python benchmarks/search_ground_truth.py --truth smollm2-imatrix
    # or on both cores: two shards of one work folder, then one run to assemble
    for k in 0 1; do .venv/bin/python benchmarks/search_ground_truth.py --truth smollm2-imatrix --shard $k/2 & done; wait
    .venv/bin/python benchmarks/search_ground_truth.py --truth smollm2-imatrix

The real model's configs are measured in a seeded random order (presets first), so that a run stopped
early leaves a uniform sample of the space; ``--measure-only`` skips assembling the shipped folder.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import hashlib
import io
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mqpredict import __version__
from mqpredict.base.testmodel import write_test_model
from mqpredict.llama.engine import load_scores
from mqpredict.llama.imatrix import compute_imatrix
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.stats import FIELDS as STAT_FIELDS
from mqpredict.quant.config import Config
from mqpredict.quant.derive import type_fractions
from mqpredict.quant.resolve import types_key
from mqpredict.quant.types import QuantType, T
from mqpredict.records.identity import identify
from mqpredict.records.ingest import adapt
from mqpredict.workflows.seed import SEED_PRESETS, seed_presets
from mqpredict.surrogate.weight_error import compute
from mqpredict.util.paths import DATASETS, DEFAULT_CORPUS, PROJECT_ROOT, cache_dir

THREADS = 1
CALIBRATION = DATASETS / "calibration" / "calibration.txt"


def _tiny_base(work: Path) -> Path:
    return write_test_model(work / "tiny-256-s0.gguf", 0)  # byte-identical for the same seed


def _smollm2_base(work: Path) -> Path:
    from mqpredict.base.embedded import resolve_base

    return resolve_base("smollm2")


@dataclass(frozen=True)
class TruthDef:
    """One ground truth: its base, slice, reduced space and presets."""

    name: str
    make_base: Callable[[Path], Path]
    base: dict  # how the benchmark gets the same base back (meta.json's "base")
    spec: EvalSpec
    fixed: dict[str, QuantType]
    space_types: tuple[QuantType, ...]  # index 0 … in truth.csv's group columns
    presets: tuple = SEED_PRESETS
    imatrix: bool = False
    search_chunks: int = 0  # windows a search confirms on (0: all); the rest are held out
    shuffle: bool = False  # measure the space in a seeded random order (presets first)
    notes: list[str] = field(default_factory=list)


TRUTHS = {
    "tiny256-s0": TruthDef("tiny256-s0", _tiny_base, {"kind": "testmodel", "seed": 0}, EvalSpec(ctx=128, n_chunks=8),
                           {"embeddings": T.Q8_0}, (T.Q8_0, T.Q6_K, T.Q4_K, T.Q3_K)),
    "smollm2-imatrix": TruthDef("smollm2-imatrix", _smollm2_base, {"kind": "embedded", "name": "smollm2"},
                                EvalSpec(ctx=128, n_chunks=12), {}, (T.Q8_0, T.Q5_0, T.IQ4_NL), seed_presets(True),
                                imatrix=True, search_chunks=8, shuffle=True),
}  # fmt: skip
# the tiny truth's names, as the benchmark and the tests read them
NAME = "tiny256-s0"
MODEL_SEED = 0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def space_configs(groups: list[str], td: TruthDef = TRUTHS[NAME]) -> list[tuple[Config, dict[str, int]]]:
    """Every config of the reduced space, in lexicographic order of the free groups' type indices."""
    free = [g for g in groups if g not in td.fixed]
    out = []
    for idx in itertools.product(range(len(td.space_types)), repeat=len(free)):
        assign = {**td.fixed, **{g: td.space_types[i] for g, i in zip(free, idx)}}
        out.append((Config(default=T.Q8_0, groups=tuple(assign.items())), dict(zip(free, idx))))
    return out


def read_extra(path: Path | None) -> list[tuple[str, Config]]:
    """``SOURCE CONFIG`` per line (blank lines and ``#`` comments skipped)."""
    if path is None:
        return []
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        src, _, cfg = line.partition(" ")
        try:
            out.append((src, Config.parse(cfg.strip())))
        except Exception as e:  # noqa: BLE001 - one line names the row
            raise SystemExit(f"{path}:{n}: {e}") from None
    return out


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        return head + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.7g}"
    return str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", choices=sorted(TRUTHS), default=NAME)
    ap.add_argument("--out", type=Path, default=None, help="default: datasets/ground_truth/NAME")
    ap.add_argument("--work", type=Path, default=None, help="default: the cache's ground_truth/NAME")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--extra", type=Path, default=None, help="further configs, one 'SOURCE CONFIG' per line")
    ap.add_argument("--limit", type=int, default=0, help="measure only the first N space configs (a trial run)")
    ap.add_argument("--measure-only", action="store_true", help="measure, do not assemble the shipped folder")
    ap.add_argument("--shard", default=None, metavar="K/N",
                    help="measure only the configs whose key hashes to K modulo N (0-based): N processes on N cores "
                         "share one work folder, each resumable (implies --measure-only; run once more without it to assemble)")
    args = ap.parse_args(argv)
    shard = None
    if args.shard:
        try:
            k, n = (int(x) for x in args.shard.split("/"))
            assert 0 <= k < n
        except (ValueError, AssertionError):
            raise SystemExit(f"--shard {args.shard!r}: expected K/N with 0 <= K < N, e.g. 0/2") from None
        shard, args.measure_only = (k, n), True
    td = TRUTHS[args.truth]
    spec = td.spec
    work: Path = args.work or cache_dir() / "ground_truth" / td.name
    work.mkdir(parents=True, exist_ok=True)
    (work / "vec").mkdir(exist_ok=True)
    base = td.make_base(work)
    imatrix = None
    if td.imatrix:
        imatrix, hit = compute_imatrix(base, CALIBRATION, threads=THREADS)
        say(f"imatrix {imatrix.id} on {CALIBRATION.name} ({'cached' if hit else 'computed'})")
    t_start = time.time()
    with InProcessEngine(base, args.corpus, spec, threads=THREADS, cache=work / "engine", imatrix=imatrix) as eng:
        model = eng.model
        ident = identify(model)
        say(f"{model.path.name}: model_id {ident.model_id}, family {ident.family}; {spec.n_chunks}×{spec.ctx} "
            f"windows ({spec.n_tokens} scored tokens), {THREADS} thread")  # fmt: skip
        eng.base_logprobs(spec)

        # ------------------------------------------------------------------ what to measure
        plan: list[dict] = []
        for p in td.presets:
            cfg, _notes = adapt(Config.from_preset(p), model)
            plan.append({"source": "preset", "config": cfg, "label": p.value, "idx": None})
        space = space_configs(list(model.groups), td)
        if args.limit:
            space = space[: args.limit]
        seen_space: dict[str, int] = {}
        n_dup = 0
        for i, (cfg, idx) in enumerate(space):
            plan.append({"source": "space", "config": cfg, "label": cfg.key, "idx": idx, "space_index": i})
        for src, cfg in read_extra(args.extra):
            plan.append({"source": src, "config": cfg, "label": cfg.key, "idx": None})
        for row in plan:
            row["types"] = eng.resolve(row["config"])
            row["types_key"] = types_key(model, row["types"])
            if row["source"] == "space":
                asked = {**{g: t.name for g, t in td.fixed.items()},
                         **{g: td.space_types[i].name for g, i in row["idx"].items()}}
                got = type_fractions(model, row["types"])
                if got != {g: {t: 1.0} for g, t in asked.items()}:  # a fallback or a refusal: not as asked
                    raise SystemExit(f"{row['config'].key} is not written as asked on {model.path.name}: {got}")
                if row["types_key"] in seen_space:
                    row["dup_of_space"] = seen_space[row["types_key"]]
                    n_dup += 1
                else:
                    seen_space[row["types_key"]] = row["space_index"]
        say(f"space: {len(space)} configs, {len(seen_space)} distinct files ({n_dup} duplicates dropped)")
        plan = [r for r in plan if "dup_of_space" not in r]

        # ------------------------------------------------------------------ measure (resumable)
        done_path = work / "measured.jsonl"
        done: dict[str, dict] = {}
        if done_path.exists():
            for line in done_path.read_text().splitlines():
                try:
                    d = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if (work / "vec" / f"{d['types_key']}.npy").exists():
                    done[d["types_key"]] = d
        order = [r for r in plan if r["source"] == "preset"] + [r for r in plan if r["source"] != "preset"]
        if td.shuffle:
            rest = order[len(td.presets):]
            order = order[: len(td.presets)] + [rest[i] for i in np.random.default_rng(0).permutation(len(rest))]
        todo = list(dict.fromkeys(r["types_key"] for r in order if r["types_key"] not in done))
        if shard is not None:
            # by the file's key, not its place in the list: a shard started or resumed later takes the same files
            todo = [k for k in todo if int(hashlib.sha256(k.encode()).hexdigest()[:8], 16) % shard[1] == shard[0]]
        by_key = {r["types_key"]: r for r in reversed(plan)}  # the first row naming each file
        say(f"{len(done)} files already measured, {len(todo)} to go")
        t0 = time.perf_counter()
        with open(done_path, "a") as log:
            for j, k in enumerate(todo):
                r = by_key[k]
                m = eng.measure(r["config"])
                assert m.types_key == k, (m.types_key, k)
                kld = load_scores(m.per_token_path).kld.astype(np.float32)
                np.save(work / "vec" / f"{k}.npy", kld)
                Path(m.per_token_path).unlink(missing_ok=True)
                d = {"types_key": k, "size_bytes": m.size_bytes, "bpw": m.bpw, "seconds": m.seconds_build + m.seconds_eval,
                     **m.stats.to_json()}  # fmt: skip
                log.write(json.dumps(d) + "\n")
                log.flush()
                done[k] = d
                every = 100 if spec.n_tokens < 1000 else 10
                if (j + 1) % every == 0 or j + 1 == len(todo):
                    el = time.perf_counter() - t0
                    say(f"  {j + 1}/{len(todo)} measured · {el:.0f} s · {el / (j + 1):.3f} s each · "
                        f"eta {(len(todo) - j - 1) * el / (j + 1):.0f} s")  # fmt: skip
        wall_measure = time.perf_counter() - t0
        wall_path = work / "wall.json"  # measuring wall time, summed over resumed runs (and shards: core time)
        with open(work / "wall.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # shards finish at about the same time
            walls = json.loads(wall_path.read_text()) if wall_path.exists() else []
            if todo:
                walls.append({"measured": len(todo), "wall_seconds_measuring": wall_measure,
                              "wall_seconds": time.time() - t_start, "shard": args.shard,
                              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
                wall_path.write_text(json.dumps(walls, indent=1) + "\n")
        if args.measure_only:
            return 0

        # ------------------------------------------------------------------ weight errors
        t_table = 0.0
        table_path = work / "error_table.json"
        if not table_path.exists():
            t0 = time.perf_counter()
            table = compute(model, ident.model_id, imatrix, None, THREADS)
            table.save(table_path)
            t_table = time.perf_counter() - t0
            say(f"weight-error table: {t_table:.1f} s")
        llama_version, build = eng.version(), eng.build_id()
        corpus_id = eng.corpus.id

    # ---------------------------------------------------------------------- assemble
    out: Path = args.out or DATASETS / "ground_truth" / td.name
    out.mkdir(parents=True, exist_ok=True)
    free = [g for g in model.groups if g not in td.fixed]
    cols = ["row", "source", "config", "space_index", *[f"t_{g}" for g in free], "types_key", "size_bytes", "bpw",
            *STAT_FIELDS, "fractions"]  # fmt: skip
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    vecs = []
    for i, r in enumerate(plan):
        d = done[r["types_key"]]
        vecs.append(np.load(work / "vec" / f"{r['types_key']}.npy"))
        config = f"preset={r['label']}" if r["source"] == "preset" else r["config"].key
        vals = [i, r["source"], config, r.get("space_index", "")]
        vals += [r["idx"][g] if r["idx"] else "" for g in free]
        vals += [r["types_key"], d["size_bytes"], repr(float(d["bpw"]))]
        vals += [_fmt(d[f]) for f in STAT_FIELDS]
        if r["source"] != "space":  # space rows: every group wholly at its t_ type (derived header-only)
            fr = json.dumps(type_fractions(model, r["types"]), sort_keys=True, separators=(",", ":"))
            vals.append(fr)
        else:
            assign = {**{g: t.name for g, t in td.fixed.items()}, **{g: td.space_types[i].name for g, i in r["idx"].items()}}
            assert type_fractions(model, r["types"]) == {g: {t: 1.0} for g, t in assign.items()}
            vals.append("")
        w.writerow(vals)
    (out / "truth.csv").write_text(buf.getvalue())
    V = np.stack(vecs)
    np.savez_compressed(out / "vectors.npz", kld=V.astype(np.float16))
    (out / "error_table.json").write_text((work / "error_table.json").read_text())
    if imatrix is not None:
        (out / "imatrix.gguf").write_bytes(imatrix.path.read_bytes())
    seconds = [done[r["types_key"]]["seconds"] for r in plan]
    meta = {
        "name": td.name, "base": td.base, "model_id": ident.model_id, "model_name": ident.model_name,
        "family": ident.family, "identity": ident.columns(), "groups": list(model.groups), "free_groups": free,
        "fixed": {g: t.name for g, t in td.fixed.items()}, "space_types": [t.name for t in td.space_types],
        "n_space_configs": len(space), "n_space_files": len(seen_space), "n_presets": len(td.presets),
        "corpus": corpus_id, "ctx": spec.ctx, "n_chunks": spec.n_chunks, "chunk_offset": spec.chunk_offset,
        "n_batch": spec.n_batch, "scored_per_chunk": spec.scored_per_chunk, "n_tokens": spec.n_tokens,
        "search_chunks": td.search_chunks or spec.n_chunks,
        "imatrix_id": imatrix.id if imatrix is not None else None,
        "imatrix_corpus": imatrix.corpus_id if imatrix is not None else None,
        "engine": "inprocess", "threads": THREADS, "llama_version": llama_version, "build": build,
        "mqpredict_version": __version__, "git": git_describe(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds_per_config_median": float(np.median(seconds)), "seconds_measuring_sum": float(np.sum(seconds)),
        "wall_seconds_measuring": sum(w["wall_seconds_measuring"] for w in walls),
        "wall_seconds_total": sum(w["wall_seconds"] for w in walls) + t_table, "measuring_runs": walls,
        "vectors": "vectors.npz: kld float16 (rows of truth.csv) × n_tokens",
    }  # fmt: skip
    if td.base["kind"] == "testmodel":
        meta["model_seed"] = td.base["seed"]
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    err = np.abs(V.astype(np.float16).astype(np.float64).mean(1) / np.array([done[r["types_key"]]["kld_mean"] for r in plan]) - 1)
    say(f"wrote {out}: {len(plan)} rows; float16 vectors change mean KLD by at most {100 * err.max():.3f}%")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    say(f"folder size {size / 1e6:.2f} MB (README excluded until written)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
