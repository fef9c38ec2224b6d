"""KLD statistics as llama-perplexity reports them, from per-token scores.

Means carry llama-perplexity's uncertainty (``sqrt(var / (n-1))``, zero for ten tokens or fewer);
percentiles interpolate linearly between sorted values; same-top has its binomial error; the
ln(PPL(Q)/PPL(base)) error accounts for the covariance of the two NLLs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mqpredict.measure.kld import TokenScores

#: names of every statistic, in the order reports print them (also the JSON/CSV field names)
FIELDS = (
    "n_tokens", "kld_mean", "kld_mean_err", "kld_median", "kld_p90", "kld_p95", "kld_p99", "kld_p999",
    "kld_max", "same_top_p", "same_top_p_err", "dp_mean", "dp_mean_err", "dp_rms", "dp_rms_err",
    "ppl", "ppl_err", "ppl_base", "ppl_base_err", "ln_ppl_ratio", "ln_ppl_ratio_err",
)  # fmt: skip


def _mean_err(x: np.ndarray) -> tuple[float, float]:
    n = len(x)
    if n < 1:
        return 0.0, 0.0
    s, s2 = float(np.sum(x, dtype=np.float64)), float(np.sum(np.square(x, dtype=np.float64)))
    f = s / n
    var = s2 / n - f * f
    return f, math.sqrt(var / (n - 1)) if var > 0 and n > 10 else 0.0


def _percentile(sorted_x: np.ndarray, fraction: float) -> float:
    if fraction <= 0:
        return float(sorted_x[0])
    if fraction >= 1:
        return float(sorted_x[-1])
    p = fraction * (len(sorted_x) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_x[i] + p * sorted_x[min(i + 1, len(sorted_x) - 1)])


@dataclass(frozen=True)
class KLDStats:
    n_tokens: int
    kld_mean: float
    kld_mean_err: float
    kld_median: float
    kld_p90: float
    kld_p95: float
    kld_p99: float
    kld_p999: float
    kld_max: float
    same_top_p: float
    same_top_p_err: float
    dp_mean: float
    dp_mean_err: float
    dp_rms: float
    dp_rms_err: float
    ppl: float
    ppl_err: float
    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float
    ln_ppl_ratio_err: float

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_scores(cls, s: TokenScores) -> KLDStats:
        n = len(s.kld)
        if n == 0:
            raise ValueError("no tokens scored")
        kld_sorted = np.sort(s.kld)
        kld_mean, kld_err = _mean_err(s.kld)
        median = float(0.5 * (kld_sorted[n // 2] + kld_sorted[n // 2 - 1])) if n % 2 == 0 else float(kld_sorted[n // 2])
        nll_mean, nll_err = _mean_err(s.nll)
        base_mean, base_err = _mean_err(s.nll_base)
        cov = 0.0
        if n >= 10:
            prod = float(np.sum(s.nll.astype(np.float64) * s.nll_base.astype(np.float64)))
            cov = (prod / n - nll_mean * base_mean) / (n - 1)
        ratio_err = math.sqrt(max(nll_err**2 + base_err**2 - 2 * cov, 0.0))
        dp_mean, dp_err = _mean_err(s.p_diff)
        mse, mse_err = _mean_err(np.square(s.p_diff.astype(np.float64)))
        rms = math.sqrt(mse)
        same = float(np.mean(s.same_top))
        return cls(
            n_tokens=n,
            kld_mean=kld_mean,
            kld_mean_err=kld_err,
            kld_median=median,
            kld_p90=_percentile(kld_sorted, 0.90),
            kld_p95=_percentile(kld_sorted, 0.95),
            kld_p99=_percentile(kld_sorted, 0.99),
            kld_p999=_percentile(kld_sorted, 0.999),
            kld_max=float(kld_sorted[-1]),
            same_top_p=same,
            same_top_p_err=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
            dp_mean=dp_mean,
            dp_mean_err=dp_err,
            dp_rms=rms,
            dp_rms_err=0.5 / rms * mse_err if rms > 0 else 0.0,
            ppl=math.exp(nll_mean),
            ppl_err=math.exp(nll_mean) * nll_err,
            ppl_base=math.exp(base_mean),
            ppl_base_err=math.exp(base_mean) * base_err,
            ln_ppl_ratio=nll_mean - base_mean,
            ln_ppl_ratio_err=ratio_err,
        )
