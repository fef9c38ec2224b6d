"""An importance matrix (imatrix) as llama-quantize reads it, and what it writes into a quantized file.

llama-imatrix writes, per weight matrix ``W`` it saw in a matrix product, the sum of squared activations
of each input channel (``NAME.in_sum2``, per expert for MoE) and how many tokens went into them
(``NAME.counts``), in a GGUF file (its default format since llama.cpp PR #14842); older tools wrote a
binary ``.dat`` (the legacy format). llama-quantize turns either into one float32 weight per input
channel and expert — ``in_sum2 / count`` (1 where nothing was counted) — and gives those weights to
every quantization of that tensor. :meth:`Imatrix.load` does exactly the same, so mqpredict's
quantizations with an imatrix are byte-identical to ``llama-quantize --imatrix``.

llama-quantize also records the imatrix in the file it writes (four ``quantize.imatrix.*`` keys, after
``general.file_type``): :meth:`Imatrix.output_kvs` lists them so exact sizes and stitched builds match.
The file name is written as mqpredict passes it, which is the imatrix's base name (run llama-quantize
from the folder that holds the imatrix to get the same bytes).

mqpredict's own imatrices (``mqpredict imatrix``) also carry their calibration text's identity and a
sketch of it (:mod:`mqpredict.util.textprint`), so that measuring on that same text — which would
flatter every imatrix build — can be refused.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError
from mqpredict.quant.model import ModelInfo
from mqpredict.util.hashing import file_sha256
from mqpredict.util.textprint import containment

#: keys llama-quantize adds to a file quantized with an imatrix (tools/quantize/quantize.cpp)
KEY_FILE = "quantize.imatrix.file"
KEY_DATASET = "quantize.imatrix.dataset"
KEY_N_ENTRIES = "quantize.imatrix.entries_count"
KEY_N_CHUNKS = "quantize.imatrix.chunks_count"
OUTPUT_KEYS = (KEY_FILE, KEY_DATASET, KEY_N_ENTRIES, KEY_N_CHUNKS)
_VAL_STR_MAX = 127  # llama_model_kv_override.val_str holds 127 bytes and a NUL

#: keys of llama-imatrix's GGUF format
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
#: keys mqpredict adds (its calibration text: corpus id, sha256, bottom-k shingle sketch)
KEY_CALIB_ID = "mqpredict.calibration.id"
KEY_CALIB_SHA = "mqpredict.calibration.sha256"
KEY_CALIB_SKETCH = "mqpredict.calibration.sketch"
KEY_SETTINGS = "mqpredict.imatrix.settings"

#: overlap of the evaluation text with the calibration text above which a measurement is refused
MAX_CONTAINMENT = 0.10


@dataclass(frozen=True)
class Calibration:
    """What an imatrix was calibrated on (known for imatrices made by ``mqpredict imatrix``)."""

    id: str  # corpus id: name-sha256 prefix
    sha256: str
    sketch: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix file: per-tensor weights as llama-quantize uses them."""

    path: Path
    id: str  # sha256 prefix of the file: names it in records and caches
    entries: dict[str, np.ndarray] = field(repr=False)  # tensor name → float32 (n_per_row × n_expert)
    datasets: tuple[str, ...]
    chunk_count: int
    legacy: bool
    calibration: Calibration | None = None
    settings: str = ""

    # ------------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | os.PathLike) -> Imatrix:
        """Read an imatrix (GGUF or legacy .dat); a missing, truncated or foreign file is a one-line error."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such imatrix file", "compute one with `mqpredict imatrix BASE -o FILE`")
        with open(path, "rb") as f:
            magic = f.read(4)
        try:
            im = _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
        except InputError:
            raise
        except (ValueError, IndexError, KeyError, struct.error, OSError, EOFError) as e:
            raise InputError(f"{path} is not a readable importance matrix (truncated or corrupt: {e})",
                             "compute it again with `mqpredict imatrix` or llama-imatrix") from None  # fmt: skip
        if not im.entries:
            raise InputError(f"{path} holds no importance-matrix entries", "compute it again with `mqpredict imatrix`")
        return im

    @property
    def corpus_id(self) -> str:
        """The calibration text as records name it (``imatrix_corpus``)."""
        if self.calibration is not None:
            return self.calibration.id
        return Path(self.datasets[0]).name if self.datasets else "unknown"

    # ----------------------------------------------------------------------- checks
    def check_model(self, model: ModelInfo) -> None:
        """Refuse an imatrix of another model: every entry must name a tensor of ``model`` of its width."""
        tensors = model.header.tensor_map
        matched = 0
        for name, w in sorted(self.entries.items()):
            t = tensors.get(name)
            if t is None:
                raise InputError(
                    f"{self.path} is not an importance matrix of {model.path.name}: it holds tensor {name}, "
                    "which that model does not have",
                    "compute one for this model: mqpredict imatrix BASE --corpus CALIB.txt -o FILE",
                )
            want = t.shape[0] * (t.shape[2] if len(t.shape) > 2 else 1)
            if len(w) != want:
                raise InputError(
                    f"{self.path} is not an importance matrix of {model.path.name}: tensor {name} has "
                    f"{len(w)} weights there, {want} in the model",
                    "compute one for this model: mqpredict imatrix BASE --corpus CALIB.txt -o FILE",
                )
            matched += 1
        if not matched:
            raise InputError(f"{self.path} holds no tensor of {model.path.name}")

    def has(self, tensor: str) -> bool:
        return tensor in self.entries

    def check_evaluation_text(self, text: str, sha256: str, name: str) -> None:
        """Refuse to measure on the text this imatrix was calibrated on, or one that overlaps it heavily:
        every build with the imatrix would look better than it is."""
        hint = ("evaluate on another text (--corpus), or compute the imatrix on a disjoint calibration text "
                "(`mqpredict imatrix BASE` uses the shipped datasets/calibration/calibration.txt)")  # fmt: skip
        if self.calibration is not None:
            if self.calibration.sha256 == sha256:
                raise InputError(f"{self.path.name} was calibrated on {name}, the evaluation text itself", hint)
            share = containment(text, self.calibration.sketch)
            if share > MAX_CONTAINMENT:
                raise InputError(
                    f"{self.path.name} was calibrated on {self.calibration.id}, which contains about {share:.0%} of "
                    f"the evaluation text {name}", hint)  # fmt: skip
        elif self.datasets and Path(self.datasets[0]).name == Path(name).name:
            raise InputError(f"{self.path.name} was calibrated on a file named {Path(name).name}, the evaluation "
                             "text's name", hint)  # fmt: skip

    # ---------------------------------------------------------------- llama-quantize
    @property
    def file_label(self) -> str:
        """What ``quantize.imatrix.file`` holds in files mqpredict writes: the imatrix's file name."""
        return self.path.name

    def output_kvs(self) -> list[tuple[str, str | int]]:
        """The ``quantize.imatrix.*`` entries llama-quantize appends (strings, or ints written as u32)."""
        out: list[tuple[str, str | int]] = [(KEY_FILE, _clip(self.file_label))]
        if self.datasets:
            out.append((KEY_DATASET, _clip(self.datasets[0])))
        out.append((KEY_N_ENTRIES, len(self.entries)))
        if self.chunk_count > 0:
            out.append((KEY_N_CHUNKS, self.chunk_count))
        return out


