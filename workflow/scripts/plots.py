"""Plots of the summary: decode latency and deltas, training loss and throughput, memory.

Usage: plots.py --summary results/summary.json --out results/plots

Each plot is drawn only when the summary holds data for it; a missing section skips its plot
(recorded in ``index.json`` with the reason) instead of failing the report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on CI or GPU hosts
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import write_atomic

OK = "ok"
CALL_COLORS = {"faster": "#2a9d3f", "slower": "#d1362f", "no significant change": "#7f7f7f"}


def label(text) -> str:
    """A legend/tick label that matplotlib shows verbatim (no mathtext, not hidden by a leading _)."""
    text = str(text).replace("$", r"\$")
    return ("\u200b" + text) if text.startswith("_") else text


def _num(x):
    """Numbers only: the summary writes NaN/inf as strings."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return float(x)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def decode_latency(s: dict, path: Path) -> str | None:
    rows = [r for r in s.get("decode", {}).get("rows", []) if r.get("status") == OK and r.get("median_ms") is not None]
    if not rows:
        return "no decode results"
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = {}
        for r in rows:
            if r["mode"] == mode and isinstance(r["context"], (int, float)):
                series.setdefault((r["variant"], r["reserve"]), []).append(r)
        for (variant, reserve), pts in series.items():
            pts.sort(key=lambda r: r["context"])
            x = [r["context"] for r in pts]
            med = [r["median_ms"] for r in pts]
            line, = ax.plot(x, med, marker="o", label=label(f"{variant} / {reserve}"))
            q1 = [_num(r.get("q1_ms")) for r in pts]
            q3 = [_num(r.get("q3_ms")) for r in pts]
            if None not in q1 and None not in q3:  # IQR: the spread of single samples
                ax.fill_between(x, q1, q3, color=line.get_color(), alpha=0.15, linewidth=0)
            lo = [_num(r.get("median_ci_low_ms")) for r in pts]
            hi = [_num(r.get("median_ci_high_ms")) for r in pts]
            if None not in lo and None not in hi:  # CI: the uncertainty of the median itself
                ax.errorbar(x, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                            fmt="none", ecolor=line.get_color(), capsize=3)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step, median ms")
        ax.set_title(label(f"decode latency ({mode}); band: IQR, bars: CI of median"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    return None


def decode_delta(s: dict, path: Path) -> str | None:
    rows = [r for r in s.get("decode", {}).get("rows", [])
            if r.get("status") == OK and _num(r.get("delta_pct")) is not None]
    if not rows:
        return "no decode comparisons with the baseline"
    rows.sort(key=lambda r: (r["variant"], r["reserve"], r["mode"], r["context"] if isinstance(r["context"], (int, float)) else 0))
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(rows) + 1.2)))
    y = list(range(len(rows)))
    d = [_num(r["delta_pct"]) for r in rows]
    colors = [CALL_COLORS.get(r.get("call"), "#999999") for r in rows]
    ax.barh(y, d, color=colors)
    lo = [_num(r.get("ci_low_pct")) for r in rows]
    hi = [_num(r.get("ci_high_pct")) for r in rows]
    for yi, di, a, b in zip(y, d, lo, hi):
        if a is not None and b is not None:
            ax.errorbar([di], [yi], xerr=[[di - a], [b - di]], fmt="none", ecolor="black", capsize=2, linewidth=1)
    tol = _num(s.get("acceptance_settings", {}).get("decode_tolerance_pct"))
    if tol:
        for t in (-tol, tol):
            ax.axvline(t, color="#d1362f", linestyle=":", linewidth=1)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([label(f"{r['variant']} / {r['reserve']} · {r['context']} · {r['mode']}") for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("median delta vs baseline (%); bars: CI; dotted: tolerance")
    base = s.get("baseline", {})
    ax.set_title(label(f"decode vs {base.get('variant')} / {base.get('reserve')}"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return None


def training_loss(s: dict, path: Path) -> str | None:
    curves = [c for c in s.get("training", {}).get("curves", []) if c.get("loss")]
    if not curves:
        return "no training results"
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for c in curves:
        loss = [_num(v) if _num(v) is not None else math.nan for v in c["loss"]]
        line, = ax.plot(range(1, len(loss) + 1), loss, label=label(f"{c['variant']} / {c['reserve']} (NSA)"))
        dense = [_num(v) if _num(v) is not None else math.nan for v in c.get("dense_loss") or []]
        if dense:
            ax.plot(range(1, len(dense) + 1), dense, linestyle="--", color=line.get_color(), alpha=0.6,
                    label=label(f"{c['variant']} / {c['reserve']} (dense)"))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("TinyLM loss (solid: NSA, dashed: dense twin)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


def training_throughput(s: dict, path: Path) -> str | None:
    rows = [r for r in s.get("training", {}).get("rows", []) if r.get("status") == OK and _num(r.get("tokens_per_s"))]
    if not rows:
        return "no training results"
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4.2))
    x = list(range(len(rows)))
    w = 0.38
    nsa = [_num(r["tokens_per_s"]) for r in rows]
    dense = [_num(r.get("dense_tokens_per_s")) or 0.0 for r in rows]
    lo = [_num(r.get("tokens_per_s_ci_low")) for r in rows]
    hi = [_num(r.get("tokens_per_s_ci_high")) for r in rows]
    ax.bar([i - w / 2 for i in x], nsa, w, label="NSA", color="#1f77b4")
    ax.bar([i + w / 2 for i in x], dense, w, label="dense", color="#aaaaaa")
    for i, m, a, b in zip(x, nsa, lo, hi):
        if a is not None and b is not None:
            ax.errorbar([i - w / 2], [m], yerr=[[m - a], [b - m]], fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels([label(f"{r['variant']}\n{r['reserve']}") for r in rows], fontsize=7)
    ax.set_ylabel("tokens/s (median after warm-up)")
    ax.set_title("training throughput: NSA vs dense twin (bars: CI of median)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def memory(s: dict, path: Path) -> str | None:
    mem = s.get("memory", {})
    ws = [r for r in mem.get("workspace_rows", []) if _num(r.get("bytes_reserved")) is not None]
    alloc = [r for r in mem.get("allocator_rows", []) if _num(r.get("peak_bytes")) is not None]
    if not ws and not alloc:
        return "no memory counters"
    panels = [p for p in (("ws", ws), ("alloc", alloc)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], panels):
        if kind == "ws":
            runs = sorted({(r["source"], r["variant"], r["reserve"]) for r in rows})
            spaces = sorted({r["workspace"] for r in rows})
            width = 0.8 / max(1, len(spaces))
            for j, space in enumerate(spaces):
                vals = {(r["source"], r["variant"], r["reserve"]): _num(r["bytes_reserved"]) / 2**20
                        for r in rows if r["workspace"] == space}
                growth = {(r["source"], r["variant"], r["reserve"]): _num(r.get("growth_events")) for r in rows
                          if r["workspace"] == space}
                xs = [i + (j - (len(spaces) - 1) / 2) * width for i in range(len(runs))]
                bars = ax.bar(xs, [vals.get(k, 0.0) for k in runs], width, label=label(space))
                for b, k in zip(bars, runs):
                    g = growth.get(k)
                    if g is not None:
                        ax.annotate(f"{int(g)}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                                    va="bottom", fontsize=6)
            ax.set_xticks(range(len(runs)))
            ax.set_xticklabels([label(f"{a}\n{b}\n{c}") for a, b, c in runs], fontsize=6)
            ax.set_ylabel("workspace MiB reserved")
            ax.set_title("workspaces (numbers: growth events)", fontsize=10)
            ax.legend(fontsize=7)
        else:
            ax.bar(range(len(rows)), [_num(r["peak_bytes"]) / 2**20 for r in rows], color="#8c564b")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([label(f"{r['source']}\n{r['variant']}\n{r['reserve']}") for r in rows], fontsize=6)
            ax.set_ylabel("allocator peak MiB")
            ax.set_title("allocator peak memory", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return None


PLOTS = {
    "decode_latency.png": decode_latency,
    "decode_delta.png": decode_delta,
    "training_loss.png": training_loss,
    "training_throughput.png": training_throughput,
    "memory.png": memory,
}


def make_plots(s: dict, out: Path) -> dict:
    """Draw every plot the summary has data for; returns {file: None (drawn) or why skipped}."""
    out.mkdir(parents=True, exist_ok=True)
    index = {}
    for name, fn in PLOTS.items():
        path = out / name
        try:
            index[name] = fn(s, path)
        except Exception as e:  # noqa: BLE001 - one bad plot must not cost the whole report
            plt.close("all")
            index[name] = f"plot failed: {type(e).__name__}: {e}"
        if index[name] is not None and path.exists():
            path.unlink()  # a stale plot from an earlier run would misrepresent this one
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="results/summary.json")
    ap.add_argument("--out", default="results/plots")
    args = ap.parse_args(argv)
    s = json.loads(Path(args.summary).read_text())
    out = Path(args.out)
    index = make_plots(s, out)
    write_atomic(out / "index.json", json.dumps({"drawn": [k for k, v in index.items() if v is None],
                                                 "skipped": {k: v for k, v in index.items() if v is not None}},
                                                indent=1) + "\n")
    for k, v in index.items():
        print(f"{k}: {'drawn' if v is None else 'skipped (' + v + ')'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
