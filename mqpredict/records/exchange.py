"""Sharing records: export, and import of records, community tables and llama-perplexity output.

Every import reads and validates the whole input first; if any row is malformed the file is rejected
with each bad row's number and reasons, and nothing is written. Nothing in an input is ever executed
(CSV cells are data; no formulas, no pickles).

Formats (documented in datasets/README.md):

* **records** — the store's own columns (what ``data export`` writes): a round trip loses nothing.
* **community table** — one measurement per row, measured by someone else on a base you also have:
  ``model, config, size_bytes, corpus, ctx, tool, tool_version`` and ``kld_mean`` and/or ``ppl``, plus
  any statistic columns of ``measure --json`` and optional ``chunk_offset, n_chunks, n_tokens, n_batch,
  scoring`` (``windows``, llama-perplexity's, when absent; or ``stream``) ``, imatrix_id, imatrix_corpus,
  provenance_url, provenance_author``. Imported against that base
  (``--base``): each config is resolved on it, its exact size must match ``size_bytes``. The imatrix
  fields must agree (:func:`imatrix_problems`): an ``imatrix_id`` is the imatrix file's sha256 (its
  first 16 hex digits, as mqpredict names it, or all 64), ``imatrix_corpus`` needs one, and is never the
  evaluation ``corpus``.
* **llama-perplexity output** — the text a ``llama-perplexity --kl-divergence`` run printed, with the
  base and the quantized GGUF it ran on (``--base``, ``--gguf``) and the corpus (``--corpus``).
"""

from __future__ import annotations

import csv
import io
import math
import re
from pathlib import Path

from mqpredict.errors import InputError
from mqpredict.measure.corpus import Corpus, EvalSpec
from mqpredict.measure.stats import FIELDS as STAT_FIELDS
from mqpredict.quant.config import Config
from mqpredict.quant.derive import config_from_types, type_fractions
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import resolve, types_key
from mqpredict.quant.size import size_of
from mqpredict.records.identity import identify
from mqpredict.records.schema import (
    COLUMN_NAMES, SCHEMA_VERSION, Record, RowError, Source, Status, make, now, parse_row, record_key,
)  # fmt: skip
from mqpredict.records.store import Store
from mqpredict.util.atomic import atomic_open

COMMUNITY_REQUIRED = ("model", "config", "size_bytes", "corpus", "ctx", "tool", "tool_version")
_MAX_SHOWN = 20
_IMATRIX_ID = re.compile(r"[0-9a-f]{16}(?:[0-9a-f]{48})?")  # sha256 of the imatrix file: mqpredict's 16-digit prefix, or all of it


class ImportRejected(InputError):
    """An input with malformed rows: nothing was written."""


def export_csv(store: Store, out: str | Path) -> int:
    recs = store.records()
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(COLUMN_NAMES), lineterminator="\n")
    w.writeheader()
    w.writerows(r.to_row() for r in recs)
    with atomic_open(out, fsync=True) as f:
        f.write(text.getvalue().encode("utf-8"))
    return len(recs)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = []
            for row in reader:
                if None in row or any(v is None for v in row.values()):
                    raise ImportRejected(f"{path} row {reader.line_num}: wrong number of fields", "fix the row")
                rows.append(row)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"{path}: cannot read it as CSV ({e})") from None
    if not header:
        raise ImportRejected(f"{path} is empty or has no header row")
    return header, rows


def imatrix_problems(imatrix_id: str | None, imatrix_corpus: str | None, corpus: str | None) -> list[str]:
    """Why a row's imatrix fields cannot describe a real measurement (empty: they can)."""
    out = []
    iid, calib = (imatrix_id or "").strip(), (imatrix_corpus or "").strip()
    if calib and not iid:
        out.append(f"imatrix_corpus={calib!r} without an imatrix_id: give the importance matrix's id (the sha256 of "
                   "the file; `mqpredict imatrix` prints its first 16 hex digits) or leave both empty")  # fmt: skip
    if iid and not _IMATRIX_ID.fullmatch(iid.lower()):
        out.append(f"imatrix_id={iid!r} is not a hex hash (the imatrix file's sha256: 16 or 64 hex digits)")
    if calib and calib == (corpus or "").strip():
        out.append(f"imatrix_corpus={calib!r} is the evaluation corpus itself: an imatrix calibrated on the text it "
                   "is scored on flatters its KLD; measure with one calibrated on other text")  # fmt: skip
    return out


def _reject(path: Path, errors: list[tuple[int, list[str]]]) -> ImportRejected:
    shown = "; ".join(f"row {n}: {', '.join(reasons[:3])}" for n, reasons in errors[:_MAX_SHOWN])
    more = f" (and {len(errors) - _MAX_SHOWN} more rows)" if len(errors) > _MAX_SHOWN else ""
    return ImportRejected(f"{path}: {len(errors)} malformed row(s), nothing imported — {shown}{more}",
                          "fix those rows (row numbers count the header as row 1) and import again")  # fmt: skip


