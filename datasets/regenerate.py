"""Regenerate the shipped dataset (datasets/records): real models, their truncations, synthetic models.

    .venv/bin/python datasets/regenerate.py                 # everything (hours on 2 cores; resumable)
    .venv/bin/python datasets/regenerate.py --only smollm2  # one model family
    .venv/bin/python datasets/regenerate.py --only qwen2.5-coder-1.5b --imatrix only --presets-only
    .venv/bin/python datasets/regenerate.py --only synthetic-moe --store /tmp/moe-records   # the tiny MoEs

For each model: the 16 seed presets (+ MXFP4_MOE on a mixture of experts), the recipes in datasets/recipes, isolation probes (one group
changed on a Q8_0 carrier) and a seeded sample of hybrids, deduplicated by the files they make,
measured in process on the bundled corpus (8 chunks of 512: 2048 tokens streamed, or 2040 with
``--scoring windows``; the 1.5B: 4 chunks). ``--imatrix`` (default ``both``) also measures every model
quantized with its importance matrix on the shipped calibration text (computed once, cached): the 27 presets
(the 11 imatrix presets join), the recipes, probes and hybrids whose types include the imatrix-only ones.
Re-running skips what the store holds, so an interrupted run just continues. Per-token vectors are not kept
(the store stays small enough for git).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from mqpredict.base.embedded import prepare_embedded
from mqpredict.base.testmodel import TinyShape, write_test_model
from mqpredict.base.truncate import truncate
from mqpredict.llama.imatrix import ImatrixSettings, compute_imatrix
from mqpredict.llama.inprocess import InProcessEngine
from mqpredict.measure.corpus import EvalSpec, Scoring
from mqpredict.quant.model import ModelInfo
from mqpredict.workflows import seed as seeding
from mqpredict.records.identity import identify
from mqpredict.records.ingest import load_recipes
from mqpredict.records.schema import Source
from mqpredict.records.store import Store
from mqpredict.search.space import CandidateSpace
from mqpredict.surrogate.weight_error import error_table, table_file
from mqpredict.util.paths import DATASETS, DEFAULT_CALIBRATION, DEFAULT_CORPUS, cache_dir

SPEC = EvalSpec(ctx=512, n_chunks=8)
TABLES = DATASETS / "weight_errors"
REAL = {  # name: (hybrids on the full model, truncations kept blocks, hybrids per truncation)
    "smollm2": (150, (8,), 25),
    "gemma3-270m": (70, (9,), 30),
    "qwen2.5-0.5b": (30, (12,), 25),
    "qwen2.5-coder-1.5b": (60, (), 0),
}
#: a 1.5B measurement takes minutes on 2 cores: half the slice
SPECS = {"qwen2.5-coder-1.5b": EvalSpec(ctx=512, n_chunks=4)}
SYNTHETIC = [  # (shape, seeds, hybrids)
    (TinyShape(256, 768, 4), (0, 1), 60),
    (TinyShape(576, 1536, 4, tied=True), (0, 1), 60),
    (TinyShape(384, 1024, 6), (0,), 60),
    (TinyShape(512, 1536, 2, tied=True), (0,), 60),
]
SYNTHETIC_MOE = [  # mixtures of experts: qwen3moe, granitemoe (shared expert), qwen2moe (gated shared expert)
    (TinyShape(256, 256, 4, n_expert=8, n_expert_used=2), (0,), 30),  # 8 experts: llama.cpp's 8-expert preset rules
    (TinyShape(256, 512, 4, n_expert=4, n_expert_used=2, shared_expert=True), (0,), 30),
    (TinyShape(512, 256, 2, n_expert=16, n_expert_used=4, shared_expert=True, shared_expert_gate=True), (0,), 30),
    (TinyShape(384, 512, 4, n_expert=8, n_expert_used=2), (0,), 30),  # 384 wide: K-quants only in experts' down
]


def say(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def table(path: Path, imatrix=None) -> None:
    """The model's weight-error table (with the imatrix: its own), shipped in datasets/weight_errors/ (the
    surrogate's features)."""
    with InProcessEngine(path, None, SPEC, imatrix=imatrix, threads=THREADS) as eng:
        mid = identify(eng.model).model_id
        out = TABLES / table_file(mid, eng.imatrix_id)
        if not out.exists():
            error_table(eng, mid).save(out)


#: llama.cpp threads: on a shared 2-core machine one thread per process wastes nothing on spinning
THREADS = 1


