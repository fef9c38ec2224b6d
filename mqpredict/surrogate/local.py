"""The model's own correction: a small ridge on the residuals of the configs measured on this model.

The boosters learn from every model in the records and weigh the model under search like any other, so its
first measurements barely move them (a leaf needs ``min_child_samples`` rows): on a model the records say
little about — one quantized with an importance matrix when the records hold none — the surrogate keeps its
systematic error through the whole campaign. :class:`LocalCorrection` removes what the model's own
residuals show: a shift, or a ridge on the features that vary between configs of one model (per-group
weight errors relative to Q8_0, bpw), with the strength chosen by leave-one-out on those residuals among
"no correction", "a shift" and a few ridge strengths — so it applies only what held-out residuals support.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mqpredict.surrogate import features as F

#: features that vary between configs of one model (the rest describe the model)
LOCAL_FEATURES: tuple[str, ...] = tuple(f for f in F.FEATURES if f.startswith("dlerr_")) + ("bpw", "dlwerr", "lerr_max")
ALPHAS = (100.0, 30.0, 10.0, 3.0, 1.0, 0.3)  # simplest first
GAIN = 0.95  # a more complex correction must cut the leave-one-out error by 5 % to be chosen
MIN_ROWS = 3  # own residuals needed before any correction


def ridge(A: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge on standardized columns with an unpenalized intercept: (coef with the intercept first, mu, sd)."""
    mu, sd = A.mean(0), A.std(0) + 1e-9
    Z = np.c_[np.ones(len(A)), (A - mu) / sd]
    reg = alpha * np.eye(Z.shape[1])
    reg[0, 0] = 0.0
    return np.linalg.solve(Z.T @ Z + reg, Z.T @ y), mu, sd


def ridge_predict(A: np.ndarray, coef: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return np.c_[np.ones(len(A)), (A - mu) / sd] @ coef


@dataclass(frozen=True)
class LocalCorrection:
    """``predict(X)``: the ln-KLD correction to add to the boosters' prediction on this model."""

    idx: tuple[int, ...]  # columns of X the ridge uses (none: a shift)
    mu: np.ndarray
    sd: np.ndarray
    coef: np.ndarray  # intercept first
    kind: str  # "shift" or "ridge(alpha)"
    loo_rmse: float  # its leave-one-out error on the residuals
    loo_rmse_none: float  # the same without any correction

    @classmethod
    def fit(cls, X: np.ndarray, r: np.ndarray) -> LocalCorrection | None:
        """The best of no correction, a shift and ridges on ``LOCAL_FEATURES`` by leave-one-out, simplest first
        (each step must cut the error by ``1 - GAIN``); None: no correction, also with fewer than ``MIN_ROWS``."""
        X, r = np.atleast_2d(X), np.asarray(r, dtype=float)
        n = len(r)
        if n < MIN_ROWS:
            return None
        cols = [F.FEATURES.index(f) for f in LOCAL_FEATURES]
        idx = tuple(c for c in cols if np.std(X[:, c]) > 1e-9)
        best = (float(np.sqrt(np.mean(r**2))), None)  # no correction
        none = best[0]
        for alpha in (None, *ALPHAS):  # None: a shift (intercept only)
            if alpha is not None and not idx:
                continue
            err = [r[i] - cls._solve(X[np.arange(n) != i], r[np.arange(n) != i], idx, alpha).predict(X[i : i + 1])[0]
                   for i in range(n)]  # fmt: skip
            rmse = float(np.sqrt(np.mean(np.square(err))))
            if rmse < GAIN * best[0]:
                best = (rmse, alpha if alpha is not None else "shift")
        if best[1] is None:
            return None
        alpha = None if best[1] == "shift" else best[1]
        fit = cls._solve(X, r, idx, alpha)
        return cls(fit.idx, fit.mu, fit.sd, fit.coef, fit.kind, best[0], none)

    @classmethod
    def _solve(cls, X: np.ndarray, r: np.ndarray, idx: tuple[int, ...], alpha: float | None) -> LocalCorrection:
        if alpha is None or not idx:
            return cls((), np.zeros(0), np.zeros(0), np.array([r.mean()]), "shift", float("nan"), float("nan"))
        coef, mu, sd = ridge(X[:, idx], r, alpha)
        return cls(idx, mu, sd, coef, f"ridge({alpha:g})", float("nan"), float("nan"))

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(X)
        if not self.idx:
            return np.full(len(X), float(self.coef[0]))
        return ridge_predict(X[:, self.idx], self.coef, self.mu, self.sd)
