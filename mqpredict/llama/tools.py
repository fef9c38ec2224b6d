"""ToolsEngine: the user's own ``llama-quantize`` and ``llama-perplexity`` binaries.

This is the path for people with their own CUDA/Metal build (``--llama-bin DIR``, extra arguments such
as ``-ngl 99`` via ``tool_args``). Binaries are looked up in ``--llama-bin``, ``$MQPREDICT_LLAMA_BIN``,
``PATH``, then the ``site-packages/bin/`` of this Python environment, where the project's set-up builds
them. Builds run ``llama-quantize`` with the exported tensor-type file; evaluations run
``llama-perplexity --kl-divergence`` against a base log-prob file and parse its statistics, failing
loudly when one is missing (the tool has been seen to exit 0 without printing them).

Two ways to get the KLD (``kld_source``):

* ``statistics`` (default): ``llama-perplexity --kl-divergence`` against the base log-prob file; its
  printed statistics are parsed and a missing one is an error, never a value. llama-perplexity's
  asynchronous logger can lose those lines at exit (a few % of runs, more under CPU load), so a run
  without them is repeated once and then the engine switches to the logits path for that file.
* ``logits``: llama-perplexity evaluates the quantized model in its *save* mode, which writes the
  model's 16-bit log-probs with an ordinary file stream (nothing to lose), and mqpredict scores that
  file against the base's as the in-process engine scores logits (measured agreement: 0.01 % on
  SmolLM2, up to 0.13 % on the tiny test models, whose KLDs are small). It also
  yields per-token vectors, which the ``statistics`` path cannot.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import warnings
from enum import StrEnum
from functools import cached_property
from pathlib import Path

import numpy as np

from mqpredict.errors import InputError, LlamaError
from mqpredict.llama.engine import Engine, EvalResult
from mqpredict.llama.quantize import parse_dry_run
from mqpredict.measure.corpus import EvalSpec
from mqpredict.measure.kld import TokenScores, score_stored
from mqpredict.measure.logprobs import LogProbFile
from mqpredict.measure.stats import KLDStats
from mqpredict.quant.config import Config
from mqpredict.quant.model import ModelInfo
from mqpredict.quant.resolve import EffectiveTypes, quantize_command, tensor_type_lines
from mqpredict.util.atomic import atomic_path

TOOLS = ("llama-quantize", "llama-perplexity")


class KLDSource(StrEnum):
    statistics = "statistics"  # llama-perplexity --kl-divergence, its printed statistics parsed
    logits = "logits"  # llama-perplexity's saved log-probs, scored by mqpredict


def find_tool(name: str, llama_bin: str | os.PathLike | None = None) -> Path:
    """Locate a llama.cpp binary (see the module doc for the search order)."""
    dirs = [llama_bin, os.environ.get("MQPREDICT_LLAMA_BIN")]
    for d in dirs:
        if d:
            p = Path(d) / name
            if p.is_file() and os.access(p, os.X_OK):
                return p
            if d == llama_bin:
                raise InputError(f"{p} does not exist or is not executable", f"point --llama-bin at the folder holding {name}")
    found = shutil.which(name)
    if found:
        return Path(found)
    p = Path(sysconfig.get_paths()["purelib"]) / "bin" / name
    if p.is_file():
        return p
    raise InputError(
        f"{name} not found (looked in --llama-bin, $MQPREDICT_LLAMA_BIN, PATH and {p.parent})",
        "run the README set-up, which builds the tools, or pass --llama-bin DIR",
    )


def run_tool(cmd: list[str], what: str, cwd: str | os.PathLike | None = None) -> str:
    """Run a tool; return its stdout followed by its stderr, captured apart so that lines never interleave.

    A failure raises with the tool's own last lines. Ctrl-C stops the tool too.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace", cwd=cwd)
    try:
        out, errs = proc.communicate()
    except BaseException:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        raise
    text = out + "\n" + errs
    if proc.returncode != 0:
        tail = " | ".join(x.strip() for x in (errs or out).strip().splitlines()[-4:])
        raise LlamaError(f"{what} failed (exit {proc.returncode}): {tail}", f"command: {' '.join(cmd)}")
    return text


