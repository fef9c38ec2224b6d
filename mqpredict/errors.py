"""Errors a user can act on.

Every error raised on purpose is an :class:`MqError`: its message names the file, tensor or row
that is wrong and its ``hint`` says what to do. The CLI prints them as one line (no traceback
unless ``--debug``) and exits non-zero; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MqError(Exception):
    """Base class of errors with a message meant for the user."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class InputError(MqError):
    """Bad input: a missing/corrupt file, a malformed config, an unknown quant type or group."""


class GGUFError(InputError):
    """A file that is not a readable GGUF (not GGUF at all, truncated, unsupported version)."""


class ConfigError(InputError):
    """A config that cannot apply to this model (unknown group, type not allowed for a tensor)."""


class LlamaError(MqError):
    """llama.cpp refused or failed (load, quantize, decode, a tool's missing output)."""

    exit_code = 3
