"""The zero-run allocator (llama.cpp PR #15550's method): the config of least weight error at a file size.

No KLD run: for every tensor (or group) and candidate type, the weight-space error of the model's own
weights at that type (:mod:`mqpredict.surrogate.weight_error`: imatrix-weighted with an importance matrix,
plain MSE without) is a relative error; the objective is the relative error × the parameters a token uses
from the tensor (an untied token_embd: those of the layer-0 tensors that read it), added across tensors.
Then:

1. each unit's options are its candidate types' *effective* types (llama.cpp's fallbacks applied,
   duplicates removed, types llama.cpp would refuse dropped) with their exact bytes and error; only the
   (bytes, error) **Pareto front** is kept;
2. a **Lagrange multiplier** λ is bisected: every unit takes the option minimising ``error + λ · bytes``,
   and λ is the smallest for which the file fits the target — the exact file size (header, imatrix keys
   and padding included, :mod:`mqpredict.quant.size`) for ``--target-size``, the tensor bytes for
   ``--target-bpw`` — never over it;
3. what is left of the budget is **filled greedily**, each step taking the upgrade with the best
   Δerror/Δbytes that still fits; then, beyond the PR, pairs of moves (one unit a type up, another a type
   down) that fit and lower the total error are made while there are any (the budget is lumpy: on a
   model of few tensors the Lagrangian answer and the greedy fill can leave much of it unused);
4. when the units' partial (bytes, error) Pareto fronts stay small (group-level allocation, models of few
   tensors: at most :data:`DP_CAP` points) a dynamic program over them gives the exact optimum, kept if
   better. (On the 1.5B's 198 tensors the fronts outgrow it; there steps 2–3 came within 0.03 % of a
   thinned dynamic program's answer, measured while writing this.)

The result is expressed as a compact config (:func:`mqpredict.quant.derive.config_from_types`: default type,
per-group types, merged ``tensor:`` patterns for the exceptions) whose effective types are checked to be
exactly the allocation's, so ``mqpredict size``/``build`` reproduce its size to the byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mqpredict.errors import InputError
from mqpredict.quant.config import Config
from mqpredict.quant.derive import config_from_types
from mqpredict.quant.header import pad, tensor_nbytes
from mqpredict.quant.imatrix import Imatrix
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import quantizable, resolve
from mqpredict.quant.size import header_size, size_of
from mqpredict.quant.types import NoFallback, QuantType, T, effective_type
from mqpredict.surrogate.weight_error import ERROR_TYPES, IMATRIX_ONLY_TYPES, ErrorTable

#: the types the allocator chooses from by default (every type the weight-error table holds but F16)
DEFAULT_TYPES: tuple[QuantType, ...] = tuple(t for t in ERROR_TYPES if t != T.F16)
_BISECTIONS = 200
DP_CAP = 4096  # largest partial front the exact search keeps (beyond: it gives up)


def default_types(imatrix: Imatrix | None) -> tuple[QuantType, ...]:
    return DEFAULT_TYPES + (IMATRIX_ONLY_TYPES if imatrix is not None else ())


@dataclass(frozen=True)
class Target:
    """A file-size budget in bytes, or a bits-per-weight budget (exactly one)."""

    size_bytes: int | None = None
    bpw: float | None = None

    def __post_init__(self) -> None:
        if (self.size_bytes is None) == (self.bpw is None):
            raise InputError("give exactly one of --target-size and --target-bpw")
        if (self.size_bytes is not None and self.size_bytes <= 0) or (self.bpw is not None and self.bpw <= 0):
            raise InputError("the target must be positive")

    def __str__(self) -> str:
        return f"{self.size_bytes:,} bytes" if self.size_bytes is not None else f"{self.bpw:g} bpw"


@dataclass(frozen=True)
class Allocation:
    """The allocator's answer: a config, its exact size and bpw, and the error it minimised."""

    config: Config
    types: Mapping[str, QuantType]  # effective type of every tensor
    size_bytes: int
    bpw: float
    expected_error: float  # the objective: Σ over tensors of relative weight error × weight (see weight_error)
    target: Target
    weighted: bool  # imatrix-weighted errors (False: plain MSE)
    lam: float  # the Lagrange multiplier of the solution (error per byte)

    def to_json(self) -> dict:
        return {"config": self.config.key, "size_bytes": self.size_bytes, "bpw": self.bpw,
                "expected_error": self.expected_error, "weighting": "imatrix" if self.weighted else "plain MSE",
                "target": {"size_bytes": self.target.size_bytes, "bpw": self.target.bpw}, "lambda": self.lam}  # fmt: skip


