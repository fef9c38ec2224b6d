"""Measurements (and failures) → records."""

from __future__ import annotations

from dataclasses import dataclass

from mqpredict.llama.engine import FILE_PREFIX, Engine, Measurement
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.stats import FIELDS as STAT_FIELDS
from mqpredict.quant.config import Config
from mqpredict.quant.derive import config_from_types, type_fractions
from mqpredict.quant.resolve import EffectiveTypes, types_key
from mqpredict.quant.types import QuantType
from mqpredict.records.identity import ModelIdentity
from mqpredict.records.context import Context
from mqpredict.records.schema import SCHEMA_VERSION, Record, Source, Status, make, now


@dataclass(frozen=True)
class Provenance:
    file: str | None = None
    url: str | None = None
    author: str | None = None


def _common(engine: Engine, ident: ModelIdentity, config: str, types: EffectiveTypes, spec: EvalSpec,
            source: Source, prov: Provenance) -> dict:  # fmt: skip
    model = engine.model
    tkey = types_key(model, types)
    size = engine.size_of(types)
    return {
        "schema_version": SCHEMA_VERSION,
        "key": Context.of(engine, ident.model_id, spec).key(tkey, engine.build_id()),
        **ident.columns(),
        "config": config,
        "effective_config": config_from_types(model, types).key,
        "types_key": tkey,
        "fractions": type_fractions(model, types),
        "size_bytes": size.size_bytes,
        "bpw": size.bpw,
        "corpus": engine.corpus.id,
        "ctx": spec.ctx,
        "n_batch": spec.n_batch,
        "chunk_offset": spec.chunk_offset,
        "n_chunks": spec.n_chunks,
        "scoring": spec.scoring.value,
        "imatrix_id": engine.imatrix_id,
        "imatrix_corpus": engine.imatrix.corpus_id if engine.imatrix is not None else None,
        "engine": engine.name,
        "llama_version": engine.version(),
        "llama_commit": _commit(engine),
        "build": engine.build_id(),
        "source": source.value,
        "provenance_file": prov.file,
        "provenance_url": prov.url,
        "provenance_author": prov.author,
        "timestamp": now(),
        "mlflow_run_id": None,
    }


def _commit(engine: Engine) -> str | None:
    import re

    m = re.search(r"commit ([0-9a-f]{7,40})", engine.version())
    return m.group(1) if m else None


def from_measurement(engine: Engine, ident: ModelIdentity, m: Measurement, spec: EvalSpec, source: Source,
                     prov: Provenance = Provenance(), status: Status = Status.ok, reason: str | None = None,
                     per_token_path: str | None = None) -> Record:  # fmt: skip
    types = {k: QuantType[v] for k, v in m.types.items()}
    config = m.config
    if config.startswith(FILE_PREFIX):  # a ready GGUF: its config is what its header holds, the file is provenance
        config = config_from_types(engine.model, types).key
        prov = Provenance(prov.file or m.config.removeprefix(FILE_PREFIX), prov.url, prov.author)
    values = _common(engine, ident, config, types, spec, source, prov)
    values["size_bytes"], values["bpw"] = m.size_bytes, m.bpw  # as written (a ready GGUF may differ from a rebuild)
    stats = m.stats.to_json()
    return make(**values, **{f: stats[f] for f in STAT_FIELDS}, per_token_path=per_token_path,
                kld_source=m.kld_source, status=status.value, status_reason=reason)  # fmt: skip


def failed(engine: Engine, ident: ModelIdentity, config: Config, types: EffectiveTypes, spec: EvalSpec,
           source: Source, reason: str, prov: Provenance = Provenance()) -> Record:  # fmt: skip
    """A record of a measurement that failed (llama.cpp refused, crashed …), with the reason."""
    values = _common(engine, ident, config.key, types, spec, source, prov)
    return make(**values, **{f: None for f in STAT_FIELDS}, per_token_path=None, kld_source=None,
                status=Status.failed.value, status_reason=reason)  # fmt: skip
