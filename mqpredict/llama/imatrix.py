"""Computing an importance matrix with llama.cpp's own ``llama-imatrix`` (cached), and stamping it.

``llama-imatrix`` runs the base model over a calibration text and writes, per weight matrix, the summed
squared activations of its input channels in the GGUF imatrix format (its default). mqpredict then adds
three keys of its own to that file — the calibration text's corpus id, its sha256 and a bottom-k sketch
of its shingles (:mod:`mqpredict.util.textprint`) — so the imatrix remembers what it was calibrated on,
and sets ``imatrix.datasets`` to the text's file name (not the path it happened to have). llama-quantize
reads the stamped file like any other (it ignores keys it does not know).

Results are cached by (base, calibration text, settings, llama.cpp build): the same request is free.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError, LlamaError
from mqpredict.llama import runtime
from mqpredict.llama.tools import find_tool
from mqpredict.measure.corpus import Corpus
from mqpredict.quant.imatrix import (
    KEY_CALIB_ID, KEY_CALIB_SHA, KEY_CALIB_SKETCH, KEY_DATASETS, KEY_SETTINGS, Imatrix,
)  # fmt: skip
from mqpredict.quant.model import ModelInfo
from mqpredict.util.atomic import atomic_path
from mqpredict.util.hashing import file_sha256
from mqpredict.util.paths import cache_dir
from mqpredict.util.textprint import sketch

DEFAULT_CHUNKS = 32  # windows of the calibration text (32 × 512 = 16k tokens)
DEFAULT_CTX = 512


@dataclass(frozen=True)
class ImatrixSettings:
    chunks: int = DEFAULT_CHUNKS
    ctx: int = DEFAULT_CTX

    def __post_init__(self) -> None:
        if self.chunks < 1:
            raise InputError(f"--chunks {self.chunks}: give at least one window")
        if self.ctx < 16:
            raise InputError(f"--ctx {self.ctx} is too small for an imatrix")

    @property
    def key(self) -> str:
        return f"c{self.chunks}-ctx{self.ctx}"


def cache_path(base_sha: str, calib: Corpus, settings: ImatrixSettings) -> Path:
    return (cache_dir() / "imatrix" / f"{base_sha[:16]}-{calib.sha256[:12]}-{settings.key}-{runtime.build_fingerprint()}"
            / f"{calib.path.stem}.imatrix.gguf")  # fmt: skip


def compute_imatrix(
    base: str | os.PathLike,
    calibration: str | os.PathLike,
    out: str | os.PathLike | None = None,
    settings: ImatrixSettings = ImatrixSettings(),
    threads: int = 0,
    progress=None,
    llama_bin: str | os.PathLike | None = None,
) -> tuple[Imatrix, bool]:
    """The imatrix of ``base`` on ``calibration`` (cached; copied to ``out`` if given) and whether it was
    taken from the cache."""
    model = ModelInfo.load(base)
    calib = Corpus.load(calibration)
    cached = cache_path(file_sha256(model.path), calib, settings)
    hit = cached.exists()
    if hit:
        try:
            im = Imatrix.load(cached)
        except InputError:
            cached.unlink(missing_ok=True)
            hit = False
    if not hit:
        _run(model, calib, cached, settings, threads, progress, llama_bin)
        im = Imatrix.load(cached)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out, fsync=False) as tmp:
            shutil.copyfile(cached, tmp)
        im = Imatrix.load(out)
    im.check_model(model)
    return im, hit


def _run(model: ModelInfo, calib: Corpus, dst: Path, settings: ImatrixSettings, threads: int, progress,
         llama_bin) -> None:  # fmt: skip
    tool = find_tool("llama-imatrix", llama_bin)
    threads = threads or runtime.default_threads()
    with tempfile.TemporaryDirectory(prefix="mqpredict-imatrix-") as tmp:
        text = Path(tmp) / calib.path.name  # the text as llama-perplexity reads it (one trailing newline dropped)
        text.write_text(calib.text + "\n", encoding="utf-8")
        raw = Path(tmp) / "raw.imatrix.gguf"
        cmd = [str(tool), "-m", str(model.path.resolve()), "-f", text.name, "-o", str(raw), "--chunks",
               str(settings.chunks), "-c", str(settings.ctx), "-b", str(settings.ctx), "-t", str(threads),
               "--output-frequency", str(1 << 30)]  # fmt: skip
        _watch(cmd, Path(tmp), settings.chunks, progress, f"llama-imatrix on {model.path.name}")
        if not raw.exists():
            raise LlamaError(f"llama-imatrix wrote no file for {model.path.name}", "run with --debug")
        _stamp(raw, dst, calib, settings)


_CHUNK_DONE = re.compile(r"\[(\d+)\]")
_TOO_SHORT = re.compile(r"tokenizes to only (\d+) tokens")


def _watch(cmd: list[str], cwd: Path, total: int, progress, what: str) -> None:
    """Run llama-imatrix, drawing progress from its per-window ``[i]ppl,`` output."""
    log = cwd / "imatrix.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=f, text=True, errors="replace", bufsize=1)
        seen = ""
        try:
            while True:
                piece = proc.stdout.read(64)
                if not piece:
                    break
                seen = (seen + piece)[-256:]
                done = [int(x) for x in _CHUNK_DONE.findall(seen)]
                if done and progress:
                    progress("imatrix", min(max(done), total), total)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        text = log.read_text(errors="replace")
        short = _TOO_SHORT.search(text)
        if short:
            raise InputError(f"the calibration text tokenizes to only {short.group(1)} tokens, fewer than two "
                             f"windows of {cmd[cmd.index('-c') + 1]}", "give a longer text or a smaller --ctx")  # fmt: skip
        tail = " | ".join(x.strip() for x in text.strip().splitlines()[-3:])
        raise LlamaError(f"{what} failed (exit {proc.returncode}) after {time.monotonic() - t0:.0f} s: {tail}",
                         f"command: {' '.join(cmd)}")  # fmt: skip
    if progress:
        progress("imatrix", total, total)


def _stamp(raw: Path, dst: Path, calib: Corpus, settings: ImatrixSettings) -> None:
    """Copy llama-imatrix's file adding what it was calibrated on (and naming the text by its file name)."""
    from gguf import GGUFReader, GGUFWriter
    from gguf.constants import GGUFValueType

    r = GGUFReader(raw)
    arch = str(r.fields["general.architecture"].contents()) if "general.architecture" in r.fields else "imatrix"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst, fsync=False) as tmp:
        w = GGUFWriter(str(tmp), arch)
        skip = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture", KEY_DATASETS}
        for name, field in r.fields.items():
            if name in skip:
                continue
            vt = field.types[0]
            if vt == GGUFValueType.ARRAY:
                w.add_key_value(name, field.contents(), vt, sub_type=field.types[-1])
            else:
                w.add_key_value(name, field.contents(), vt)
        w.add_array(KEY_DATASETS, [calib.path.name])
        w.add_string(KEY_CALIB_ID, calib.id)
        w.add_string(KEY_CALIB_SHA, calib.sha256)
        w.add_key_value(KEY_CALIB_SKETCH, [int(x) for x in sketch(calib.text)], GGUFValueType.ARRAY,
                        sub_type=GGUFValueType.UINT64)
        w.add_string(KEY_SETTINGS, settings.key)
        for t in r.tensors:
            w.add_tensor(t.name, np.asarray(t.data, dtype=np.float32).copy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def describe(im: Imatrix) -> dict:
    """An imatrix as ``mqpredict imatrix --json`` reports it."""
    return {
        "path": str(im.path),
        "imatrix_id": im.id,
        "imatrix_corpus": im.corpus_id,
        "entries": len(im.entries),
        "chunks": im.chunk_count,
        "datasets": list(im.datasets),
        "settings": im.settings,
        "sha256": hashlib.sha256(im.path.read_bytes()).hexdigest(),
    }