@dataclass
class _Unit:
    """Tensors that take one type together; their Pareto options (ascending bytes, descending error)."""

    tensors: tuple[str, ...]
    types: list[tuple[QuantType, ...]]  # per option: the effective type of each tensor
    cost: np.ndarray  # per option: the budgeted bytes (padded for a size target, raw for bpw)
    error: np.ndarray


def _options(model: ModelInfo, table: ErrorTable, names: Sequence[str], types: Sequence[QuantType],
             padded: bool, imatrix: Imatrix | None) -> tuple[list[tuple[QuantType, ...]], list[int], list[float]]:  # fmt: skip
    tmap, align = model.header.tensor_map, model.header.alignment
    seen, out_t, out_c, out_e = set(), [], [], []
    for q in types:
        try:
            eff = tuple(effective_type(q, tmap[n].shape[0]) for n in names)
        except NoFallback:
            continue
        if eff in seen or not all(quantizable(n, e, imatrix) for n, e in zip(names, eff)):
            continue  # (llama.cpp refuses e.g. IQ2_XS on token_embd, which no imatrix holds)
        errs = [table.abs_error(n, e.name) for n, e in zip(names, eff)]
        if any(x is None for x in errs):  # llama.cpp would refuse it here (or the table lacks it)
            continue
        seen.add(eff)
        nb = [tensor_nbytes(tmap[n].shape, e) for n, e in zip(names, eff)]
        out_t.append(eff)
        out_c.append(sum(pad(b, align) for b in nb) if padded else sum(nb))
        out_e.append(float(sum(errs)))
    return out_t, out_c, out_e


def _pareto(types, cost, error) -> tuple[list, np.ndarray, np.ndarray]:
    """The options no other option beats on both bytes and error: ascending bytes, strictly falling error."""
    keep, best = [], math.inf
    for i in sorted(range(len(cost)), key=lambda i: (cost[i], error[i])):
        if error[i] < best and not (keep and cost[keep[-1]] == cost[i]):
            keep.append(i)
            best = error[i]
    return ([types[i] for i in keep], np.array([cost[i] for i in keep], dtype=np.int64),
            np.array([error[i] for i in keep], dtype=np.float64))


def _units(model: ModelInfo, table: ErrorTable, types: Sequence[QuantType], padded: bool, by: str,
           allowed: Mapping[str, Sequence[QuantType]] | None, imatrix: Imatrix | None) -> list[_Unit]:  # fmt: skip
    if not table.tensors:
        raise InputError(f"the weight-error table of {model.path.name} has no per-tensor errors (an old table)",
                         "delete it from the cache: mqpredict computes a new one in seconds")  # fmt: skip
    units = []
    for g, ts in model.groups.items():
        cands = tuple(allowed[g]) if allowed is not None and g in allowed else tuple(types)
        blocks = [tuple(t.name for t in ts)] if by == "group" else [(t.name,) for t in ts]
        for names in blocks:
            ty, c, e = _options(model, table, names, cands, padded, imatrix)
            if not ty:
                raise InputError(f"no candidate type fits {names[0]} ({', '.join(q.name for q in cands)})",
                                 "give --types more types")  # fmt: skip
            units.append(_Unit(names, *_pareto(ty, c, e)))
    return units


def _cost(units: list[_Unit], pick: np.ndarray) -> int:
    return int(sum(int(u.cost[i]) for u, i in zip(units, pick)))


def _error(units: list[_Unit], pick: np.ndarray) -> float:
    return float(sum(u.error[i] for u, i in zip(units, pick)))


def _fill(units: list[_Unit], pick: np.ndarray, left: int) -> np.ndarray:
    """Upgrades by best Δerror/Δbytes while they fit in ``left`` budgeted bytes."""
    pick = pick.copy()
    while True:
        best, best_ratio = None, 0.0
        for k, u in enumerate(units):
            i = pick[k]
            for j in range(i + 1, len(u.cost)):
                dc = int(u.cost[j] - u.cost[i])
                de = float(u.error[i] - u.error[j])
                if dc <= left and de > 0 and de / dc > best_ratio:
                    best, best_ratio = (k, j, dc), de / dc
        if best is None:
            return pick
        k, j, dc = best
        pick[k] = j
        left -= dc