def model_imatrix(path: Path):
    """The model's importance matrix on the shipped calibration text (cached)."""
    im, cached = compute_imatrix(path, DEFAULT_CALIBRATION, None, ImatrixSettings(), threads=THREADS)
    say(f"{path.name}: imatrix {im.id} ({'cached' if cached else 'computed'})")
    return im


def run_model(path: Path, store: Store, hybrids: int, seed: int, spec: EvalSpec, imatrix=None,
              presets_only: bool = False, probes: bool = True) -> None:  # fmt: skip
    if not presets_only:
        table(path, imatrix)
    model = ModelInfo.load(path)
    cands = seeding.preset_candidates(seeding.seed_presets(imatrix is not None, moe=bool(model.n_expert)))
    if not presets_only:
        space = CandidateSpace(model, imatrix=imatrix)  # with one, the imatrix-only types join
        recipes, _ = load_recipes(DATASETS / "recipes")
        cands += seeding.recipe_candidates(recipes)
        isolation = list(space.probes())  # marks the probes' files seen: the sample below never repeats them
        cands += seeding.config_candidates(space.sample(hybrids, np.random.default_rng(seed)), Source.hybrid)
        if probes:  # last: an interrupted run keeps the hybrids
            cands += seeding.config_candidates(isolation, Source.probe)
    what = f"{path.name}{' with imatrix ' + imatrix.id if imatrix else ''}"
    say(f"{what}: {len(cands)} candidates on {spec.n_chunks}×{spec.ctx}")
    with InProcessEngine(path, DEFAULT_CORPUS, spec, imatrix=imatrix, threads=THREADS) as eng:
        rep = seeding.seed(eng, store, cands, say=say, keep_vectors=False)
    say(f"{what}: measured {len(rep.measured)}, failed {len(rep.failed)}, same file {len(rep.same_file)}, "
        f"skipped {len(rep.skipped)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default=str(DATASETS / "records"))
    ap.add_argument("--only", nargs="*", help="model names (smollm2, gemma3-270m, qwen2.5-0.5b, synthetic, "
                    "synthetic-moe)")  # fmt: skip
    ap.add_argument("--tables-only", action="store_true", help="only (re)compute missing weight-error tables")
    ap.add_argument("--imatrix", choices=("both", "only", "none"), default="both",
                    help="measure without an imatrix, with one (the shipped calibration text), or both")
    ap.add_argument("--presets-only", action="store_true", help="only the seed presets (the lines)")
    ap.add_argument("--no-probes", action="store_true", help="no isolation probes (a first pass over many models)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1 on a busy machine)")
    ap.add_argument("--scoring", choices=[s.value for s in Scoring], default=Scoring.stream.value,
                    help="stream (default: one KV-cache pass) or windows (llama-perplexity's windows)")
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads
    if a.tables_only:
        for p in sorted((cache_dir() / "synthetic").glob("*.gguf")) + sorted((cache_dir() / "bases").glob("*.gguf")):
            table(p)
        return
    # a new store is CSV, as the shipped dataset is (it diffs in git); an existing one keeps its format
    store = Store(a.store, None if (Path(a.store) / "STORE.json").exists() else "csv")
    want = set(a.only or ["synthetic", "synthetic-moe", *REAL])
    modes = {"both": (False, True), "only": (True,), "none": (False,)}[a.imatrix]

    def run(path: Path, hybrids: int, seed: int, spec: EvalSpec = SPEC) -> None:
        spec = dataclasses.replace(spec, scoring=Scoring(a.scoring))
        for with_im in modes:
            run_model(path, store, hybrids, seed, spec, model_imatrix(path) if with_im else None, a.presets_only,
                      not a.no_probes)

    for name, shapes in (("synthetic", SYNTHETIC), ("synthetic-moe", SYNTHETIC_MOE)):
        if name not in want:
            continue
        for shape, seeds, n in shapes:
            for s in seeds:
                p = cache_dir() / "synthetic" / f"{shape.kind}-s{s}.gguf"
                if not p.exists():
                    write_test_model(p, s, shape)
                run(p, n, s)
    real = [name for name in REAL if name in want]
    for name in real:  # every family first (what leave-one-family-out needs most), then the truncations
        run(prepare_embedded(name), REAL[name][0], 0, SPECS.get(name, SPEC))
    for name in real:
        base = prepare_embedded(name)
        for k in REAL[name][1]:
            p = cache_dir() / "bases" / f"{name}-first{k}.gguf"
            if not p.exists():
                truncate(base, p, k)
            run(p, REAL[name][2], k)
    say("done")


if __name__ == "__main__":
    sys.exit(main())
