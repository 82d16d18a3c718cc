"""What every claim shares: Markdown tables, PNG figures (matplotlib, lazily), progress bars,
summary statistics."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import MPCompileError


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table; cells are ``str()``'d, ``|`` escaped."""
    def cell(x: object) -> str:
        return str(x).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(xs)
    if n == 0:
        raise MPCompileError("mean_std: no values")
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return m, math.sqrt(var)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or a clear error naming the
    extra."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the reproduction's plots need matplotlib: "
                          "pip install 'mpcompile[plot]'") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG (dpi 100) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    return path


def bar(total: int, label: str, progress: bool):
    """A tqdm bar when ``progress``, else None."""
    if not progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{label:>12}", unit="run", leave=True, dynamic_ncols=True)


def tick(pbar, **postfix) -> None:
    if pbar is not None:
        if postfix:
            pbar.set_postfix(**postfix, refresh=False)
        pbar.update(1)


def close(pbar) -> None:
    if pbar is not None:
        pbar.close()


def fmt_pow2(x: float) -> str:
    """``2^k`` for an exact power of two, else ``%g``."""
    if x > 0:
        k = math.log2(x)
        if k == int(k) and abs(k) >= 3:
            return f"2^{int(k)}"
    return f"{x:g}"