def _exchange(units: list[_Unit], pick: np.ndarray, left: int, block: int = 512) -> np.ndarray | None:
    """The best pair of moves — one unit up, another down — that fits in ``left`` and lowers the total error,
    applied; None when there is none."""
    uk, uj, uc, ue, dk, dj, dc, de = [], [], [], [], [], [], [], []
    for k, u in enumerate(units):
        i = pick[k]
        for j in range(len(u.cost)):
            if j > i:
                uk.append(k), uj.append(j), uc.append(int(u.cost[j] - u.cost[i])), ue.append(u.error[j] - u.error[i])
            elif j < i:
                dk.append(k), dj.append(j), dc.append(int(u.cost[j] - u.cost[i])), de.append(u.error[j] - u.error[i])
    if not uk or not dk:
        return None
    uk, uc, ue, dk, dc, de = (np.asarray(x) for x in (uk, uc, ue, dk, dc, de))
    total = float(sum(u.error[i] for u, i in zip(units, pick)))
    best, best_gain = None, 1e-12 * max(total, 1e-300)
    for a in range(0, len(uk), block):  # in blocks: a 70B's moves would not fit one matrix
        c = uc[a : a + block, None] + dc[None, :]
        e = ue[a : a + block, None] + de[None, :]
        ok = (c <= left) & (uk[a : a + block, None] != dk[None, :])
        e = np.where(ok, e, np.inf)
        flat = int(np.argmin(e))
        if -e.flat[flat] > best_gain:
            best_gain = -float(e.flat[flat])
            best = (a + flat // len(dk), flat % len(dk))
    if best is None:
        return None
    pick = pick.copy()
    pick[uk[best[0]]], pick[dk[best[1]]] = uj[best[0]], dj[best[1]]
    return pick


def _frontier_dp(units: list[_Unit], budget: int, cap: int = DP_CAP) -> np.ndarray | None:
    """The least-error choice within ``budget`` by dynamic programming over partial (bytes, error) Pareto
    fronts, one unit at a time: exact. None if a front grows beyond ``cap`` points (many tensors: the
    Lagrangian answer is then within a small fraction of the optimum anyway) or nothing fits."""
    rest = np.cumsum([int(u.cost[0]) for u in units][::-1])[::-1].tolist()[1:] + [0]  # cheapest of the units after
    cost, err = np.zeros(1, dtype=np.int64), np.zeros(1)
    backs: list[tuple[np.ndarray, np.ndarray]] = []
    for k, u in enumerate(units):
        n = len(u.cost)
        c = (cost[:, None] + u.cost[None, :]).ravel()
        e = (err[:, None] + u.error[None, :]).ravel()
        ok = np.flatnonzero(c + rest[k] <= budget)
        if not len(ok):
            return None
        order = ok[np.lexsort((e[ok], c[ok]))]
        running = np.minimum.accumulate(e[order])
        keep = order[np.r_[True, e[order][1:] < running[:-1]]]  # strictly less error than every cheaper state
        if len(keep) > cap:
            return None
        backs.append((keep // n, keep % n))
        cost, err = c[keep], e[keep]
    i = int(np.argmin(err))
    pick = np.zeros(len(units), dtype=np.int64)
    for k in range(len(units) - 1, -1, -1):
        parent, choice = backs[k]
        pick[k] = choice[i]
        i = int(parent[i])
    return pick


def allocate(model: ModelInfo, table: ErrorTable, target: Target, types: Sequence[QuantType] | None = None,
             imatrix: Imatrix | None = None, *, by: str = "tensor",
             allowed: Mapping[str, Sequence[QuantType]] | None = None) -> Allocation:  # fmt: skip
    """The config of least total weight error whose file fits ``target`` (never over it).

    ``table`` must be the model's table for ``imatrix`` (imatrix-weighted with one, plain MSE without);
    ``by="group"`` gives every tensor of a group one type (``allowed`` restricts a group's types)."""
    if (table.imatrix_id or None) != (imatrix.id if imatrix is not None else None):
        raise InputError(f"the weight-error table was computed for imatrix {table.imatrix_id or 'none'}, the "
                         f"allocation asks for {imatrix.id if imatrix is not None else 'none'}")  # fmt: skip
    types = tuple(types or default_types(imatrix))
    padded = target.size_bytes is not None
    units = _units(model, table, types, padded, by, allowed, imatrix)
    fixed = model.fixed
    if padded:
        budget = target.size_bytes - header_size(model, imatrix) - sum(pad(t.nbytes, model.header.alignment) for t in fixed)
    else:
        budget = math.floor(target.bpw * model.n_params / 8) - sum(t.nbytes for t in fixed)
        while budget > 0 and 8.0 * (budget + sum(t.nbytes for t in fixed)) / model.n_params > target.bpw:
            budget -= 1  # float rounding: bpw must not exceed the target
    low = np.zeros(len(units), dtype=np.int64)  # every unit at its cheapest option
    if _cost(units, low) > budget:
        smallest = _assemble(model, units, low, imatrix)
        raise InputError(f"no config fits {target}: the smallest with these types is {smallest.size_bytes:,} bytes "
                         f"({smallest.bpw:.3f} bpw)", "raise the target, or allow lower types (--types)")  # fmt: skip
    pick, lam = _lagrange(units, budget)
    pick = _fill(units, pick, budget - _cost(units, pick))
    while (better := _exchange(units, pick, budget - _cost(units, pick))) is not None:
        pick = _fill(units, better, budget - _cost(units, better))
    dp = _frontier_dp(units, budget)
    if dp is not None and _error(units, dp) < _error(units, pick):
        pick = dp
    types_out = _assemble(model, units, pick, imatrix)
    config = config_from_types(model, types_out.types)
    check = resolve(model, config, imatrix=imatrix)
    if check != dict(types_out.types):  # the config must rebuild the allocation exactly
        bad = next(n for n in check if check[n] != types_out.types[n])
        raise AssertionError(f"the allocator's config gives {bad} {check[bad].name}, not {types_out.types[bad].name}")
    return Allocation(config, types_out.types, types_out.size_bytes, types_out.bpw, _error(units, pick), target,
                      table.weighted, lam)  # fmt: skip


def _lagrange(units: list[_Unit], budget: int) -> tuple[np.ndarray, float]:
    """The smallest λ (bisected in log space) whose choices fit ``budget``: every unit at argmin error + λ·bytes."""
    width = max(len(u.cost) for u in units)
    C = np.zeros((len(units), width))
    E = np.full((len(units), width), np.inf)  # a unit's missing options never win
    for k, u in enumerate(units):
        C[k, : len(u.cost)], E[k, : len(u.cost)] = u.cost, u.error
    rows = np.arange(len(units))

    def choose(lam: float) -> np.ndarray:
        return np.argmin(E + lam * C, axis=1)

    def cost(pick: np.ndarray) -> int:
        return int(C[rows, pick].sum())

    top = np.array([len(u.cost) - 1 for u in units])
    if cost(top) <= budget:
        return top, 0.0
    lo, hi = 1e-40, 1.0
    while cost(choose(hi)) > budget:
        lo, hi = hi, hi * 1e3
        if hi > 1e300:
            return np.zeros(len(units), dtype=np.int64), math.inf
    while cost(choose(lo)) <= budget and lo > 1e-300:
        lo /= 1e3
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        if mid <= lo or mid >= hi:
            break
        if cost(choose(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    return choose(hi), hi


@dataclass(frozen=True)
class _Assembled:
    types: dict[str, QuantType]
    size_bytes: int
    bpw: float


def _assemble(model: ModelInfo, units: list[_Unit], pick: np.ndarray, imatrix: Imatrix | None) -> _Assembled:
    types = {t.name: t.qtype for t in model.tensors}
    for u, i in zip(units, pick):
        types.update(zip(u.tensors, u.types[i]))
    rep = size_of(model, types, imatrix)
    return _Assembled(types, rep.size_bytes, rep.bpw)


def allocations_across(model: ModelInfo, table: ErrorTable, k: int, bpw_lo: float, bpw_hi: float,
                       types: Sequence[QuantType] | None = None, imatrix: Imatrix | None = None) -> list[Allocation]:  # fmt: skip
    """The allocator's configs at ``k`` bpw targets spread evenly over [bpw_lo, bpw_hi] (distinct configs only,
    ascending size): the free answers a learned search has to beat across a line."""
    out: dict[str, Allocation] = {}
    for b in np.linspace(bpw_lo, bpw_hi, k) if k > 1 else [bpw_hi]:
        try:
            a = allocate(model, table, Target(bpw=float(b)), types, imatrix)
        except InputError:
            continue  # below the smallest config with these types
        out.setdefault(a.config.key, a)
    return sorted(out.values(), key=lambda a: a.size_bytes)
