"""Regenerate the shipped dataset (datasets/records): real models, their truncations, synthetic models.

    .venv/bin/python datasets/regenerate.py                 # everything (hours on 2 cores; resumable)
    .venv/bin/python datasets/regenerate.py --only smollm2  # one model family

For each model: the 16 seed presets, the recipes in datasets/recipes, isolation probes (one group
changed on a Q8_0 carrier) and a seeded sample of hybrids, deduplicated by the files they make,
measured in process on the bundled corpus (8 windows of 512, 2040 tokens). Re-running skips what the
store holds, so an interrupted run just continues. Per-token vectors are not kept (the store stays
small enough for git).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from mqpredict.base.embedded import prepare_embedded
from mqpredict.base.testmodel import TinyShape, write_test_model
from mqpredict.base.truncate import truncate
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec
from mqpredict.quant.model import ModelInfo
from mqpredict.records import seed as seeding
from mqpredict.records.identity import identify
from mqpredict.records.ingest import load_recipes
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.search.space import CandidateSpace
from mqpredict.surrogate.weight_error import error_table, table_file
from mqpredict.util.paths import DATASETS, DEFAULT_CORPUS, cache_dir

SPEC = EvalSpec(ctx=512, n_chunks=8)
TABLES = DATASETS / "weight_errors"
REAL = {  # name: (hybrids on the full model, truncations kept blocks, hybrids per truncation)
    "smollm2": (150, (8,), 25),
    "gemma3-270m": (70, (9,), 30),
    "qwen2.5-0.5b": (30, (12,), 25),
}
SYNTHETIC = [  # (shape, seeds, hybrids)
    (TinyShape(256, 768, 4), (0, 1), 60),
    (TinyShape(576, 1536, 4, tied=True), (0, 1), 60),
    (TinyShape(384, 1024, 6), (0,), 60),
    (TinyShape(512, 1536, 2, tied=True), (0,), 60),
]


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def table(path: Path) -> None:
    """The model's weight-error table, shipped in datasets/weight_errors/ (the surrogate's features)."""
    with InProcessEngine(path, None, SPEC) as eng:
        mid = identify(eng.model).model_id
        out = TABLES / table_file(mid, eng.imatrix_id)
        if not out.exists():
            error_table(eng, mid).save(out)


def run_model(path: Path, store: Store, hybrids: int, seed: int) -> None:
    table(path)
    model = ModelInfo.load(path)
    space = CandidateSpace(model)
    recipes, _ = load_recipes(DATASETS / "recipes")
    cands = seeding.preset_candidates() + seeding.recipe_candidates(recipes)
    probes = list(space.probes())  # marks the probes' files seen: the sample below never repeats them
    cands += seeding.config_candidates(space.sample(hybrids, np.random.default_rng(seed)), Source.hybrid)
    cands += seeding.config_candidates(probes, Source.probe)  # last: an interrupted run keeps the hybrids
    say(f"{path.name}: {len(cands)} candidates")
    with InProcessEngine(path, DEFAULT_CORPUS, SPEC) as eng:
        rep = seeding.seed(eng, store, cands, say=lambda s: None, keep_vectors=False)
    say(f"{path.name}: measured {len(rep.measured)}, failed {len(rep.failed)}, same file {len(rep.same_file)}, "
        f"skipped {len(rep.skipped)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(DATASETS / "records"))
    ap.add_argument("--only", nargs="*", help="model names (smollm2, gemma3-270m, qwen2.5-0.5b, synthetic)")
    ap.add_argument("--tables-only", action="store_true", help="only (re)compute missing weight-error tables")
    a = ap.parse_args()
    if a.tables_only:
        for p in sorted((cache_dir() / "synthetic").glob("*.gguf")) + sorted((cache_dir() / "bases").glob("*.gguf")):
            table(p)
        return
    store = Store(a.store)
    want = set(a.only or ["synthetic", *REAL])
    if "synthetic" in want:
        for shape, seeds, n in SYNTHETIC:
            for s in seeds:
                p = cache_dir() / "synthetic" / f"tiny-{shape.n_embd}x{shape.n_layers}-s{s}.gguf"
                if not p.exists():
                    write_test_model(p, s, shape)
                run_model(p, store, n, s)
    real = [name for name in REAL if name in want]
    for name in real:  # every family first (what leave-one-family-out needs most), then the truncations
        run_model(prepare_embedded(name), store, REAL[name][0], 0)
    for name in real:
        base = prepare_embedded(name)
        for k in REAL[name][1]:
            p = cache_dir() / "bases" / f"{name}-first{k}.gguf"
            if not p.exists():
                truncate(base, p, k)
            run_model(p, store, REAL[name][2], k)
    say("done")


if __name__ == "__main__":
    sys.exit(main())
