"""The record: one measurement as a row, with provenance and status (schema version 2).

One record per (base model, corpus, ctx and batch layout, token slice, scoring mode, file written,
llama.cpp build, imatrix): :func:`record_key` hashes exactly those. Columns are documented in ``datasets/README.md``
(generated from :data:`COLUMNS`); CSV is the human-diffable form. Values parse strictly: a row that
does not fit is rejected with its row number and the reasons, never half-read.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import StrEnum

from mqpredict.errors import InputError
from mqpredict.measure.corpus import Scoring
from mqpredict.measure.stats import FIELDS as STAT_FIELDS
from mqpredict.quant.config import Config
from mqpredict.quant.types import parse_type

SCHEMA_VERSION = 2
#: versions this mqpredict reads (older rows are upgraded on read, see :func:`upgrade_row`)
READABLE_VERSIONS = (1, 2)


class Status(StrEnum):
    ok = "ok"
    partial = "partial"  # stopped early (e.g. by a staged confirmation): fewer tokens than intended
    failed = "failed"  # status_reason says why; statistics are empty


class Source(StrEnum):
    preset = "preset"  # a llama.cpp preset
    recipe = "recipe"  # a published per-tensor recipe (datasets/recipes)
    community = "community"  # imported from someone else's measurements or GGUF
    proposed = "proposed"  # proposed by mqpredict's search and confirmed
    probe = "probe"  # an isolation probe (one group changed on a carrier)
    hybrid = "hybrid"  # a hybrid measured for the dataset (sampled, not proposed)
    allocator = "allocator"  # the zero-run allocator's answer at a size (mqpredict allocate; a campaign's warm start)


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # str | int | float | bool | json
    doc: str
    required: bool = True  # must be non-empty in a full record


_STAT_DOCS = {
    "n_tokens": "tokens scored",
    "kld_mean": "mean KLD(base ‖ quantized) per token (llama-perplexity's definition)",
    "kld_mean_err": "its standard error",
}

COLUMNS: tuple[Column, ...] = (
    Column("schema_version", "int", "record schema version (2)"),
    Column("key", "str", "record key: hash of model_id, corpus, ctx, n_batch, slice, scoring, types_key, build, "
           "imatrix_id"),
    Column("model_id", "str", "hash of the base's tensor data + name + architecture"),
    Column("model_name", "str", "general.name of the base"),
    Column("family", "str", "the original model this base comes from (variants/truncations/restores share it)"),
    Column("synthetic", "bool", "true for generated test models"),
    Column("architecture", "str", "general.architecture"),
    Column("n_params", "int", "parameters (all tensors)"),
    Column("n_layers", "int", "blocks"),
    Column("n_embd", "int", "hidden size"),
    Column("n_ff", "int", "feed-forward size (largest, if per layer)"),
    Column("n_head", "int", "attention heads"),
    Column("n_head_kv", "int", "key/value heads"),
    Column("n_expert", "int", "experts (0: dense)"),
    Column("n_vocab", "int", "vocabulary size"),
    Column("tied_embeddings", "bool", "no output.weight: token_embd is also the output projection"),
    Column("base_origin", "str", "native, or how mqpredict restored the base (e.g. dither:Q4_1+Q8_0)"),
    Column("config", "str", "the config as asked for (canonical key; presets as preset=NAME)"),
    Column("effective_config", "str", "canonical pure config that rebuilds exactly the types written, header-only"),
    Column("types_key", "str", "hash of the per-tensor types written (same key = same file)"),
    Column("fractions", "json", "group → {type: fraction of the group's parameters}"),
    Column("size_bytes", "int", "exact file size"),
    Column("bpw", "float", "tensor bytes × 8 / parameters"),
    *(Column(f, "int" if f == "n_tokens" else "float", _STAT_DOCS.get(f, f"llama-perplexity statistic {f}"), False)
      for f in STAT_FIELDS),  # fmt: skip
    Column("per_token_path", "str", "per-token KLD vector (float32 .npy), relative to the store", False),
    Column("corpus", "str", "corpus id (name-sha256 prefix)"),
    Column("ctx", "int", "context window"),
    Column("n_batch", "int", "tokens per decode (ctx: one window per batch)"),
    Column("chunk_offset", "int", "first window scored"),
    Column("n_chunks", "int", "windows scored"),
    Column("scoring", "str", "windows (llama-perplexity's independent windows) | stream (one KV-cache stream)"),
    Column("imatrix_id", "str", "importance matrix used to quantize (empty: none)", False),
    Column("imatrix_corpus", "str", "its calibration corpus (never the evaluation corpus)", False),
    Column("engine", "str", "inprocess | tools | an imported tool name"),
    Column("kld_source", "str", "what the statistics were computed from", False),
    Column("llama_version", "str", "llama.cpp / llama-cpp-python version"),
    Column("llama_commit", "str", "llama.cpp commit", False),
    Column("build", "str", "build fingerprint (version + CPU features)"),
    Column("source", "str", "preset | recipe | community | proposed | probe | hybrid"),
    Column("provenance_file", "str", "where the config came from (recipe file, GGUF, imported table)", False),
    Column("provenance_url", "str", "its public URL", False),
    Column("provenance_author", "str", "its author", False),
    Column("status", "str", "ok | partial | failed"),
    Column("status_reason", "str", "why failed/partial", False),
    Column("timestamp", "str", "UTC ISO-8601 time the record was made"),
    Column("mlflow_run_id", "str", "MLflow run of this measurement, when tracked", False),
)
COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
_BY_NAME = {c.name: c for c in COLUMNS}

#: fields that may differ between two copies of the same measurement without a conflict
VOLATILE = frozenset({"timestamp", "mlflow_run_id", "per_token_path", "provenance_file", "provenance_url",
                      "provenance_author", "kld_source"})  # fmt: skip


@dataclass(frozen=True)
class Record:
    """A measurement row. ``values`` holds every column (parsed types; None for empty)."""

    values: dict = field(hash=False)

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def key(self) -> str:
        return self.values["key"]

    def measured(self) -> dict:
        """The values that must agree between two records with the same key."""
        return {k: v for k, v in self.values.items() if k not in VOLATILE}

    def to_row(self) -> dict[str, str]:
        return {c.name: format_value(c, self.values.get(c.name)) for c in COLUMNS}

    def replace(self, **changes) -> Record:
        return Record({**self.values, **changes})


def record_key(model_id: str, corpus: str, ctx: int, n_batch: int, chunk_offset: int, n_chunks: int,
               types_key: str, build: str, imatrix_id: str | None, scoring: str = Scoring.windows) -> str:  # fmt: skip
    text = f"{model_id}|{corpus}|{ctx}|{n_batch}|{chunk_offset}|{n_chunks}|{types_key}|{build}|{imatrix_id or ''}"
    if scoring != Scoring.windows:  # windows records keep the keys they had before the scoring mode existed
        text += f"|{scoring}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def upgrade_row(row: dict[str, str]) -> dict[str, str]:
    """A row of an older schema version in today's form (version 1 had no ``scoring``: all were windows)."""
    version = (row.get("schema_version") or "").strip()
    if version in ("1", "1.0"):
        row = {**row, "schema_version": str(SCHEMA_VERSION), "scoring": row.get("scoring") or Scoring.windows.value}
    return row


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------- text forms
def format_value(col: Column, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if col.kind == "bool":
        return "true" if v else "false"
    if col.kind == "float":
        return repr(float(v))  # round-trips exactly
    if col.kind == "json":
        return json.dumps(v, sort_keys=True, separators=(",", ":"))
    return str(v)


class RowError(ValueError):
    """One row's problems: ``reasons`` name the columns."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


def parse_value(col: Column, text: str | None):
    text = (text or "").strip()
    if text == "":
        return None
    if col.kind == "int":
        f = float(text)
        if not f.is_integer():
            raise ValueError(f"{col.name}={text!r} is not a whole number")
        return int(f)
    if col.kind == "float":
        v = float(text)  # ValueError names nothing: wrapped by the caller
        if math.isinf(v):
            raise ValueError(f"{col.name}={text!r} is infinite")
        return v
    if col.kind == "bool":
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"{col.name}={text!r} is not true/false")
    if col.kind == "json":
        return json.loads(text)
    return text


def check(values: dict) -> list[str]:
    """Semantic checks of a parsed record; returns the reasons it is invalid (empty: valid)."""
    bad = []
    status = values.get("status")
    if status not in Status.__members__:
        bad.append(f"status={status!r} is not one of ok, partial, failed")
    if values.get("source") not in Source.__members__:
        bad.append(f"source={values.get('source')!r} is not one of {', '.join(Source.__members__)}")
    if values.get("schema_version") not in (None, SCHEMA_VERSION):
        bad.append(f"schema_version={values.get('schema_version')} (this mqpredict reads up to {SCHEMA_VERSION})")
    if values.get("scoring") is not None and values["scoring"] not in Scoring.__members__:
        bad.append(f"scoring={values['scoring']!r} is not one of {', '.join(Scoring.__members__)}")
    for c in COLUMNS:
        if c.required and values.get(c.name) is None:
            bad.append(f"{c.name} is empty")
    for name in ("size_bytes", "n_params", "ctx", "n_chunks", "n_tokens"):
        v = values.get(name)
        if v is not None and v <= 0:
            bad.append(f"{name}={v} must be positive")
    if values.get("chunk_offset") is not None and values["chunk_offset"] < 0:
        bad.append("chunk_offset is negative")
    if status in ("ok", "partial"):
        if values.get("kld_mean") is None and values.get("ppl") is None:
            bad.append("neither kld_mean nor ppl is given")
        for f in STAT_FIELDS:
            v = values.get(f)
            if isinstance(v, float) and v < 0 and f not in ("dp_mean", "ln_ppl_ratio"):
                bad.append(f"{f}={v} is negative")
    if status == "failed" and not values.get("status_reason"):
        bad.append("a failed record needs status_reason")
    for name in ("config", "effective_config"):
        text = values.get(name)
        if text:
            try:
                Config.parse(text)
            except InputError as e:
                bad.append(f"{name}: {e.message}")
    fr = values.get("fractions")
    if fr is not None:
        try:
            for g, mix in fr.items():
                for t, share in mix.items():
                    parse_type(t, where=f"in fractions[{g}]")
                    if not 0 <= float(share) <= 1:
                        raise ValueError(f"fractions[{g}][{t}]={share} is not in [0, 1]")
        except (AttributeError, TypeError, ValueError) as e:
            bad.append(f"fractions: {e}")
        except InputError as e:
            bad.append(e.message)
    return bad


def parse_row(row: dict[str, str]) -> Record:
    """A full record from its text form (older schema versions upgraded); raises RowError naming every bad column."""
    row = upgrade_row(row)
    values, bad = {}, []
    unknown = [k for k in row if k not in _BY_NAME and k is not None]
    if unknown:
        bad.append(f"unknown column(s): {', '.join(unknown)}")
    failed = set()
    for c in COLUMNS:
        try:
            values[c.name] = parse_value(c, row.get(c.name))
        except (ValueError, json.JSONDecodeError) as e:
            msg = str(e)
            bad.append(msg if c.name in msg else f"{c.name}={row.get(c.name)!r}: {msg}")
            failed.add(c.name)
    bad += [r for r in check(values) if r not in {f"{n} is empty" for n in failed}]  # every problem at once
    if bad:
        raise RowError(bad)
    return Record(values)


def make(**values) -> Record:
    """A record from keyword values (every column must be named; None for empty)."""
    missing = [c for c in COLUMN_NAMES if c not in values]
    extra = [k for k in values if k not in _BY_NAME]
    if missing or extra:
        raise ValueError(f"record columns missing {missing} / unknown {extra}")
    bad = check(values)
    if bad:
        raise RowError(bad)
    return Record(dict(values))