def _clip(text: str) -> str:
    """llama-quantize copies at most 127 bytes of a string override."""
    b = text.encode()
    return b[:_VAL_STR_MAX].decode(errors="ignore") if len(b) > _VAL_STR_MAX else text


def _load_gguf(path: Path) -> Imatrix:
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = r.fields

    def scalar(key):
        f = fields.get(key)
        return None if f is None else f.contents()

    datasets = tuple(str(x) for x in (scalar(KEY_DATASETS) or []))
    chunk_count = int(scalar(KEY_CHUNK_COUNT) or 0)
    if KEY_DATASETS not in fields or KEY_CHUNK_COUNT not in fields or KEY_CHUNK_SIZE not in fields:
        raise InputError(f"{path} lacks the imatrix metadata (imatrix.datasets/chunk_count/chunk_size)",
                         "llama-quantize refuses such a file too; compute it again with `mqpredict imatrix`")  # fmt: skip
    sums, counts = {}, {}
    for t in r.tensors:
        if t.name.endswith(".in_sum2"):
            sums[t.name[: -len(".in_sum2")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(".counts"):
            counts[t.name[: -len(".counts")]] = np.asarray(t.data, dtype=np.float32).reshape(-1)
    entries = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            raise InputError(f"{path}: tensor {name} has {'no counts' if name in sums else 'counts but no sums'}",
                             "the file is damaged; compute it again")  # fmt: skip
        s, c = sums[name], np.rint(counts[name]).astype(np.float32)  # llama.cpp rounds counts to integers
        if len(c) == 0 or len(s) % len(c):
            raise InputError(f"{path}: tensor {name} has {len(s)} sums for {len(c)} experts")
        per = s.reshape(len(c), -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            e = np.where(c[:, None] > 0, per / np.where(c > 0, c, 1)[:, None], np.float32(1)).astype(np.float32)
        if not np.isfinite(e).all():
            raise InputError(f"{path}: tensor {name} holds non-finite values", "llama-quantize refuses it too")
        entries[name] = e.reshape(-1)
    calib = None
    if KEY_CALIB_SHA in fields:
        calib = Calibration(str(scalar(KEY_CALIB_ID)), str(scalar(KEY_CALIB_SHA)),
                            np.asarray(fields[KEY_CALIB_SKETCH].contents(), dtype=np.uint64))  # fmt: skip
    return Imatrix(path, file_sha256(path)[:16], entries, datasets, chunk_count, False, calib,
                   str(scalar(KEY_SETTINGS) or ""))  # fmt: skip


def _load_legacy(path: Path) -> Imatrix:
    """The binary format older llama-imatrix builds wrote (``imatrix.dat``)."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        vals = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return vals

    (n,) = take("<i")
    if n < 1 or n > 1_000_000:
        raise InputError(f"{path} is neither a GGUF nor a legacy importance matrix",
                         "give the file llama-imatrix or `mqpredict imatrix` wrote")  # fmt: skip
    entries = {}
    for _ in range(n):
        (ln,) = take("<i")
        if ln <= 0 or pos + ln > len(data):
            raise InputError(f"{path} is truncated (entry name)")
        name = data[pos : pos + ln].decode(errors="replace")
        pos += ln
        ncall, nval = take("<ii")
        if nval < 1 or pos + 4 * nval > len(data):
            raise InputError(f"{path} is truncated (tensor {name})")
        v = np.frombuffer(data, dtype=np.float32, count=nval, offset=pos).copy()
        pos += 4 * nval
        entries[name] = (v / np.float32(ncall)).astype(np.float32) if ncall > 0 else v
    chunks, datasets = 0, ()
    if pos + 4 <= len(data):
        (chunks,) = take("<i")
        if pos + 4 <= len(data):
            (ln,) = take("<i")
            if ln > 0 and pos + ln <= len(data):
                datasets = (data[pos : pos + ln].decode(errors="replace"),)
    return Imatrix(path, file_sha256(path)[:16], entries, datasets, chunks, True)
