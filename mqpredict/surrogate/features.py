"""Features of a (model, config): transferable across models, no model identity.

A config enters only through each group's **type fractions** (how many of the group's parameters sit at
each effective type); the model through its descriptors and its **weight-error table** (relative MSE of
each group at each type, :mod:`mqpredict.surrogate.weight_error`) — the table of the record's imatrix:
imatrix-weighted errors (and ``imatrix`` = 1) for a config quantized with one. Groups are mapped onto fixed *slots*
so models of different shapes line up: ``out`` is the output projection (``lm_head``, or the tied
``token_embd``), ``emb`` the input embedding table (the same tensor when tied), a mixture of experts'
routed up/gate and down projections and its shared experts have slots of their own, dynamic groups share
``other``.

A mixture of experts also enters through what one token uses: the active share of the parameters, the
fraction of the routed experts used per token, and the weight error weighted by active parameters
(dense models: 1, 1 and the plain weighted error).

Every feature, one line each (``FEATURE_DOCS``), is a number; absent groups give 0 (shares, bpw) and
-9 (log errors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from mqpredict.quant.groups import StandardGroup as G
from mqpredict.quant.types import T, bpw
from mqpredict.surrogate.weight_error import ErrorTable

SLOTS = ("emb", "out", "attn_q", "attn_kv", "attn_output", "ffn_up_gate", "ffn_down", "moe_experts_up_gate",
         "moe_experts_down", "moe_shexp", "ssm", "other")  # fmt: skip
_NO_ERR = -9.0  # log10 relative RMS error of an absent group
_FLOOR = 1e-18

FEATURE_DOCS: dict[str, str] = {}
for _s in SLOTS:
    FEATURE_DOCS[f"share_{_s}"] = f"fraction of the model's parameters in the {_s} slot"
    FEATURE_DOCS[f"bpw_{_s}"] = f"bits per weight of the {_s} slot's effective types (parameter-weighted)"
    FEATURE_DOCS[f"lerr_{_s}"] = f"log10 relative RMS weight error of the {_s} slot at its types on this model"
    FEATURE_DOCS[f"dlerr_{_s}"] = f"lerr_{_s} minus its value in the Q8_0 reference"
FEATURE_DOCS.update({
    "bpw": "bits per weight of the whole file (tensor bytes × 8 / parameters)",
    "lwerr": "log10 of the share-weighted sum of group relative MSEs (total weight-space error)",
    "dlwerr": "lwerr minus the Q8_0 reference's lwerr (how much more error than the reference)",
    "lwerr_active": "log10 of the group relative MSEs weighted by the parameters one token uses (MoE: routed "
                    "experts count experts used / experts; dense: the same as lwerr)",
    "dlwerr_active": "lwerr_active minus the Q8_0 reference's",
    "lerr_max": "log10 relative RMS error of the worst group",
    "lerr_body": "log10 relative RMS error of the transformer body (all groups but emb/out), share-weighted",
    "out_minus_body": "lerr_out − lerr_body: is the output projection quantized harder than the body",
    "log_params": "log10 of the parameter count",
    "n_layers": "number of blocks",
    "log2_embd": "log2 of the hidden size",
    "ff_ratio": "feed-forward size / hidden size",
    "log_vocab": "log10 of the vocabulary size",
    "vocab_share": "share of parameters in the embedding table (vocab × hidden / parameters)",
    "tied": "1 if the output projection is the embedding table",
    "kv_ratio": "key/value heads / attention heads (GQA)",
    "active_share": "fraction of the model's parameters one token uses (1 for a dense model)",
    "expert_ratio": "fraction of the routed experts one token uses: experts used / experts (1 for a dense model)",
    "dithered": "1 if the base was restored from a quantized file by dithering",
    "imatrix": "1 if the config is quantized with an importance matrix (its weight errors are then imatrix-weighted)",
})  # fmt: skip
FEATURES: tuple[str, ...] = tuple(FEATURE_DOCS)


def _slots(groups: Mapping[str, object], tied: bool) -> dict[str, list[str]]:
    """slot → the model's groups in it."""
    out: dict[str, list[str]] = {s: [] for s in SLOTS}
    for g in groups:
        if g == G.EMBEDDINGS:
            out["emb"].append(g)
            if tied:
                out["out"].append(g)
        elif g == G.LM_HEAD:
            out["out"].append(g)
        elif g in out:
            out[g].append(g)
        else:
            out["other"].append(g)
    return out


def _group_mse(table: ErrorTable, group: str, mix: Mapping[str, float]) -> float:
    """Relative MSE of a group whose parameters are split over types as ``mix``."""
    total = 0.0
    for t, frac in mix.items():
        e = table.mse(group, t)
        if e is None:  # a type the table does not hold (e.g. F32 on an F16 base): no quantization error
            e = 0.0 if t in ("F32", "F16", "BF16") else float("nan")
        total += frac * e
    return total


def _mix_bpw(mix: Mapping[str, float]) -> float:
    return sum(frac * bpw(T[t]) for t, frac in mix.items())


