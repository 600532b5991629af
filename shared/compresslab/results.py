"""The shared results table: one row per compressed variant, appended by every lab, plotted by the capstone.

    results.record(lab="01", method="RTN", model="smollm2-135m", bits=4, group_size=64,
                   weight_mb=..., ppl=48.8, probe_acc=0.31)
    results.table()          # pandas DataFrame of every row so far
    results.plot()           # perplexity vs weight size, one point per variant

Rows live in a JSON-lines file (COMPRESSLAB_RESULTS, default <cache>/results.jsonl). Recording the same
(lab, model, method, bits, group_size, quick) again replaces the old row, so re-running a lab does not duplicate it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .paths import cache_dir

KEY = ("lab", "model", "method", "bits", "group_size", "quick")
COLUMNS = KEY + ("weight_mb", "ppl", "probe_acc", "tokens_per_s")


def results_path() -> Path:
    return Path(os.environ.get("COMPRESSLAB_RESULTS") or cache_dir() / "results.jsonl")


def _rows() -> list[dict]:
    path = results_path()
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(lab: str, method: str, model: str, bits=None, group_size=None, weight_mb=None, ppl=None,
           probe_acc=None, tokens_per_s=None, quick: bool = False, **extra) -> dict:
    """Add (or replace) one variant's row and return it."""
    row = dict(lab=lab, model=model, method=method, bits=bits, group_size=group_size, quick=bool(quick),
               weight_mb=weight_mb, ppl=ppl, probe_acc=probe_acc, tokens_per_s=tokens_per_s, **extra)
    rows = [r for r in _rows() if tuple(r.get(k) for k in KEY) != tuple(row[k] for k in KEY)] + [row]
    path = results_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return row


def describe(model, bits: int | None = None, group_size: int | None = 64, nm: tuple[int, int] | None = None) -> dict:
    """bits, group_size and weight_mb of the model a row measured — pass them to record(**describe(...)).

    bits None: the model as stored, at its parameters' dtype (unstructured zeros are stored too: no saving).
    bits 2..8: its decoder Linears deployed at `bits` in groups of group_size (fp16 scale + a bits-bit zero per
    group), with nm=(n, m) keeping n of every m values plus 2-bit positions; everything else fp16 — the bytes a
    deployment stores (lab 07's formula, compresslab.deploy.deployed_weight_bytes)."""
    from . import deploy
    from .evaluation import stored_bytes

    if bits is None:
        if nm is not None:
            raise ValueError("nm needs bits: an N:M model stored dense (zeros included) has no N:M saving")
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        return {"bits": dtype.itemsize * 8, "group_size": None, "weight_mb": round(stored_bytes(model) / 1e6, 1)}
    if isinstance(bits, bool) or bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be None (as stored) or one of 2, 3, 4, 8 (quantized Linears), got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int (64 on this model), got {group_size!r}")
    if nm is not None:
        nbytes = deploy.deployed_weight_bytes(model, bits, nm, group_size=group_size)
    else:
        nbytes = deploy.weight_bytes_at(*deploy.linear_and_other_params(model), bits, group_size)
    return {"bits": bits, "group_size": group_size, "weight_mb": round(nbytes / 1e6, 1)}


def rows(**filters) -> list[dict]:
    """All rows (optionally only those matching filters) as the dicts they were recorded as: None stays None (a
    DataFrame turns a missing group size into NaN, and NaN equals nothing)."""
    return [dict(r) for r in _rows() if all(r.get(k) == v for k, v in filters.items())]


def table(**filters):
    """All rows (optionally only those matching filters, e.g. lab='01') as a pandas DataFrame."""
    import pandas as pd

    found = rows(**filters)
    return pd.DataFrame(found, columns=list(dict.fromkeys(COLUMNS + tuple(k for r in found for k in r))))


def plot(ax=None, **filters):
    """Perplexity (log scale) against weight size: the quality-vs-size picture every lab adds points to."""
    import matplotlib.pyplot as plt

    df = table(**filters).dropna(subset=["weight_mb", "ppl"])
    ax = ax or plt.subplots()[1]
    for method, part in df.groupby("method"):
        ax.scatter(part["weight_mb"], part["ppl"], label=method, s=30)
        for _, r in part.iterrows():
            label = f"{r['bits']}b" + (f"/g{r['group_size']}" if r["group_size"] not in (None, "") else "")
            ax.annotate(label, (r["weight_mb"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="weight memory (MB)", ylabel="WikiText-2 perplexity", yscale="log", title="Quality vs size")
    ax.legend(fontsize=8)
    return ax