_NUM = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_STAT_LINES = {  # key: (the line's label, regex)
    "ppl": ("Mean PPL(Q)", rf"^Mean PPL\(Q\)\s*:\s*{_NUM}\s*±\s*{_NUM}"),
    "ppl_base": ("Mean PPL(base)", rf"^Mean PPL\(base\)\s*:\s*{_NUM}\s*±\s*{_NUM}"),
    "ln_ppl_ratio": ("Mean ln(PPL(Q)/PPL(base))", rf"^Mean ln\(PPL\(Q\)/PPL\(base\)\)\s*:\s*{_NUM}\s*±\s*{_NUM}"),
    "kld_mean": ("Mean KLD", rf"^Mean\s+KLD:\s*{_NUM}\s*±\s*{_NUM}"),
    "kld_max": ("Maximum KLD", rf"^Maximum KLD:\s*{_NUM}"),
    "kld_p999": ("99.9% KLD", rf"^99\.9%\s+KLD:\s*{_NUM}"),
    "kld_p99": ("99.0% KLD", rf"^99\.0%\s+KLD:\s*{_NUM}"),
    "kld_p95": ("95.0% KLD", rf"^95\.0%\s+KLD:\s*{_NUM}"),
    "kld_p90": ("90.0% KLD", rf"^90\.0%\s+KLD:\s*{_NUM}"),
    "kld_median": ("Median KLD", rf"^Median\s+KLD:\s*{_NUM}"),
    "dp_mean": ("Mean Δp", rf"^Mean\s+Δp:\s*{_NUM}\s*±\s*{_NUM}\s*%"),
    "dp_rms": ("RMS Δp", rf"^RMS Δp\s*:\s*{_NUM}\s*±\s*{_NUM}\s*%"),
    "same_top_p": ("Same top p", rf"^Same top p:\s*{_NUM}\s*±\s*{_NUM}\s*%"),
}
_PERCENT = {"dp_mean", "dp_rms", "same_top_p"}


def parse_kld_output(text: str, n_tokens: int, source: str) -> KLDStats:
    """The statistics ``llama-perplexity --kl-divergence`` prints → :class:`KLDStats` (fractions, not %)."""
    got: dict[str, float] = {}
    for key, (label, rx) in _STAT_LINES.items():
        m = re.search(rx, text, re.MULTILINE)
        if m is None:
            raise LlamaError(
                f"llama-perplexity printed no '{label}' statistic for {source}",
                "the run did not finish its statistics (it needs at least 100 scored tokens); treat it as failed",
            )
        vals = [float(v) for v in m.groups()]
        scale = 0.01 if key in _PERCENT else 1.0
        got[key] = vals[0] * scale
        if len(vals) > 1:
            got[f"{key}_err"] = vals[1] * scale
    fields = [f for f in KLDStats.__dataclass_fields__ if f != "n_tokens"]
    return KLDStats(n_tokens=n_tokens, **{f: got.get(f, float("nan")) for f in fields})


