"""Saving matplotlib figures the way every output is saved: complete or not at all."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` to ``path`` (PNG) through a temporary file and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