def import_csv(path: str | Path, store: Store, base: str | Path | None = None) -> tuple[list[Record], str]:
    """Parse and validate ``path`` completely (records or community format), then append all or nothing.

    Returns the parsed records and which format it was.
    """
    path = Path(path)
    header, rows = _read_csv(path)
    if "key" in header and "model_id" in header:
        fmt, records = "records", _parse_records(path, header, rows)
    else:
        fmt, records = "community", _parse_community(path, header, rows, base)
    store.append(records)
    return records, fmt


def _parse_records(path: Path, header: list[str], rows: list[dict]) -> list[Record]:
    missing = [c for c in COLUMN_NAMES if c not in header and c != "scoring"]  # schema-1 rows have none (upgraded)
    if missing:
        raise ImportRejected(f"{path}: missing column(s) {', '.join(missing)}", "export it with `mqpredict data export`")
    out, errors = [], []
    for n, row in enumerate(rows, start=2):
        try:
            r = parse_row(row)
        except RowError as e:
            errors.append((n, e.reasons))
            continue
        bad = imatrix_problems(r["imatrix_id"], r["imatrix_corpus"], r["corpus"])
        if bad:
            errors.append((n, bad))
            continue
        if r["per_token_path"]:  # vectors do not travel inside a CSV
            r = r.replace(per_token_path=None)
        out.append(r)
    if errors:
        raise _reject(path, errors)
    return _no_inner_conflicts(path, out)


def _no_inner_conflicts(path: Path, records: list[Record]) -> list[Record]:
    seen: dict[str, tuple[int, Record]] = {}
    errors = []
    for n, r in enumerate(records, start=2):
        if r.key in seen and seen[r.key][1].measured() != r.measured():
            errors.append((n, [f"same key as row {seen[r.key][0]} ({r['config']}) with other values"]))
        seen.setdefault(r.key, (n, r))
    if errors:
        raise _reject(path, errors)
    return records


def _number(row: dict, name: str, kind=float):
    text = (row.get(name) or "").strip()
    if not text:
        return None
    v = float(text)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name}={text!r} is not a number")
    if kind is int:
        if not v.is_integer():
            raise ValueError(f"{name}={text!r} is not a whole number")
        return int(v)
    return v


def _parse_community(path: Path, header: list[str], rows: list[dict], base: str | Path | None) -> list[Record]:
    missing = [c for c in COMMUNITY_REQUIRED if c not in header]
    if missing:
        raise ImportRejected(f"{path}: missing column(s) {', '.join(missing)}",
                             f"a community table needs {', '.join(COMMUNITY_REQUIRED)} and kld_mean or ppl")  # fmt: skip
    if base is None:
        raise InputError(f"{path} is a community table", "import it against the base it was measured on: --base BASE.gguf")
    model = ModelInfo.load(base)
    ident = identify(model)
    unknown = [c for c in header if c not in COLUMN_NAMES and c not in COMMUNITY_REQUIRED + ("notes",)]
    out, errors = [], []
    for n, row in enumerate(rows, start=2):
        reasons = [f"unknown column {c}" for c in unknown] if n == 2 else []
        try:
            cfg = Config.parse(row["config"])
            types = resolve(model, cfg) if not cfg.is_preset else None
            if types is None:
                from mqpredict.llama.quantize import dry_run_types

                types = resolve(model, cfg, dry_run_types)
            size = size_of(model, types)
            vals = {f: _number(row, f, int if f == "n_tokens" else float) for f in STAT_FIELDS if f in header}
            given = _number(row, "size_bytes", int)
            if given is None or given <= 0:
                reasons.append(f"size_bytes={row.get('size_bytes')!r} must be a positive whole number")
            elif given != size.size_bytes:
                reasons.append(f"size_bytes {given} is not the size of config {cfg.key} on {model.path.name} "
                               f"({size.size_bytes}); the config does not describe the file that was measured")  # fmt: skip
            ctx = _number(row, "ctx", int)
            if ctx is None or ctx <= 0:
                reasons.append(f"ctx={row.get('ctx')!r} must be a positive whole number")
            chunks = _number(row, "n_chunks", int) or 0
            offset = _number(row, "chunk_offset", int) or 0
            n_batch = _number(row, "n_batch", int) or 2048  # llama-perplexity's default
            scoring = (row.get("scoring") or "windows").strip()  # llama-perplexity's unless the row says
            if scoring not in ("windows", "stream"):
                reasons.append(f"scoring={scoring!r} is not one of: windows, stream")
            reasons += imatrix_problems(row.get("imatrix_id"), row.get("imatrix_corpus"), row.get("corpus"))
            imatrix_id = (row.get("imatrix_id") or "").strip().lower()[:16] or None  # mqpredict's id: 16 hex digits
        except (ValueError, KeyError) as e:
            errors.append((n, reasons + [str(e)]))
            continue
        except InputError as e:
            errors.append((n, reasons + [e.message]))
            continue
        if reasons:
            errors.append((n, reasons))
            continue
        tkey = types_key(model, types)
        build = f"{row['tool']} {row['tool_version']}".strip()
        try:
            rec = make(
                schema_version=SCHEMA_VERSION,
                key=record_key(ident.model_id, row["corpus"], ctx, n_batch, offset, chunks, tkey, build, imatrix_id,
                               scoring),  # fmt: skip
                **ident.columns(),
                config=cfg.key,
                effective_config=config_from_types(model, types).key,
                types_key=tkey,
                fractions=type_fractions(model, types),
                size_bytes=size.size_bytes,
                bpw=size.bpw,
                **{f: vals.get(f) for f in STAT_FIELDS},
                per_token_path=None,
                corpus=row["corpus"],
                ctx=ctx,
                n_batch=n_batch,
                chunk_offset=offset,
                n_chunks=chunks or 1,
                scoring=scoring,
                imatrix_id=imatrix_id,
                imatrix_corpus=(row.get("imatrix_corpus") or "").strip() or None,
                engine=row["tool"],
                kld_source=f"imported from {path.name}",
                llama_version=row["tool_version"],
                llama_commit=None,
                build=build,
                source=Source.community.value,
                provenance_file=path.name,
                provenance_url=row.get("provenance_url") or None,
                provenance_author=row.get("provenance_author") or None,
                status=Status.ok.value,
                status_reason=None,
                timestamp=now(),
                mlflow_run_id=None,
            )
        except RowError as e:
            errors.append((n, e.reasons))
            continue
        out.append(rec)
    if errors:
        raise _reject(path, errors)
    return _no_inner_conflicts(path, out)