class ToolsEngine(Engine):
    """Engine on the real llama.cpp command-line tools."""

    name = "tools"

    #: extra runs of ``--kl-divergence`` when it exits 0 without its statistics (its asynchronous logger
    #: can lose the last lines at exit; see docs/measurement.md) before switching to the logits path
    retries = 1

    def __init__(
        self,
        *args,
        llama_bin: str | os.PathLike | None = None,
        tool_args: list[str] | None = None,
        kld_source: KLDSource = KLDSource.statistics,
        **kw,
    ) -> None:
        self.llama_bin = llama_bin
        self.kld_source = KLDSource(kld_source)
        self.tool_args = list(tool_args or [])
        self.quantize_bin = find_tool("llama-quantize", llama_bin)
        self.perplexity_bin = find_tool("llama-perplexity", llama_bin)
        super().__init__(*args, **kw)
        self._check_windows(self.spec)

    @cached_property
    def _version_text(self) -> str:
        p = subprocess.run([str(self.perplexity_bin), "--version"], capture_output=True, text=True)
        return p.stdout + p.stderr

    def version(self) -> str:
        m = re.search(r"version:\s*(.+)", self._version_text)
        return f"llama.cpp {m.group(1).strip()}" if m else "llama.cpp (unknown version)"

    def build_id(self) -> str:
        h = hashlib.sha256(self._version_text.encode())
        h.update(str(self.perplexity_bin.resolve()).encode())
        return h.hexdigest()[:12]

    # ------------------------------------------------------------- build
    def dry_run(self, model: ModelInfo, config: Config) -> EffectiveTypes:
        tt = self.workdir / f"dry-{hashlib.sha256(config.key.encode()).hexdigest()[:12]}.txt"
        tt.write_text("\n".join(tensor_type_lines(model, config)) + "\n")
        cmd = self._absolute(model, quantize_command(model, config, "", str(tt.resolve()), imatrix=self.imatrix))
        cmd = [str(self.quantize_bin), "--dry-run", *[c for c in cmd[1:] if c != ""]]
        if "--allow-requantize" not in cmd and self.allow_quantized_base:
            cmd.insert(1, "--allow-requantize")
        out = run_tool(cmd, f"llama-quantize --dry-run on {model.path}", self._cwd)
        return parse_dry_run(out.splitlines())

    @staticmethod
    def _absolute(model: ModelInfo, cmd: list[str]) -> list[str]:
        """The command with the model's path made absolute (the tool may run in another folder)."""
        return [str(model.path.resolve()) if c == str(model.path) else c for c in cmd]

    @property
    def _cwd(self) -> Path | None:
        """llama-quantize runs in the imatrix's folder, so that it writes the same file name as mqpredict."""
        return self.imatrix.path.resolve().parent if self.imatrix is not None else None

    def _build(self, config: Config, types: EffectiveTypes, out: Path) -> None:
        tt = self.workdir / f"{out.stem}.tensor-types.txt"
        tt.write_text("\n".join(tensor_type_lines(self.model, config)) + "\n")
        with atomic_path(out, fsync=False) as tmp:
            cmd = self._absolute(self.model, quantize_command(self.model, config, str(Path(tmp).resolve()),
                                                              str(tt.resolve()), self.threads, self.imatrix))  # fmt: skip
            cmd[0] = str(self.quantize_bin)
            if self.allow_quantized_base:
                cmd.insert(1, "--allow-requantize")
            run_tool(cmd, f"llama-quantize {self.model.path.name} → {out.name}", self._cwd)

    # ---------------------------------------------------------- evaluate
    def _common(self, spec: EvalSpec) -> list[str]:
        return ["-c", str(spec.ctx), "-b", str(spec.n_batch), "-t", str(self.threads), *self.tool_args]

    def _check_windows(self, spec: EvalSpec) -> None:
        if spec.stream:
            raise InputError("the tools engine cannot score a stream: llama-perplexity has no streamed scoring",
                             "use --scoring windows (or the in-process engine)")  # fmt: skip

    def logprob_path(self, spec: EvalSpec) -> Path:
        """llama-perplexity's base file: one per (base, corpus, ctx, batch layout, build), every slice reads it."""
        return super().logprob_path(spec).with_suffix(".kld")

    def _full_base(self, spec: EvalSpec) -> LogProbFile:
        """The cached base file, holding at least chunks ``0 … spec.end-1`` (llama-perplexity can only start at
        window 0, so a file too short for a later slice is computed again, once, up to it)."""
        self._check_windows(spec)
        full = self.logprob_path(spec)
        if full.exists():
            try:
                lp = LogProbFile.open(full)
                if lp.n_chunk >= spec.end:
                    return lp
            except InputError:
                pass
            full.unlink(missing_ok=True)
        with atomic_path(full, fsync=False) as tmp:
            cmd = [str(self.perplexity_bin), "-m", str(self.model.path), "-f", str(self.corpus.path),
                   "--kl-divergence-base", str(tmp), "--chunks", str(spec.end), *self._common(spec)]  # fmt: skip
            run_tool(cmd, f"llama-perplexity (base log-probs of {self.model.path.name})")
            try:
                LogProbFile.open(tmp)
            except (InputError, OSError):
                raise InputError(
                    f"llama-perplexity wrote no log-probs for {self.corpus.path}",
                    f"the corpus may be shorter than two windows of {spec.ctx} tokens",
                ) from None
        lp = LogProbFile.open(full)
        if lp.n_chunk < spec.end:
            raise InputError(
                f"{self.corpus.path} holds {lp.n_chunk} windows of {spec.ctx} tokens; chunks {spec.chunk_offset}"
                f"…{spec.end - 1} were asked for",
                "lower --tokens / --chunk-offset or give a longer corpus",
            )
        return lp

    def base_logprobs(self, spec: EvalSpec) -> Path:
        """A base file holding exactly ``spec``'s windows (what ``--kl-divergence`` evaluates): the cached file
        itself, or a slice of it in the engine's work folder."""
        lp = self._full_base(spec)
        if spec.chunk_offset == 0 and lp.n_chunk == spec.n_chunks:
            return lp.path
        part = self.workdir / f"base-{spec.key}.kld"
        if not part.exists():
            lp.slice(part, spec.chunk_offset, spec.n_chunks)
        return part

    def _evaluate(self, path: Path, spec: EvalSpec) -> EvalResult:
        self._check_windows(spec)
        if self.kld_source == KLDSource.statistics:
            base = self.base_logprobs(spec)
            cmd = [str(self.perplexity_bin), "-m", str(path), "--kl-divergence-base", str(base), "--kl-divergence",
                   *self._common(spec)]  # fmt: skip
            for attempt in range(self.retries + 1):
                out = run_tool(cmd, f"llama-perplexity --kl-divergence on {path.name}")
                try:
                    stats = parse_kld_output(out, spec.n_tokens, str(path))
                    return EvalResult(stats, None, "llama-perplexity statistics", (attempt + 1) * spec.forward_tokens)
                except LlamaError as e:
                    warnings.warn(f"llama-perplexity exited 0 without its statistics for {path.name} ({e.message})",
                                  stacklevel=2)  # fmt: skip
            warnings.warn(f"switching to llama-perplexity's saved log-probs for {path.name}", stacklevel=2)
            r = self._evaluate_logits(path, spec)
            return dataclasses.replace(r, forward_tokens=r.forward_tokens + (self.retries + 1) * spec.forward_tokens)
        return self._evaluate_logits(path, spec)

    @property
    def keeps_vectors(self) -> bool:
        return self.kld_source == KLDSource.logits

    def _windows_text(self, base: LogProbFile, spec: EvalSpec) -> Path | None:
        """A text whose tokenization starts with exactly the windows of ``spec`` (one more window of text after
        them, where the corpus has it, so that the cut falls beyond them), for llama-perplexity's save mode,
        which tokenizes a text and cannot start at a later window. None when the windows do not survive a
        round trip through text (the tokenizer merges across the cut): then the save mode runs from window 0."""
        from mqpredict.llama.inprocess import LoadedModel

        o, n = spec.chunk_offset, spec.n_chunks
        k = min(n + 1, base.n_chunk - o)
        if k < 2:  # llama-perplexity wants two windows of text
            return None
        want = np.asarray(base.tokens[o : o + k]).reshape(-1)
        vocab = LoadedModel(self.model.path, vocab_only=True)
        try:
            text = vocab.detokenize(want[1:] if vocab.add_bos else want)
            again = vocab.tokenize(text)
        finally:
            vocab.close()
        m = n * spec.ctx
        if len(again) < m or not np.array_equal(again[1:m], want[1:m]) or (not vocab.add_bos and again[0] != want[0]):
            return None
        out = self.workdir / f"windows-{o}-{n}.txt"
        out.write_text(text + "\n", encoding="utf-8", errors="surrogateescape")  # -f drops one trailing newline
        return out

    def _evaluate_logits(self, path: Path, spec: EvalSpec) -> EvalResult:
        """llama-perplexity's save mode on the quantized model, scored against the base: only the slice's
        windows when a text of them round-trips (or the slice starts at window 0), else windows 0 … end-1."""
        base = LogProbFile.open(self.base_logprobs(spec))
        text = None if spec.chunk_offset == 0 else self._windows_text(self._full_base(spec), spec)
        if spec.chunk_offset == 0 or text is not None:
            source, start, chunks = text or self.corpus.path, 0, spec.n_chunks
        else:
            source, start, chunks = self.corpus.path, spec.chunk_offset, spec.end
        dump = self.workdir / f"{path.stem}.logits.kld"
        cmd = [str(self.perplexity_bin), "-m", str(path), "-f", str(source), "--kl-divergence-base", str(dump),
               "--chunks", str(chunks), *self._common(spec)]  # fmt: skip
        try:
            run_tool(cmd, f"llama-perplexity (log-probs of {path.name})")
            try:
                q = LogProbFile.open(dump)
            except (InputError, OSError):
                raise LlamaError(f"llama-perplexity wrote no usable log-probs for {path}", "run with --debug") from None
            got, want = np.asarray(q.tokens[start : start + spec.n_chunks]), np.asarray(base.tokens)
            same = got.shape == want.shape and np.array_equal(got[:, 1:], want[:, 1:]) and np.array_equal(got[1:, 0], want[1:, 0])
            if q.n_vocab != base.n_vocab or not same or (text is None and got[0, 0] != want[0, 0]):
                raise LlamaError(
                    f"llama-perplexity's log-probs for {path} do not cover the base's tokens",
                    "the model's tokenizer differs from the base's",
                )
            first = spec.first
            parts = [
                score_stored(q.rows[start + i], base.rows[i], np.asarray(base.tokens[i, first + 1 :]), q.n_vocab)
                for i in range(spec.n_chunks)
            ]
        finally:
            dump.unlink(missing_ok=True)
        scores = TokenScores.concat(parts)
        return EvalResult(KLDStats.from_scores(scores), scores, "llama-perplexity logits", chunks * spec.ctx)