def _lg(x: float) -> float:
    return 0.5 * math.log10(max(x, _FLOOR))  # log10 of the RMS from an MSE


def active_weights(table: ErrorTable) -> dict[str, float]:
    """group → its share of the parameters one token uses, normalised over the groups (sums to 1)."""
    w = {g: table.shares[g] * table.active_of(g) for g in table.shares}
    total = sum(w.values()) or 1.0
    return {g: v / total for g, v in w.items()}


def model_features(table: ErrorTable) -> dict[str, float]:
    """The MoE descriptors that come from the table (dense: 1 and 1)."""
    fixed = 1.0 - sum(table.shares.values())  # never quantized (norms, routers): used by every token
    active = fixed + sum(table.shares[g] * table.active_of(g) for g in table.shares)
    routed = [g for g in table.shares if table.active_of(g) < 1.0]
    share = sum(table.shares[g] for g in routed)
    ratio = sum(table.shares[g] * table.active_of(g) for g in routed) / share if share else 1.0
    return {"active_share": active, "expert_ratio": ratio}


def reference_fractions(table: ErrorTable) -> dict[str, dict[str, float]]:
    """The Q8_0 reference: every group at Q8_0 (F16 where Q8_0 does not fit, as llama.cpp falls back)."""
    return {g: {"Q8_0": 1.0} if "Q8_0" in errs else {"F16": 1.0} for g, errs in table.errors.items()}


def row(fractions: Mapping[str, Mapping[str, float]], table: ErrorTable, descriptors: Mapping, file_bpw: float,
        ref_fractions: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, float]:  # fmt: skip
    """The feature row of one config (its group type fractions) on one model."""
    d = descriptors
    tied = bool(d["tied_embeddings"])
    slots = _slots(table.shares, tied)
    ref = ref_fractions or reference_fractions(table)

    def slot_stats(fr):
        res = {}
        for s, gs in slots.items():
            share = sum(table.shares.get(g, 0.0) for g in gs)
            if not gs or share == 0:
                res[s] = (0.0, 0.0, _NO_ERR, 0.0)
                continue
            w = [table.shares[g] / share for g in gs]
            mse = sum(wi * _group_mse(table, g, fr.get(g, {})) for wi, g in zip(w, gs))
            b = sum(wi * _mix_bpw(fr.get(g, {})) for wi, g in zip(w, gs))
            res[s] = (share, b, _lg(mse), mse)
        return res

    cur, base = slot_stats(fractions), slot_stats(ref)
    f: dict[str, float] = {}
    for s in SLOTS:
        share, b, lerr, _ = cur[s]
        f[f"share_{s}"] = share
        f[f"bpw_{s}"] = b
        f[f"lerr_{s}"] = lerr
        f[f"dlerr_{s}"] = lerr - base[s][2] if share else 0.0
    groups = list(table.shares)
    mses = {g: _group_mse(table, g, fractions.get(g, {})) for g in groups}
    ref_mses = {g: _group_mse(table, g, ref.get(g, {})) for g in groups}
    werr = sum(table.shares[g] * mses[g] for g in groups)
    werr_ref = sum(table.shares[g] * ref_mses[g] for g in groups)
    aw = active_weights(table)
    awerr = sum(aw[g] * mses[g] for g in groups)
    awerr_ref = sum(aw[g] * ref_mses[g] for g in groups)
    body = [g for g in groups if g not in (G.EMBEDDINGS, G.LM_HEAD)]
    body_share = sum(table.shares[g] for g in body) or 1.0
    f["bpw"] = file_bpw
    f["lwerr"] = math.log10(max(werr, _FLOOR))
    f["dlwerr"] = f["lwerr"] - math.log10(max(werr_ref, _FLOOR))
    f["lwerr_active"] = math.log10(max(awerr, _FLOOR))
    f["dlwerr_active"] = f["lwerr_active"] - math.log10(max(awerr_ref, _FLOOR))
    f["lerr_max"] = max((_lg(m) for m in mses.values()), default=_NO_ERR)
    f["lerr_body"] = _lg(sum(table.shares[g] * mses[g] for g in body) / body_share)
    f["out_minus_body"] = f["lerr_out"] - f["lerr_body"] if cur["out"][0] else 0.0
    f["log_params"] = math.log10(d["n_params"])
    f["n_layers"] = float(d["n_layers"])
    f["log2_embd"] = math.log2(max(d["n_embd"], 1))
    f["ff_ratio"] = d["n_ff"] / max(d["n_embd"], 1)
    f["log_vocab"] = math.log10(max(d["n_vocab"], 1))
    f["vocab_share"] = d["n_vocab"] * d["n_embd"] / d["n_params"]
    f["tied"] = float(tied)
    f["kv_ratio"] = (d["n_head_kv"] or 1) / max(d["n_head"] or 1, 1)
    f["dithered"] = float(str(d.get("base_origin") or "").startswith("dither"))
    f.update(model_features(table))
    f["imatrix"] = float(table.weighted)
    return f


def matrix(rows: list[dict[str, float]]) -> np.ndarray:
    return np.array([[r[k] for k in FEATURES] for r in rows], dtype=np.float64)