# ------------------------------------------------------------------ llama-perplexity output
_CHUNKS = re.compile(r"kl_divergence: computing over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+)")


def import_llama_perplexity(text_path: str | Path, store: Store, base: str | Path, gguf: str | Path,
                            corpus: str | Path, author: str | None = None) -> Record:  # fmt: skip
    """A ``llama-perplexity --kl-divergence`` run's printed output → one community record."""
    from mqpredict.llama.tools import parse_kld_output

    text_path = Path(text_path)
    try:
        text = text_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise InputError(f"{text_path}: cannot read it ({e})") from None
    m = _CHUNKS.search(text)
    if not m:
        raise ImportRejected(f"{text_path} is not the output of llama-perplexity --kl-divergence",
                             "it lacks the 'kl_divergence: computing over N chunks, n_ctx=…' line")  # fmt: skip
    n_chunks, ctx, n_batch = (int(x) for x in m.groups())
    spec = EvalSpec(ctx=ctx, n_chunks=n_chunks, n_batch=n_batch)
    stats = parse_kld_output(text, spec.n_tokens, str(text_path))
    bm, qm = ModelInfo.load(base), ModelInfo.load(gguf)
    if qm.vocab_hash != bm.vocab_hash or {t.name: t.shape for t in qm.tensors} != {t.name: t.shape for t in bm.tensors}:
        raise InputError(f"{gguf} is not a quantization of {bm.path.name}", "give the base the run compared against")
    ident = identify(bm)
    types = {t.name: t.qtype for t in qm.tensors}
    c = Corpus.load(corpus)
    version = re.search(r"version: (\S+) \(build \S+, commit (\w+)\)", text) or re.search(r"build: (\d+) \((\w+)\)", text)
    tool_version = version.group(0) if version else "llama-perplexity (version not printed)"
    tkey = types_key(bm, types)
    derived = config_from_types(bm, types)
    rec = make(
        schema_version=SCHEMA_VERSION,
        key=record_key(ident.model_id, c.id, ctx, n_batch, 0, n_chunks, tkey, tool_version, None),
        **ident.columns(),
        config=derived.key,
        effective_config=derived.key,
        types_key=tkey,
        fractions=type_fractions(bm, types),
        size_bytes=qm.header.file_size,
        bpw=qm.bpw,
        **{f: v for f, v in stats.to_json().items() if f in STAT_FIELDS},
        per_token_path=None,
        corpus=c.id,
        ctx=ctx,
        n_batch=n_batch,
        chunk_offset=0,
        n_chunks=n_chunks,
        scoring="windows",
        imatrix_id=None,
        imatrix_corpus=None,
        engine="llama-perplexity",
        kld_source="llama-perplexity statistics (imported text)",
        llama_version=tool_version,
        llama_commit=version.group(2) if version else None,
        build=tool_version,
        source=Source.community.value,
        provenance_file=f"{text_path.name} ({Path(gguf).name})",
        provenance_url=None,
        provenance_author=author,
        status=Status.ok.value,
        status_reason=None,
        timestamp=now(),
        mlflow_run_id=None,
    )
    store.append([rec])
    return rec

