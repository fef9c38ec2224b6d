"""Shared fixtures: tiny generated GGUFs (256-wide and SmolLM2-like 576-wide), the bundled corpus,
an isolated cache per test session, and both engines for the shared engine suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "datasets" / "corpus" / "corpus.txt"
MQ = [sys.executable, "-m", "mqpredict.cli.main"]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """Every test session gets its own cache (pure quantizations, log-probs, prepared bases)."""
    d = tmp_path_factory.mktemp("cache")
    old = os.environ.get("MQPREDICT_CACHE")
    os.environ["MQPREDICT_CACHE"] = str(d)
    os.environ["MQPREDICT_NO_PROGRESS"] = "1"
    # tests never write into the project's own MLflow store
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{d / 'mlflow.db'}"
    yield d
    if old is None:
        os.environ.pop("MQPREDICT_CACHE", None)
    else:
        os.environ["MQPREDICT_CACHE"] = old


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny(models_dir) -> Path:
    """4 layers, n_embd 256, n_ff 768, vocab 512, untied: every K-quant fits."""
    from mqpredict.base.testmodel import write_test_model

    return write_test_model(models_dir / "tiny.gguf", seed=0)


@pytest.fixture(scope="session")
def tiny576(models_dir) -> Path:
    """SmolLM2's widths (576/1536), tied embeddings: only ffn_down can hold K-quants."""
    from mqpredict.base.testmodel import TinyShape, write_test_model

    return write_test_model(models_dir / "tiny576.gguf", seed=1, shape=TinyShape(n_embd=576, n_ff=1536, tied=True))


@pytest.fixture(scope="session", params=["tiny", "tiny576"])
def any_tiny(request) -> Path:
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def corpus() -> Path:
    return CORPUS


@pytest.fixture(scope="session")
def spec():
    """Small but above llama-perplexity's 100-token minimum: 4 windows of 128 → 252 scored tokens."""
    from mqpredict.measure.corpus import EvalSpec

    return EvalSpec(ctx=128, n_chunks=4)


def _engine(kind: str, base: Path, corpus: Path, spec):
    if kind == "inprocess":
        from mqpredict.llama.inprocess import InProcessEngine

        return InProcessEngine(base, corpus, spec, threads=2)
    from mqpredict.llama.tools import ToolsEngine

    return ToolsEngine(base, corpus, spec, threads=2)


@pytest.fixture(scope="session")
def make_engine():
    """make_engine(kind, base, corpus, spec) → a new engine (the caller closes it)."""
    return _engine


@pytest.fixture(scope="session", params=["inprocess", "tools"])
def engine_kind(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def engines(tiny, tiny576, corpus, spec):
    """Both engines on both tiny models, created once: {(kind, name): engine}."""
    made = {}
    for kind in ("inprocess", "tools"):
        for name, base in (("tiny", tiny), ("tiny576", tiny576)):
            made[kind, name] = _engine(kind, base, corpus, spec)
    yield made
    for e in made.values():
        e.close()


def mq(*args, check: bool | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess (what a user runs)."""
    p = subprocess.run([*MQ, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=os.environ)
    if check and p.returncode != 0:
        raise AssertionError(f"mqpredict {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stderr}")
    return p
