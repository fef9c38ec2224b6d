"""Score a whole candidate space at once: exact sizes, deduplication and surrogate features in numpy.

A candidate is one type per group (an index into each group's allowed types). Everything about a
(group, type) pair is precomputed once — the bytes its tensors take at their effective types, its
type fractions, bits per weight and weight error, and an id of its effective types — so that a matrix
of a million candidates turns into exact sizes, unique files and the surrogate's feature matrix with
array arithmetic. The features equal :func:`mqpredict.surrogate.features.row` for the same config
(tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mqpredict.errors import ConfigError
from mqpredict.quant.config import Config
from mqpredict.quant.derive import type_fractions
from mqpredict.quant.header import pad, tensor_nbytes
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve
from mqpredict.quant.size import header_size
from mqpredict.quant.types import NoFallback, QuantType, T
from mqpredict.surrogate import features as F
from mqpredict.surrogate.weight_error import ErrorTable


@dataclass
class Space:
    """Precomputed facts of every (group, allowed type) of one model."""

    model: ModelInfo
    groups: list[str]
    types: list[list[QuantType]]  # allowed types per group
    bytes: list[np.ndarray]  # per group: padded tensor bytes at each type
    raw_bytes: list[np.ndarray]  # per group: unpadded tensor bytes (for bpw)
    eff: list[np.ndarray]  # per group: id of the effective types at each type
    fixed_bytes: int
    fixed_raw: int
    header: int
    imatrix: Imatrix | None = None  # quantized with it: its keys are in the header, its types allowed

    @classmethod
    def build(cls, model: ModelInfo, allowed: dict[str, tuple[QuantType, ...]], imatrix: Imatrix | None = None) -> Space:
        align = model.header.alignment
        groups = list(model.groups)
        types, b, rb, eff = [], [], [], []
        for g in groups:
            ts = model.groups[g]
            ok, sigs, by, rby, ids = [], {}, [], [], []
            for qt in allowed[g]:
                try:  # the group alone at qt, checked as every config is (the Featurizer resolves the same)
                    r = resolve(model, Config(default=T.Q8_0, groups=((g, qt),)), imatrix=imatrix)
                except (NoFallback, ConfigError):  # llama.cpp cannot (or will not) write this type here
                    continue
                e = tuple(r[t.name] for t in ts)
                ok.append(qt)
                ids.append(sigs.setdefault(e, len(sigs)))
                by.append(sum(pad(tensor_nbytes(t.shape, x), align) for t, x in zip(ts, e)))
                rby.append(sum(tensor_nbytes(t.shape, x) for t, x in zip(ts, e)))
            types.append(ok)
            b.append(np.array(by, dtype=np.int64))
            rb.append(np.array(rby, dtype=np.int64))
            eff.append(np.array(ids, dtype=np.int64))
        fixed = model.fixed
        return cls(model, groups, types, b, rb, eff, sum(pad(t.nbytes, align) for t in fixed),
                   sum(t.nbytes for t in fixed), header_size(model, imatrix), imatrix)  # fmt: skip

    @property
    def n_total(self) -> int:
        return math.prod(len(t) for t in self.types)

    def config(self, row: np.ndarray) -> Config:
        """The pure config of one candidate (canonical: the commonest type becomes the default)."""
        groups = {g: self.types[i][int(k)] for i, (g, k) in enumerate(zip(self.groups, row))}
        default = max(set(groups.values()), key=lambda q: (sum(self.model.group_params()[g] for g, t in groups.items()
                                                                if t == q), q.name))  # fmt: skip
        return Config(default=default, groups=tuple(groups.items()))

    def enumerate(self, limit: int | None = None) -> np.ndarray:
        """Every candidate (or the first ``limit``) as an index matrix (n, groups)."""
        n = self.n_total if limit is None else min(limit, self.n_total)
        radices = [len(t) for t in self.types]
        idx = np.arange(n, dtype=np.int64)
        out = np.empty((n, len(radices)), dtype=np.int16)
        for j in range(len(radices) - 1, -1, -1):
            out[:, j] = idx % radices[j]
            idx //= radices[j]
        return out

    def sizes(self, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact file sizes and bpw of candidates."""
        total = np.full(len(A), self.header + self.fixed_bytes, dtype=np.int64)
        raw = np.full(len(A), self.fixed_raw, dtype=np.int64)
        for j in range(len(self.groups)):
            total += self.bytes[j][A[:, j]]
            raw += self.raw_bytes[j][A[:, j]]
        return total, 8.0 * raw / self.model.n_params

    def unique(self, A: np.ndarray) -> np.ndarray:
        """Indices of the first candidate of each distinct file (same effective types = same file)."""
        key = np.zeros(len(A), dtype=np.int64)
        for j in range(len(self.groups)):
            key = key * (int(self.eff[j].max()) + 1) + self.eff[j][A[:, j]]
        _, first = np.unique(key, return_index=True)
        return np.sort(first)


