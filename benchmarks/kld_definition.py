"""What separates llama-perplexity's KLD from the exact KLD, measured on SmolLM2.

Prints, per config, on the same tokens:
  llama      mqpredict's (= llama-perplexity's) KLD: 16-bit base log-probs, entries with log p <= -16 dropped
  exact      full-vocabulary KL(base || quantized) from float32 logits, in float64
  cut only   exact, but without the entries llama-perplexity drops
and then the same config scored on a different token set of equal size (windows shifted by half a
window), which is what a replica with other windows/positions sees.

    python benchmarks/kld_definition.py [--chunks 16] [--configs Q8_0,Q4_K_M,Q2_K]
"""

from __future__ import annotations

import argparse

import numpy as np

from mqpredict.base.embedded import prepare_embedded
from mqpredict.llama.inprocess import Evaluator, InProcessEngine, LoadedModel
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.kld import score_rows, score_sparse
from mqpredict.measure.logprobs import compress
from mqpredict.quant.config import Config
from mqpredict.util.paths import DEFAULT_CORPUS


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


def _logits(path, spec, windows, threads):
    m = LoadedModel(path)
    try:
        ev = Evaluator(m, spec, threads)
        try:
            return [x.copy() for _, x in ev.run(windows)]
        finally:
            ev.close()
    finally:
        m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--configs", default="Q8_0,Q4_K_M,Q2_K")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    base = prepare_embedded("smollm2")
    spec = EvalSpec(ctx=512, n_chunks=a.chunks)
    eng = InProcessEngine(base, DEFAULT_CORPUS, spec, threads=a.threads)
    lp = eng.base_logprobs(spec)
    windows = lp.tokens[: a.chunks * spec.ctx].reshape(a.chunks, spec.ctx)
    from mqpredict.llama.inprocess import LoadedModel as _LM

    vocab = _LM(eng.model.path, vocab_only=True)
    all_tokens = vocab.tokenize(eng.corpus.text)
    vocab.close()
    shifted = all_tokens[spec.ctx // 2 : spec.ctx // 2 + a.chunks * spec.ctx].reshape(a.chunks, spec.ctx)

    base_logits = _logits(eng.model.path, spec, windows, eng.threads)
    base_shift = _logits(eng.model.path, spec, shifted, eng.threads)
    print(f"SmolLM2-135M ({eng.model.base_origin}), {a.chunks}×512, {spec.n_tokens} tokens scored")
    print(f"{'config':10} {'llama':>10} {'exact':>10} {'llama/exact':>12} {'cut only':>10} {'shifted windows':>16}")
    for c in a.configs.split(","):
        built = eng.build(Config.parse(c))
        q = _logits(built.path, spec, windows, eng.threads)
        llama, exact, cut = [], [], []
        for i, (b, x) in enumerate(zip(base_logits, q)):
            lb, lq = _log_softmax(b), _log_softmax(x)
            llama.append(score_sparse(x, lp.get(i), windows[i, spec.first + 1 :]).kld)
            exact.append((np.exp(lb) * (lb - lq)).sum(1))
            cut.append((np.exp(lb) * (lb - lq) * (lb > -16)).sum(1))
        qs = _logits(built.path, spec, shifted, eng.threads)
        sh = []
        for b, x, w in zip(base_shift, qs, shifted):
            rows, _ = compress(b)
            sh.append(score_rows(x, rows, w[spec.first + 1 :]).kld)
        L, E, C, S = (float(np.concatenate(v).mean()) for v in (llama, exact, cut, sh))
        print(f"{c:10} {L:10.6f} {E:10.6f} {100 * (L / E - 1):+11.2f}% {C:10.6f} {S:10.6f} ({100 * (S / L - 1):+.1f}%)")
    eng.close()


if __name__ == "__main__":
    main()
