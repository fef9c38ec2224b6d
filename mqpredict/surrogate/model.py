"""The surrogate: LightGBM boosters that predict how much a config's KLD differs from the Q8_0 reference.

scikit-learn conventions: parameters in ``__init__``, ``fit`` learns, fitted state ends in ``_``.

* One booster per target (``kld``, ``p99``, ``miss``; :mod:`mqpredict.surrogate.data`), trained with each
  model weighing the same. No monotone constraints: more bits do not always mean less KLD in
  combination, and bits do not order quality across type families.
* **Intervals** are conformal on leave-one-family-out residuals: for each family, boosters trained
  without it predict it (each held-out model weighing the same). Their width **varies by candidate**
  (normalized conformal): a small booster learns the log of the absolute held-out residual from the
  features (``scale``: large where the training data is sparse or the models disagree), and the
  half-width is ``q · scale(x)``, with ``q`` the weighted ``coverage`` quantile of ``|residual| / scale``
  where each family's scale comes from a scale booster fitted *without* that family's residuals. So the
  interval is honest on *new* models, and its coverage is what the CV table reports. ``halfwidth_`` keeps
  the constant (plain split-conformal) half-width of each target; the p99 and miss targets use it.
* **Zero-shot**: a ridge regression predicts the reference's ln KLD from the model (few models: kept
  simple); its interval is calibrated the same way, on the total (reference + delta) residuals.
* Predictions for models or configs outside the training range are flagged.

Persistence: ``<dir>/{kld,p99,miss}.txt`` and ``kld_scale.txt`` (LightGBM text format) + ``metadata.json``;
never pickle.
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator

from mqpredict import __version__
from mqpredict.errors import InputError
from mqpredict.surrogate import features as F
from mqpredict.surrogate.data import TARGETS, TrainingSet, model_weights
from mqpredict.surrogate.local import ridge, ridge_predict
from mqpredict.util.atomic import atomic_write_text

SURROGATE_VERSION = 2  # 2: expert slots split (moe_experts_up_gate/_down), active-parameter features (MoE), imatrix
#: the booster of ln |held-out residual| (small: it learns where the surrogate is unsure, not the KLD)
SCALE_PARAMS = {"num_leaves": 7, "min_data_in_leaf": 20, "learning_rate": 0.05, "rounds": 150}
_SCALE_FLOOR = 1e-3  # ln-KLD residuals below this count as this (a log of zero has no scale)
#: real models needed before the reference ridge leaves the synthetic ones out
MIN_REAL_MODELS = 2
REF_FEATURES = ("lwerr", "log_params", "vocab_share", "tied", "dithered", "log2_embd")
RANGE_FEATURES = ("log_params", "log2_embd", "n_layers", "vocab_share", "bpw", "dlwerr", "active_share")


def _synthetic(refs) -> np.ndarray:
    return refs["synthetic"].fillna(False).astype(bool).to_numpy()  # fmt: skip


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    c = np.cumsum(w) / w.sum()
    return float(v[min(np.searchsorted(c, q), len(v) - 1)])


@dataclass
class Prediction:
    mean: np.ndarray  # predicted delta (or absolute, zero-shot) in ln space
    lo: np.ndarray
    hi: np.ndarray


class Surrogate(BaseEstimator):
    def __init__(self, n_estimators: int = 400, learning_rate: float = 0.05, num_leaves: int = 15,
                 min_child_samples: int = 10, subsample: float = 0.8, colsample_bytree: float = 0.8,
                 coverage: float = 0.8, ridge_alpha: float = 1.0, seed: int = 0, n_jobs: int = 2) -> None:  # fmt: skip
        self.n_estimators = n_estimators
        self.learning_rate = learning_rate
        self.num_leaves = num_leaves
        self.min_child_samples = min_child_samples
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.coverage = coverage
        self.ridge_alpha = ridge_alpha
        self.seed = seed
        self.n_jobs = n_jobs

    # ------------------------------------------------------------------------------ fit
    def _params(self) -> dict:
        return {
            "objective": "regression", "learning_rate": self.learning_rate, "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_child_samples, "bagging_fraction": self.subsample, "bagging_freq": 1,
            "feature_fraction": self.colsample_bytree, "seed": self.seed, "deterministic": True,
            "num_threads": self.n_jobs, "verbosity": -1, "force_row_wise": True,
        }  # fmt: skip

    def _fit_boosters(self, X: np.ndarray, Y: np.ndarray, w: np.ndarray) -> list[lgb.Booster]:
        return [lgb.train(self._params(), lgb.Dataset(X, Y[:, j], weight=w, feature_name=list(F.FEATURES),
                                                      free_raw_data=False), num_boost_round=self.n_estimators)
                for j in range(len(TARGETS))]  # fmt: skip

    def _fit_ref(self, Xr: np.ndarray, y: np.ndarray, refs: pd.DataFrame | None = None
                 ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:  # fmt: skip
        """Ridge of the Q8_0 reference's ln KLD on model descriptors — on the real models' references alone when
        there are at least two models: a synthetic model's reference (random weights, tiny MoEs) says little about a
        real one's, and with them in the fit the descriptors extrapolate (held-out real families: MAE log10
        0.75). With fewer real models than the descriptors need (``len(REF_FEATURES) + 3``), the fit is their
        references' mean: two or three models fit any slope exactly (Gemma's held-out reference came out e^-26)."""
        real = None if refs is None else ~_synthetic(refs)
        if real is not None and refs["model_id"][real].nunique() >= MIN_REAL_MODELS:
            Xr, y = Xr[real], y[real]
            if refs["model_id"][real].nunique() < len(REF_FEATURES) + 3:
                k = len(REF_FEATURES)
                return np.r_[y.mean(), np.zeros(k)], 0.0, np.zeros(k), np.ones(k)
        idx = [F.FEATURES.index(f) for f in REF_FEATURES]
        coef, mu, sd = ridge(Xr[:, idx], y, self.ridge_alpha)
        return coef, 0.0, mu, sd

    @staticmethod
    def _ref_predict(Xr: np.ndarray, coef, mu, sd) -> np.ndarray:
        idx = [F.FEATURES.index(f) for f in REF_FEATURES]
        return ridge_predict(Xr[:, idx], coef, mu, sd)

    def fit(self, data: TrainingSet, calibration: Surrogate | None = None) -> Surrogate:
        """Fit the boosters; calibrate the intervals on leave-one-family-out residuals, or take the calibration
        of ``calibration`` (a surrogate fitted on nearly the same data: a campaign's refits keep its first
        calibration and recalibrate on their own measurements instead)."""
        if len(data.X) == 0:
            raise InputError("no training rows", "the records need Q8_0 references and weight-error tables")
        w = model_weights(data.rows["model_id"])
        self.local_ = None
        self.boosters_ = self._fit_boosters(data.X, data.Y, w)
        self.ref_coef_, _, self.ref_mu_, self.ref_sd_ = self._fit_ref(data.X_ref, data.refs["ln_kld_ref"].to_numpy(),
                                                                       data.refs)
        self.ranges_ = {f: (float(data.X[:, F.FEATURES.index(f)].min()), float(data.X[:, F.FEATURES.index(f)].max()))
                        for f in RANGE_FEATURES}  # fmt: skip
        self.train_models_ = sorted(set(zip(data.rows["model_id"], data.rows["family"], data.rows["model_name"])))
        self.train_families_ = sorted(data.rows["family"].unique())
        if calibration is None:
            self.calibrate(data)
        else:
            for a in ("halfwidth_", "halfwidth_zero_", "calibrated_", "scale_", "scale_q_"):
                setattr(self, a, getattr(calibration, a))
        return self

    def calibrate(self, data: TrainingSet) -> None:
        """Leave-one-family-out residuals → conformal half-widths (``halfwidth_``, ``halfwidth_zero_``)."""
        fams = data.families
        if len(fams) < 2:
            res = data.Y - self._predict_raw(data.X)
            self.halfwidth_ = [float(np.quantile(np.abs(res[:, j]), self.coverage)) for j in range(len(TARGETS))]
            self.halfwidth_zero_ = float("nan")
            self.scale_, self.scale_q_ = None, float("nan")
            self.calibrated_ = False
            return
        res, wts, zres, zw, xs, fam_of = [], [], [], [], [], []
        for fam in fams:
            tr, te = (data.rows["family"] != fam).to_numpy(), (data.rows["family"] == fam).to_numpy()
            rtr, rte = (data.refs["family"] != fam).to_numpy(), (data.refs["family"] == fam).to_numpy()
            if not te.any() or not tr.any():
                continue
            bs = self._fit_boosters(data.X[tr], data.Y[tr], model_weights(data.rows["model_id"][tr]))
            pred = np.column_stack([b.predict(data.X[te]) for b in bs])
            res.append(np.abs(data.Y[te] - pred))
            wts.append(model_weights(data.rows["model_id"][te]))
            xs.append(data.X[te])
            fam_of.append(np.full(int(te.sum()), fam, dtype=object))
            if rtr.sum() >= 2 and rte.any():
                coef, _, mu, sd = self._fit_ref(data.X_ref[rtr], data.refs["ln_kld_ref"].to_numpy()[rtr],
                                                data.refs[rtr].reset_index(drop=True))
                ref_hat = dict(zip(data.refs["model_id"][rte], self._ref_predict(data.X_ref[rte], coef, mu, sd)))
                rows = data.rows[te]
                ref_true = np.log(rows["ref_kld"].to_numpy())
                ref_pred = rows["model_id"].map(ref_hat).to_numpy(dtype=float)
                zres.append(np.abs((ref_true + data.Y[te][:, 0]) - (ref_pred + pred[:, 0])))
                zw.append(model_weights(rows["model_id"]))
        R, W = np.vstack(res), np.concatenate(wts)
        self.halfwidth_ = [_weighted_quantile(R[:, j], W, self.coverage) for j in range(len(TARGETS))]
        self._calibrate_scale(np.vstack(xs), R[:, 0], W, np.concatenate(fam_of))
        self.halfwidth_zero_ = _weighted_quantile(np.concatenate(zres), np.concatenate(zw), self.coverage) if zres else float("nan")
        self.calibrated_ = True

    def _fit_scale(self, X: np.ndarray, r: np.ndarray, w: np.ndarray) -> lgb.Booster:
        p = {**self._params(), "num_leaves": SCALE_PARAMS["num_leaves"], "min_data_in_leaf": SCALE_PARAMS["min_data_in_leaf"],
             "learning_rate": SCALE_PARAMS["learning_rate"]}  # fmt: skip
        y = np.log(np.maximum(r, _SCALE_FLOOR))
        return lgb.train(p, lgb.Dataset(X, y, weight=w, feature_name=list(F.FEATURES), free_raw_data=False),
                         num_boost_round=SCALE_PARAMS["rounds"])  # fmt: skip

    def _calibrate_scale(self, X: np.ndarray, r: np.ndarray, w: np.ndarray, fam: np.ndarray) -> None:
        """Normalized conformal for the kld target (module docstring): ``scale_`` and ``scale_q_``."""
        fams = sorted(set(fam))
        if len(fams) < 3:  # too few families to learn where residuals are large: constant width
            self.scale_, self.scale_q_ = None, float("nan")
            return
        score = np.empty(len(r))
        for f in fams:
            te = fam == f
            g = self._fit_scale(X[~te], r[~te], w[~te])
            score[te] = r[te] / np.exp(g.predict(X[te]))
        self.scale_q_ = _weighted_quantile(score, w, self.coverage)
        self.scale_ = self._fit_scale(X, r, w)

    def kld_halfwidth(self, X: np.ndarray) -> np.ndarray:
        """The calibrated half-width of each row's ln-KLD interval (per candidate when a scale was learnt)."""
        X = np.atleast_2d(X)
        if getattr(self, "scale_", None) is None:
            return np.full(len(X), float(self.halfwidth_[0]))
        return self.scale_q_ * np.exp(self.scale_.predict(X))

    # -------------------------------------------------------------------------- predict
    def _predict_raw(self, X: np.ndarray) -> np.ndarray:
        raw = np.column_stack([b.predict(X) for b in self.boosters_])
        if getattr(self, "local_", None) is not None:
            raw[:, TARGETS.index("kld")] += self.local_.predict(X)
        return raw

    def correct_locally(self, X_own: np.ndarray, Y_own: np.ndarray) -> Surrogate:
        """Fit ``local_`` (:mod:`mqpredict.surrogate.local`) on the residuals of the model's own measured rows:
        what a campaign's refit learns from its model beyond what the boosters take from it. Only for
        predictions on that model; not saved."""
        from mqpredict.surrogate.local import LocalCorrection

        j = TARGETS.index("kld")
        self.local_ = None
        if len(X_own):
            self.local_ = LocalCorrection.fit(X_own, Y_own[:, j] - self.boosters_[j].predict(X_own))
        return self

    def predict(self, X: np.ndarray) -> dict[str, Prediction]:
        """Deltas to the reference, in ln space, with the calibrated ``coverage`` interval."""
        X = np.atleast_2d(X)
        raw = self._predict_raw(X)
        hw = [self.kld_halfwidth(X) if t == "kld" else np.full(len(X), self.halfwidth_[j]) for j, t in enumerate(TARGETS)]
        return {t: Prediction(raw[:, j], raw[:, j] - hw[j], raw[:, j] + hw[j]) for j, t in enumerate(TARGETS)}

    def predict_kld(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The ln-KLD delta and its calibrated half-width, as ``predict(X)["kld"]`` has them, without the other
        targets' boosters: what a search scores a pool of thousands with, at a fraction of the cost."""
        X = np.atleast_2d(X)
        mean = self.boosters_[TARGETS.index("kld")].predict(X)
        if getattr(self, "local_", None) is not None:
            mean = mean + self.local_.predict(X)
        return mean, self.kld_halfwidth(X)

    def predict_reference(self, X_ref: np.ndarray) -> np.ndarray:
        """Zero-shot: the reference's ln KLD, from the model alone."""
        return self._ref_predict(np.atleast_2d(X_ref), self.ref_coef_, self.ref_mu_, self.ref_sd_)

    def out_of_range(self, X: np.ndarray) -> list[list[str]]:
        """Per row, the range features outside what the surrogate was trained on (±10 % of the span)."""
        out = []
        for x in np.atleast_2d(X):
            bad = []
            for f, (lo, hi) in self.ranges_.items():
                v, pad = x[F.FEATURES.index(f)], 0.1 * (hi - lo)
                if v < lo - pad or v > hi + pad:
                    bad.append(f"{f}={v:.3g} outside [{lo:.3g}, {hi:.3g}]")
            out.append(bad)
        return out

    # -------------------------------------------------------------------------- persist
    def save(self, folder: str | os.PathLike, extra: dict | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for t, b in zip(TARGETS, self.boosters_):
            atomic_write_text(folder / f"{t}.txt", b.model_to_string())
        scale = getattr(self, "scale_", None)
        if scale is not None:
            atomic_write_text(folder / "kld_scale.txt", scale.model_to_string())
        else:
            (folder / "kld_scale.txt").unlink(missing_ok=True)
        meta = {
            "schema_version": SURROGATE_VERSION,
            "params": self.get_params(),
            "features": list(F.FEATURES),
            "feature_docs": F.FEATURE_DOCS,
            "targets": list(TARGETS),
            "halfwidth": self.halfwidth_,
            "halfwidth_zero": None if math.isnan(self.halfwidth_zero_) else self.halfwidth_zero_,
            "kld_scale_q": None if scale is None else self.scale_q_,
            "calibrated": self.calibrated_,
            "coverage": self.coverage,
            "reference_model": {"features": list(REF_FEATURES), "coef": self.ref_coef_.tolist(),
                                "mu": self.ref_mu_.tolist(), "sd": self.ref_sd_.tolist()},  # fmt: skip
            "ranges": self.ranges_,
            "train_models": [{"model_id": m, "family": f, "model_name": n} for m, f, n in self.train_models_],
            "train_families": self.train_families_,
            "versions": {"mqpredict": __version__, "lightgbm": lgb.__version__, "numpy": np.__version__,
                         "python": platform.python_version()},  # fmt: skip
            **(extra or {}),
        }
        atomic_write_text(folder / "metadata.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> tuple[Surrogate, dict]:
        folder = Path(folder)
        try:
            meta = json.loads((folder / "metadata.json").read_text())
        except (OSError, ValueError) as e:
            raise InputError(f"{folder} is not a surrogate folder ({e})", "train one with `mqpredict train --out DIR`") from None
        if meta.get("schema_version") != SURROGATE_VERSION or meta.get("features") != list(F.FEATURES):
            had = meta.get("features") or []
            new = [f for f in F.FEATURES if f not in had]
            gone = [f for f in had if f not in F.FEATURES]
            diff = "; ".join(x for x in (f"{len(new)} new (e.g. {', '.join(new[:3])})" if new else "",
                                         f"{len(gone)} gone (e.g. {', '.join(gone[:3])})" if gone else "") if x)  # fmt: skip
            raise InputError(
                f"{folder} was trained with another feature set (surrogate schema {meta.get('schema_version')}, "
                f"this mqpredict uses {SURROGATE_VERSION}{': ' + diff if diff else ', features reordered'})",
                f"retrain it on the shipped dataset: `mqpredict train --cv --out {folder}` (about 20 s)",
            )
        if meta["versions"]["lightgbm"].split(".")[0] != lgb.__version__.split(".")[0]:
            raise InputError(f"{folder} was written by LightGBM {meta['versions']['lightgbm']}, this is {lgb.__version__}",
                             "retrain it with `mqpredict train`")  # fmt: skip
        s = cls(**meta["params"])
        s.boosters_ = [lgb.Booster(model_file=str(folder / f"{t}.txt")) for t in TARGETS]
        s.halfwidth_ = meta["halfwidth"]
        hz = meta.get("halfwidth_zero")
        s.halfwidth_zero_ = float("nan") if hz is None else hz
        s.calibrated_ = meta["calibrated"]
        q = meta.get("kld_scale_q")
        s.scale_ = lgb.Booster(model_file=str(folder / "kld_scale.txt")) if q is not None else None
        s.scale_q_ = float("nan") if q is None else q
        rm = meta["reference_model"]
        s.ref_coef_, s.ref_mu_, s.ref_sd_ = (np.array(rm[k]) for k in ("coef", "mu", "sd"))
        s.ranges_ = {k: tuple(v) for k, v in meta["ranges"].items()}
        s.train_models_ = [(m["model_id"], m["family"], m["model_name"]) for m in meta["train_models"]]
        s.train_families_ = meta["train_families"]
        return s, meta
