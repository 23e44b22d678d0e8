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
from matplotlib.ticker import FuncFormatter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_atomic

# Figures are shown at most ~870 px wide in the report: text sized for that, not for a poster.
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "xtick.labelsize": 9,
                     "ytick.labelsize": 9})

OK = "ok"
CALL_COLORS = {"faster": "#2a9d3f", "slower": "#d1362f", "no change": "#4a4a4a", "within noise": "#9a6700"}


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


def _save(fig, path: Path, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")  # legends placed outside the axes included
    plt.close(fig)
    tmp.replace(path)


def _log_if_wide(ax, values, axis="y") -> bool:
    """Log scale when the values span 10x or more (dense and NSA on one linear axis hide NSA)."""
    vals = [v for v in values if v is not None and v > 0]
    if vals and max(vals) / min(vals) >= 10:
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        # Plain numbers (2, 5, 20) read faster than 2×10⁰ on a log axis.
        target = ax.yaxis if axis == "y" else ax.xaxis
        target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        return True
    return False


def _legend_below(fig, ax, ncol=3) -> None:
    """The legend under the axes, never on the data."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        fig.tight_layout()
        return
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)), frameon=False)
        rows = (len(labels) + ncol - 1) // ncol
        fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))


def decode_latency(s: dict, path: Path) -> str | None:
    cells = [c for c in s.get("decode", {}).get("cells", []) if _num(c.get("value")) is not None
             and isinstance(c.get("context"), (int, float))]
    if not cells:
        return "no decode results"
    modes = [m for m in s["decode"].get("modes") or sorted({c["mode"] for c in cells}) if any(c["mode"] == m for c in cells)]
    fig, axes = plt.subplots(1, len(modes), figsize=(3.4 * len(modes) + 0.8, 3.8), squeeze=False)
    judged = set(s["decode"].get("judged_modes") or modes)
    for ax, mode in zip(axes[0], modes):
        series = {}
        for c in cells:
            if c["mode"] == mode:
                key = "reference (dense)" if c["kind"] == "reference" else f"{c['variant']} / {c['reserve']}"
                series.setdefault(key, []).append(c)
        for key, pts in series.items():
            pts.sort(key=lambda c: c["context"])
            x = [c["context"] for c in pts]
            y = [_num(c["value"]) for c in pts]
            err = [(_num(c.get("between_pct")) or 0.0) / 100 * v for c, v in zip(pts, y)]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label(key),
                        linestyle="--" if key.startswith("reference") else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c["context"] for pts in series.values() for c in pts}))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        _log_if_wide(ax, [_num(c["value"]) for c in cells if c["mode"] == mode])
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step, ms")
        ax.set_title(label(f"{mode}" + ("" if mode in judged else " (information)")), fontsize=10)
        ax.grid(alpha=0.3, which="both")
    _legend_below(fig, axes[0][0])
    _save(fig, path, tight=False)
    return None


def decode_delta(s: dict, path: Path) -> str | None:
    rows = [r for r in s.get("decode", {}).get("rows", [])
            if r.get("status") == OK and _num(r.get("delta_pct")) is not None]
    if not rows:
        return "no decode comparisons with the baseline"
    rows.sort(key=lambda r: (r["variant"], r["reserve"], r["mode"], r["context"] if isinstance(r["context"], (int, float)) else 0))
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.26 * len(rows) + 1.2)))
    y = list(range(len(rows)))
    for yi, r in zip(y, rows):
        thr = _num(r.get("threshold_pct")) or 0.0
        ax.fill_betweenx([yi - 0.45, yi + 0.45], -thr, thr, color="#dddddd", linewidth=0)
        d = _num(r["delta_pct"])
        a, b = _num(r.get("ci_low_pct")), _num(r.get("ci_high_pct"))
        color = CALL_COLORS.get(r.get("call"), "#7f7f7f") if r.get("judged", True) else "#bbbbbb"
        ax.plot([d], [yi], "o", color=color)
        if a is not None and b is not None:
            ax.plot([a, b], [yi, yi], color=color, linewidth=2)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels([label(f"{r['variant']} / {r['reserve']} · {r['context']} · {r['mode']}"
                              + ("" if r.get("judged", True) else " (info)")) for r in rows], fontsize=8)
    ax.invert_yaxis()
    span = max(abs(v) for r in rows for v in (_num(r.get("ci_low_pct")), _num(r.get("ci_high_pct")),
                                               _num(r["delta_pct"])) if v is not None)
    thr = max((_num(r.get("threshold_pct")) or 0.0) for r in rows)
    lo = min([-thr] + [v for r in rows for v in (_num(r.get("ci_low_pct")), _num(r["delta_pct"])) if v is not None])
    hi = max([thr] + [v for r in rows for v in (_num(r.get("ci_high_pct")), _num(r["delta_pct"])) if v is not None])
    if span > 100:
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(lo * 2 if lo < 0 else lo, hi * 2)  # room for the markers at the ends
    else:
        pad = 0.1 * (hi - lo or 1.0)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("change vs baseline (%), with CI; grey: ± threshold")
    base = s.get("baseline", {})
    ax.set_title(label(f"decode vs {base.get('variant')}"), fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return None


def training_loss(s: dict, path: Path) -> str | None:
    curves = [c for c in s.get("training", {}).get("curves", []) if c.get("loss")]
    if not curves:
        return "no training results"
    fig, ax = plt.subplots(figsize=(7, 4.0))
    for c in curves:
        loss = [_num(v) if _num(v) is not None else math.nan for v in c["loss"]]
        name = "reference (dense)" if c.get("reference") else f"{c['variant']} / {c['reserve']}"
        ax.plot(range(1, len(loss) + 1), loss, label=label(name), linestyle="--" if c.get("reference") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("TinyLM loss", fontsize=10)
    ax.grid(alpha=0.3)
    _legend_below(fig, ax)
    _save(fig, path, tight=False)
    return None


def training_throughput(s: dict, path: Path) -> str | None:
    cells = [c for c in s.get("training", {}).get("cells", []) if _num(c.get("value"))]
    if not cells:
        return "no training results"
    fig, ax = plt.subplots(figsize=(max(4.5, 0.9 * len(cells) + 2), 4.0))
    x = list(range(len(cells)))
    vals = [_num(c["value"]) for c in cells]
    err = [(_num(c.get("between_pct")) or 0.0) / 100 * v for c, v in zip(cells, vals)]
    colors = ["#aaaaaa" if c["kind"] == "reference" else "#1f77b4" for c in cells]
    ax.bar(x, vals, color=colors, yerr=err, capsize=3)
    ax.set_xticks(x)
    ax.set_xticklabels([label("reference\n(dense)" if c["kind"] == "reference" else f"{c['variant']}\n{c['reserve']}")
                        for c in cells], fontsize=8)
    if _log_if_wide(ax, vals):
        ax.set_ylabel("tokens/s (log scale)")
    else:
        ax.set_ylabel("tokens/s")
    ax.set_title("training throughput (bars: spread between processes)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return None


def memory(s: dict, path: Path) -> str | None:
    mem = s.get("memory", {})
    ws = [r for r in mem.get("workspace_rows", []) if _num(r.get("bytes_reserved")) is not None]
    alloc = [r for r in mem.get("allocator_rows", []) if _num(r.get("peak_bytes")) is not None]
    if not ws and not alloc:
        return "no memory counters"
    panels = [p for p in (("ws", ws), ("alloc", alloc)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels) + 0.8, 4.0), squeeze=False)
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
                                    va="bottom", fontsize=7)
            ax.set_xticks(range(len(runs)))
            ax.set_xticklabels([label(f"{a}\n{b}\n{c}") for a, b, c in runs], fontsize=7)
            ax.set_ylabel("workspace MiB reserved")
            ax.set_title("workspaces (numbers: growth events)", fontsize=10)
            ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
        else:
            ax.bar(range(len(rows)), [_num(r["peak_bytes"]) / 2**20 for r in rows], color="#8c564b")
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([label(f"{r['source']}\n{r['variant']}\n{r['reserve']}") for r in rows], fontsize=7)
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
