"""Using a surrogate on a model: the right surrogate, the model's features, predictions with sizes.

A surrogate used on a model must never have learnt from that model's family (other than records of
the current campaign): :func:`surrogate_for` checks the metadata's training families and, if the
family is there, trains one without it from the shipped dataset (cached), instead of trusting it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.derive import type_fractions
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.size import size_of
from mqpredict.records.identity import ModelIdentity
from mqpredict.records.store import Store
from mqpredict.surrogate import features as F
from mqpredict.surrogate.data import build, load_tables
from mqpredict.surrogate.model import Surrogate
from mqpredict.surrogate.weight_error import ErrorTable
from mqpredict.util.paths import DATASETS, PROJECT_ROOT, cache_dir

DEFAULT_SURROGATE = PROJECT_ROOT / "models" / "default"
DEFAULT_STORE = DATASETS / "records"
DEFAULT_TABLES = DATASETS / "weight_errors"


def unused(dropped: dict[str, int]) -> str:
    """``dropped`` (records left out of a training set, by reason) as one phrase, largest first."""
    from mqpredict.surrogate.data import DROP_REASONS

    return ", ".join(f"{n} {DROP_REASONS.get(k, k)}" for k, n in sorted(dropped.items(), key=lambda kv: -kv[1]))


def train(store: Path, tables: Path, exclude_families: tuple[str, ...] = (), **params) -> tuple[Surrogate, dict]:
    """A surrogate trained on ``store``'s records; the records it could not use are counted by reason in the
    metadata (``unused_records``), and a store that contributes no training row is refused."""
    recs = Store(store, create=False).load()
    data = build(recs, load_tables(tables), exclude_families)
    if len(data.X) == 0:
        raise InputError(f"{store} contributes no training row: of its {len(recs)} record(s), "
                         + (unused(data.dropped) or "none is there"),
                         f"weight-error tables of its models go in {tables}; every context needs its Q8_0 measured; "
                         "no surrogate was written")  # fmt: skip
    s = Surrogate(**params).fit(data)
    keys = sorted(recs["key"])
    meta = {"train_records": {"n": int(len(data.X)), "store": str(store),
                              "hash": hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]},
            "unused_records": data.dropped, "excluded_families": list(exclude_families)}  # fmt: skip
    return s, meta


def surrogate_for(identity: ModelIdentity, folder: Path = DEFAULT_SURROGATE, store: Path = DEFAULT_STORE,
                  tables: Path = DEFAULT_TABLES, say=None) -> tuple[Surrogate, dict]:  # fmt: skip
    """A surrogate that has not learnt from ``identity``'s family (retrained without it if needed)."""
    s, meta = Surrogate.load(folder)
    if identity.family not in s.train_families_ and identity.model_id not in {m for m, _, _ in s.train_models_}:
        return s, meta
    # the feature set is part of the key: a cache entry of another mqpredict version is never reused
    digest = hashlib.sha256((json.dumps(meta.get("train_records", {}), sort_keys=True) + identity.family
                             + json.dumps(list(F.FEATURES))).encode())
    cached = cache_dir() / "surrogates" / digest.hexdigest()[:16]
    if (cached / "metadata.json").exists():
        s2, meta2 = Surrogate.load(cached)
    else:
        if say:
            say(f"the surrogate in {folder} learnt from {identity.family}; training one without that family")
        s2, extra = train(store, tables, (identity.family,), **meta["params"])
        meta2 = {**extra}
        s2.save(cached, meta2)
    if identity.family in s2.train_families_:  # the metadata is checked, never trusted
        raise InputError(f"could not exclude {identity.family} from the surrogate's training data")
    return s2, meta2


@dataclass
class Scored:
    config: Config
    size_bytes: int
    bpw: float
    types_key: str
    features: dict


def score_configs(model, table: ErrorTable, configs: list[Config], preset_resolver=None, imatrix=None) -> list[Scored]:
    """Exact sizes and feature rows of configs on ``model`` (presets through ``preset_resolver``), quantized
    with ``imatrix`` (``table`` must be its table) or without."""
    ref_types = resolve(model, Config.parse("preset=Q8_0"), preset_resolver, imatrix) if preset_resolver else \
        resolve(model, Config.parse("default=Q8_0"), imatrix=imatrix)  # fmt: skip
    ref_fr = type_fractions(model, ref_types)
    d = model.descriptors()
    out = []
    for c in configs:
        types = resolve(model, c, preset_resolver if c.is_preset else None, imatrix)
        size = size_of(model, types, imatrix)
        fr = type_fractions(model, types)
        out.append(Scored(c, size.size_bytes, size.bpw, types_key(model, types), F.row(fr, table, d, size.bpw, ref_fr)))
    return out


def predict_rows(s: Surrogate, scored: list[Scored], ln_ref: float | None, ref_x: dict | None) -> list[dict]:
    """Rows with kld_pred and its interval; ``ln_ref`` measured (reference mode) or None (zero-shot)."""
    X = F.matrix([x.features for x in scored])
    p = s.predict(X)
    if ln_ref is None:
        base = float(s.predict_reference(F.matrix([ref_x]))[0])
        calibrated = not math.isnan(s.halfwidth_zero_)
        # without zero-shot calibration (fewer than two families with references) the width is a guess:
        # twice the reference mode's; the row says so (``interval_calibrated``) and the CLI prints it
        hw = s.halfwidth_zero_ if calibrated else 2 * s.kld_halfwidth(X)
        lo, hi = base + p["kld"].mean - hw, base + p["kld"].mean + hw
        mode = "zero-shot"
    else:
        base, lo, hi, mode = ln_ref, ln_ref + p["kld"].lo, ln_ref + p["kld"].hi, "reference"
        calibrated = bool(s.calibrated_)
    mean = base + p["kld"].mean
    flags = s.out_of_range(X)
    return [
        {"config": x.config.key, "size_bytes": x.size_bytes, "bpw": x.bpw, "types_key": x.types_key,
         "kld_pred": float(np.exp(mean[i])), "kld_lo": float(np.exp(lo[i])), "kld_hi": float(np.exp(hi[i])),
         "mode": mode, "interval_calibrated": calibrated, "out_of_range": flags[i]}
        for i, x in enumerate(scored)
    ]  # fmt: skip
