"""A small fingerprint of a text, to tell whether another text overlaps it (without keeping the text).

An importance matrix remembers what it was calibrated on as a **bottom-k sketch**: the ``k`` smallest
64-bit hashes of the text's word 8-grams (shingles). For any other text, its shingles whose hash is at
most the sketch's largest value are a uniform random sample of its shingles, and each of them is in the
calibration text exactly when it is in the sketch — so the fraction found there estimates the share of
the other text that the calibration text contains (the *containment*), from a few kilobytes.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

SHINGLE = 8  # words per shingle: long enough that unrelated English texts share almost none
SKETCH_SIZE = 4096
_WORD = re.compile(r"\w+")


def _hashes(text: str) -> np.ndarray:
    words = _WORD.findall(text.lower())
    if len(words) < SHINGLE:
        words = words + [""] * (SHINGLE - len(words))
    grams = (" ".join(words[i : i + SHINGLE]).encode() for i in range(len(words) - SHINGLE + 1))
    return np.unique(np.fromiter(
        (int.from_bytes(hashlib.blake2b(g, digest_size=8).digest(), "little") for g in grams), dtype=np.uint64
    ))  # fmt: skip


def sketch(text: str, k: int = SKETCH_SIZE) -> np.ndarray:
    """The ``k`` smallest shingle hashes of ``text`` (sorted uint64)."""
    return _hashes(text)[:k]


def containment(text: str, calib_sketch: np.ndarray) -> float:
    """Estimated share of ``text``'s shingles that occur in the text ``calib_sketch`` was made from."""
    calib_sketch = np.asarray(calib_sketch, dtype=np.uint64)
    if len(calib_sketch) == 0:
        return 0.0
    h = _hashes(text)
    # a sketch shorter than SKETCH_SIZE holds every shingle of its text: compare all of ours with it
    sample = h if len(calib_sketch) < SKETCH_SIZE else h[h <= calib_sketch[-1]]
    if len(sample) == 0:  # a text too short to meet the sketch's range: compare what there is
        sample = h
    return float(np.isin(sample, calib_sketch).mean()) if len(sample) else 0.0
