"""The search policy with its settings changed, on a ground truth: what each policy figure of the README's
Search section was measured with.

    .venv/bin/python benchmarks/policy_variants.py [--truth DIR] [--seeds 0-9] [--budgets 15,20]
        [--set explore=0.6 --set batch=2 ...] [--warm-start K] [--json F]

Runs ``mqpredict``'s method of ``bench search`` (the campaign's own ``Policy`` object, asked and told through
the truth's oracle, one campaign per seed and budget) with ``PolicySettings`` fields overridden by ``--set``
(``--warm-start K``: the campaign's ``warm_start`` count instead of min(4, B/5)), and prints the mean ± std of
the true hypervolume found, the declared and the false wins per budget. Each variant is one invocation: run
the default and the variant side by side (2 single-thread jobs on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from mqpredict.bench import search as S
from mqpredict.util.paths import PROJECT_ROOT


def _seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in text.split(",")]


def _value(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, str) else field.type.__name__
    if kind == "bool":
        return text.lower() in ("1", "true", "yes")
    if kind == "int":
        return int(text)
    if kind == "float":
        return float(text)
    return type(field.default)(text)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truth", default=str(PROJECT_ROOT / "datasets" / "ground_truth" / "smollm2-imatrix"))
    ap.add_argument("--seeds", default="0-4", help="0-9 or 0,3,5")
    ap.add_argument("--budgets", default="15,20")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a PolicySettings field")
    ap.add_argument("--warm-start", type=int, default=None, help="allocator configs measured first (default min(4, B/5))")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    fields = {f.name: f for f in dataclasses.fields(S.POLICY)}
    changes = {}
    for item in a.set:
        k, _, v = item.partition("=")
        if k not in fields:
            ap.error(f"--set {item}: PolicySettings has no field {k!r} (fields: {', '.join(fields)})")
        changes[k] = _value(fields[k], v)
    settings = dataclasses.replace(S.POLICY, **changes)
    t = S.Truth.load(a.truth)
    seeds, budgets = _seeds(a.seeds), [int(b) for b in a.budgets.split(",")]
    kw = {} if a.warm_start is None else {"warm_start": a.warm_start}  # (without it the script runs on older commits)
    mq = S.MqPredict(t, settings=settings, **kw)
    hv = {b: [] for b in budgets}
    declared = {b: 0 for b in budgets}
    false = {b: 0 for b in budgets}
    t0 = time.perf_counter()
    for seed in seeds:
        r = S.simulate(t, "mqpredict", seed, budgets, mq)
        for b in budgets:
            hv[b].append(r["hv_conf"][b])
            declared[b] += r["declared_wins"][b]
            false[b] += r["false_wins"][b]
        print(f"seed {seed}: " + " ".join(f"B={b} {r['hv_conf'][b]:.3f}" for b in budgets), file=sys.stderr, flush=True)
    label = " ".join(a.set) + (f" warm-start={a.warm_start}" if a.warm_start is not None else "") or "defaults"
    print(f"{label} ({len(seeds)} seeds, {time.perf_counter() - t0:.0f} s): " + " · ".join(
        f"B={b} {np.mean(hv[b]):.3f} ± {np.std(hv[b], ddof=1) if len(seeds) > 1 else 0:.3f} "
        f"({declared[b]} declared, {false[b]} false)" for b in budgets))  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({"truth": a.truth, "settings": dataclasses.asdict(settings), "seeds": seeds,
                                      "warm_start": a.warm_start, "hv": {str(b): hv[b] for b in budgets},
                                      "declared": declared, "false": false}, indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