class Featurizer:
    """The surrogate's features for candidate matrices of one model, vectorized."""

    def __init__(self, space: Space, table: ErrorTable) -> None:
        self.space, self.table = space, table
        m = space.model
        self.desc = m.descriptors()
        ref_fr = type_fractions(m, resolve(m, Config.parse("default=Q8_0")))
        self.ref_fr = ref_fr
        self.slots = F._slots(table.shares, bool(self.desc["tied_embeddings"]))
        # per group and type: bpw and mse of the group's effective types
        self.g_bpw, self.g_mse = [], []
        for g, ts in zip(space.groups, space.types):
            bs, ms = [], []
            for qt in ts:  # the group alone at qt (other groups could not all take it)
                fr = type_fractions(m, resolve(m, Config(default=T.Q8_0, groups=((g, qt),)), imatrix=space.imatrix))[g]
                bs.append(F._mix_bpw(fr))
                ms.append(F._group_mse(table, g, fr))
            self.g_bpw.append(np.array(bs))
            self.g_mse.append(np.array(ms))
        self.ref_mse = {g: F._group_mse(table, g, ref_fr.get(g, {})) for g in table.shares}
        gi = {g: j for j, g in enumerate(space.groups)}
        self.gi = gi
        const = F.row(ref_fr, table, self.desc, 0.0, ref_fr)
        self.const = {k: const[k] for k in ("log_params", "n_layers", "log2_embd", "ff_ratio", "log_vocab",
                                            "vocab_share", "tied", "kv_ratio", "dithered", "imatrix",
                                            *F.model_features(table))}  # fmt: skip
        self.active_w = F.active_weights(table)
        self.ref_slot_lerr = {s: const[f"lerr_{s}"] for s in F.SLOTS}

    def matrix(self, A: np.ndarray, bpw: np.ndarray) -> np.ndarray:
        n, t = len(A), self.table
        cols: dict[str, np.ndarray] = {}
        mse = {g: self.g_mse[j][A[:, j]] for g, j in self.gi.items()}
        gbpw = {g: self.g_bpw[j][A[:, j]] for g, j in self.gi.items()}
        lg = lambda x: 0.5 * np.log10(np.maximum(x, F._FLOOR))  # noqa: E731
        for s, gs in self.slots.items():
            share = sum(t.shares.get(g, 0.0) for g in gs)
            if not gs or share == 0:
                cols[f"share_{s}"], cols[f"bpw_{s}"] = np.zeros(n), np.zeros(n)
                cols[f"lerr_{s}"], cols[f"dlerr_{s}"] = np.full(n, F._NO_ERR), np.zeros(n)
                continue
            w = {g: t.shares[g] / share for g in gs}
            cols[f"share_{s}"] = np.full(n, share)
            cols[f"bpw_{s}"] = sum(w[g] * gbpw[g] for g in gs)
            cols[f"lerr_{s}"] = lg(sum(w[g] * mse[g] for g in gs))
            cols[f"dlerr_{s}"] = cols[f"lerr_{s}"] - self.ref_slot_lerr[s]
        groups = list(t.shares)
        werr = sum(t.shares[g] * mse[g] for g in groups)
        werr_ref = sum(t.shares[g] * self.ref_mse[g] for g in groups)
        body = [g for g in groups if g not in ("embeddings", "lm_head")]
        body_share = sum(t.shares[g] for g in body) or 1.0
        cols["bpw"] = bpw
        cols["lwerr"] = np.log10(np.maximum(werr, F._FLOOR))
        cols["dlwerr"] = cols["lwerr"] - math.log10(max(werr_ref, F._FLOOR))
        aw = self.active_w
        cols["lwerr_active"] = np.log10(np.maximum(sum(aw[g] * mse[g] for g in groups), F._FLOOR))
        cols["dlwerr_active"] = cols["lwerr_active"] - math.log10(max(sum(aw[g] * self.ref_mse[g] for g in groups), F._FLOOR))
        cols["lerr_max"] = np.max(np.stack([lg(mse[g]) for g in groups]), axis=0)
        cols["lerr_body"] = lg(sum(t.shares[g] * mse[g] for g in body) / body_share)
        cols["out_minus_body"] = cols["lerr_out"] - cols["lerr_body"] if self.slots["out"] else np.zeros(n)
        for k, v in self.const.items():
            cols[k] = np.full(n, v)
        return np.column_stack([cols[k] for k in F.FEATURES])

