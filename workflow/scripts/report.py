"""Render the summary as one self-contained HTML file and a markdown twin.

Usage: report.py --summary results/summary.json --plots results/plots \
                 --out-html results/report.html --out-md results/report.md

The HTML has inline CSS and the plots as base64 data URIs, so it opens from disk with no server
and fetches nothing. Every string that came from git, the config or a log is HTML-escaped: a
branch may be named ``<script>…</script>``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from aggregate import build_tables, fmt_num, fmt_pct, markdown_table, md_cell, short, write_atomic

VERDICT_COLORS = {"PASS": "#1e7b34", "FAIL": "#b3261e", "INCOMPLETE": "#9a6700"}
BAD = ("FAILED", "MISSING", "FAIL", "slower", "NOT TRUSTWORTHY")
GOOD = ("pass", "faster")

# Which plots belong to which section, with the caption shown above each.
SECTION_PLOTS = {
    "decode": [("decode_latency.png", "Decode latency vs context (band: IQR of samples; bars: CI of the median)"),
               ("decode_delta.png", "Median delta vs the baseline with its CI; dotted lines: tolerance")],
    "training": [("training_loss.png", "Loss per step (solid: NSA, dashed: dense twin)"),
                 ("training_throughput.png", "Tokens/s after warm-up, NSA vs dense")],
    "memory": [("memory.png", "Workspace bytes reserved (with growth events) and allocator peak")],
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#1b1b1b;padding:0 1em;line-height:1.4}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.85em}
th,td{border:1px solid #d0d0d0;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.bad td{background:#fdecea}tr.good td{background:#eef7ee}
.verdict{display:inline-block;color:#fff;font-weight:bold;padding:.3em .9em;border-radius:4px;font-size:1.3em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em;max-height:30em}
code{background:#f3f3f3;padding:0 .2em}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:.9em}details{margin:.4em 0}
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    for row in rows:
        cls = "bad" if any(c in BAD for c in row) else ("good" if any(c in GOOD for c in row) else "")
        out.append(f'<tr class="{cls}">' + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def failure_logs(rows: list[dict], describe) -> list[tuple[str, str]]:
    """(title, log tail or error) for every failed row, each distinct log once."""
    seen, out = set(), []
    for r in rows:
        if r.get("status") in ("ok", None):
            continue
        # Jobs that never ran have no log; their error is in the table already.
        text = r.get("log_tail")
        if not text:
            continue
        key = (describe(r), text)
        if key in seen:
            continue
        seen.add(key)
        body = text if not r.get("error") or r.get("error") in text else f"{r['error']}\n{text}"
        out.append((f"{describe(r)}: {r.get('status')}", body))
    return out


def html_logs(logs: list[tuple[str, str]]) -> str:
    return "\n".join(f"<details open><summary>{esc(t)} — log tail</summary><pre>{esc(b)}</pre></details>"
                     for t, b in logs)


def md_logs(logs: list[tuple[str, str]]) -> str:
    parts = []
    for t, b in logs:
        fence = "`" * max(3, _longest_backtick_run(b) + 1)  # a fence the log itself cannot close
        parts.append(f"**{md_cell(t)}** (log tail):\n\n{fence}\n{b}\n{fence}\n")
    return "\n".join(parts)


def _longest_backtick_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def plot_html(plots_dir: Path | None, name: str, caption: str, skipped: dict) -> str:
    path = plots_dir / name if plots_dir else None
    if path is None or not path.is_file():
        why = skipped.get(name, "not drawn")
        return f'<p class="note">({esc(caption)}: no plot, {esc(why)})</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def headline(s: dict) -> list[str]:
    """Key numbers per compared run, in words (plain text; the renderers escape it)."""
    lines = []
    runs = {}
    for r in s["decode"]["rows"]:
        if r.get("status") == "ok" and r.get("delta_pct") is not None:
            runs.setdefault((r["variant"], r["reserve"]), []).append(r)
    base = s["baseline"]
    sha_of = {v["name"]: v["sha"] for v in s["variants"]}
    # Runs of the same commit and config as one listed already (A/A twins) add nothing here.
    covered = {(base["sha"], base["reserve"])}
    for (variant, reserve), rows in runs.items():
        if (sha_of.get(variant), reserve) in covered and (variant, reserve) != (base["variant"], base["reserve"]):
            continue
        covered.add((sha_of.get(variant), reserve))
        ds = [r["delta_pct"] for r in rows]
        calls = sorted({r["call"] for r in rows})
        lines.append(f"Decode {variant} / {reserve} vs {base['variant']} / {base['reserve']}: median delta "
                     f"{fmt_pct(min(ds))} to {fmt_pct(max(ds))} over {len(rows)} context × mode cells; "
                     f"calls: {', '.join(calls)}")
    aa = [r for r in s["decode"]["aa"] if r.get("delta_pct") is not None]
    # One line per timing mode: on a GPU the graph mode is judged and eager is host-bound.
    for mode in sorted({r["mode"] for r in aa}):
        rows = [r for r in aa if r["mode"] == mode]
        worst = max(rows, key=lambda r: abs(r["delta_pct"]))
        lines.append(f"A/A ({worst['variant_a']} vs {worst['variant_b']}, same commit, {mode}): max |median delta| "
                     f"{abs(worst['delta_pct']):.2f}%, calls: {', '.join(sorted({r['call'] for r in rows}))}")
    seen = set()
    for r in s["training"]["rows"]:
        if (r["sha"], r["reserve"]) in seen:
            continue
        seen.add((r["sha"], r["reserve"]))
        if r.get("status") == "ok" and r.get("tokens_per_s") is not None:
            ratio = r.get("nsa_over_dense")
            lines.append(f"Training {r['variant']} / {r['reserve']}: {r['tokens_per_s']:.4g} tokens/s"
                         + (f" ({ratio:.2f}× dense)" if ratio else "")
                         + (f", {fmt_pct(r.get('delta_pct'))} vs baseline ({r.get('call')})" if r.get("delta_pct") is not None else "")
                         + f"; loss {fmt_num(r['loss_first'])} → {fmt_num(r['loss_last'])}"
                         + ("" if r["loss_fell"] else " (did NOT fall)") + (" NaN!" if r["nan"] else ""))
    env = s["memory"].get("recommended_env") or {}
    if env:
        lines.append("Recommended reserves for the measured workloads: "
                     + " ".join(f"{k}={v}" for k, v in env.items()))
    return lines


def _describe_run(r):
    return " / ".join(str(r[k]) for k in ("variant", "reserve") if r.get(k) is not None)


def sections(s: dict) -> list[dict]:
    """The report as a list of sections: title, paragraphs, tables, logs, plots (format-neutral)."""
    t = build_tables(s)
    acc = s.get("acceptance_settings", {})
    base = s["baseline"]
    dec = s["decode"]
    timer = dec.get("timer")
    timer_note = {"cuda_events": "CUDA events (device time, no host timing)",
                  "perf_counter": "time.perf_counter around synchronised steps (CPU)"}.get(timer, f"{timer}")
    out = []
    out.append({"id": "summary", "title": "Summary",
                "verdict": s["verdict"],
                "items": s["reasons"],
                "paras": [(f"Baseline: {base['variant']} / {base['reserve']} ({short(base['sha'])}). "
                          f"Device: {s.get('device')}. Repository: {s.get('repo')}.")],
                "list2": headline(s)})
    if s["jobs"]:
        out.append({"id": "failed", "title": "Failed or missing jobs", "tables": [("", t["jobs"])],
                    "logs": failure_logs(s["jobs"], lambda j: f"{j['stage']} {_describe_run(j)}".strip())})
    env_logs = failure_logs(s["environment"], lambda r: f"environment {r['variant']}")
    common = ", ".join(f"{k}={v}" for k, v in (s.get("common_env") or {}).items()) or "(none)"
    reserves = [[name, ", ".join(f"{k}={v}" for k, v in (cfg or {}).items()) or "(no variables: grow on demand)"]
                for name, cfg in (s.get("reserve_configs") or {}).items()]
    # Which implementation each branch dispatched to, and why, per commit (nsa.backends()).
    routes, seen = [], set()
    for r in s["environment"]:
        if r["sha"] in seen:
            continue
        seen.add(r["sha"])
        routes += [[r["variant"], short(r["sha"]), b, str(route), str(r["backend_reasons"].get(b) or "")]
                   for b, route in r["backends"].items()]
    out.append({"id": "environment", "title": "Environment",
                "tables": [("Variants", t["variants"]), ("Per commit", t["environment"]),
                           ("Backend routes (nsa.backends())", (["variant", "sha", "branch", "route", "reason"], routes)),
                           ("Reserve configurations", (["name", "variables"], reserves))],
                "paras": [f"Common environment for every job: {common}"],
                "logs": env_logs,
                "freeze": [(r["variant"], r["pip_freeze"]) for r in s["environment"] if r["pip_freeze"]]})
    out.append({"id": "correctness", "title": "Correctness",
                "paras": [("Each commit's own test suites, run in its environment with each reserve "
                          "configuration's variables (counts from the JUnit XML).")],
                "tables": [("", t["correctness"])],
                "logs": failure_logs(s["correctness"], lambda r: f"{r['suite']} {_describe_run(r)}")})
    out.append({"id": "decode", "title": "Decode microbenchmark",
                "paras": [(f"Timer: {timer_note}; rounds: {dec.get('rounds')}. Medians of raw per-step samples; "
                          f"delta = median / baseline median − 1; {int(acc.get('ci_level', .99) * 100)}% CI of the "
                          f"delta by seeded bootstrap of both samples; p from a two-sided Mann-Whitney U test. "
                          f"A change is called only when p < {acc.get('alpha')} and |delta| > "
                          f"{acc.get('decode_tolerance_pct')}% (as asv does).")],
                "tables": [("", t["decode"]),
                           ("A/A: the same commit measured as two variants (any difference is noise)", t["aa"])],
                "logs": failure_logs(dec["rows"], _describe_run),
                "plots": SECTION_PLOTS["decode"]})
    out.append({"id": "training", "title": "Training",
                "paras": [(f"TinyLM on synthetic data, NSA and its dense-attention twin in the same job. Tokens/s "
                          f"after warm-up (median, CI of the median); loss compared as the mean of the first and "
                          f"last windows; it must fall by ≥ {acc.get('min_loss_drop_pct')}% and never be NaN.")],
                "tables": [("", t["training"])],
                "logs": failure_logs(s["training"]["rows"], _describe_run),
                "plots": SECTION_PLOTS["training"]})
    env_lines = " ".join(f"{k}={v}" for k, v in (s["memory"].get("recommended_env") or {}).items())
    out.append({"id": "memory", "title": "Memory",
                "paras": [("Workspace counters (nsa.workspace_stats()) and allocator counters over steady-state "
                          "decode and training. Recommended reserves: each high-water mark rounded up to a power "
                          "of two, for the workload named in the row; they hold only for that workload.")]
                + ([f"To pre-size for every measured workload: {env_lines}"] if env_lines else []),
                "tables": [("Recommended reserves", t["reserves"]), ("Workspaces", t["workspaces"]),
                           ("Allocator", t["allocator"])],
                "plots": SECTION_PLOTS["memory"]})
    ref = s["equivalence"]["reference"]
    out.append({"id": "equivalence", "title": "Equivalence",
                "paras": [(f"Identical weights and inputs through every commit × reserve config; max abs diff of "
                          f"the outputs against {ref['variant']} / {ref['reserve']} ({short(ref['sha'])}). Reserve "
                          f"configs must match their commit's first config bit for bit; commits must be within "
                          f"{acc.get('equiv_atol')}.")],
                "tables": [("", t["equivalence"])],
                "logs": failure_logs(s["equivalence"]["rows"], _describe_run)})
    out.append({"id": "acceptance", "title": "Acceptance checklist",
                "tables": [("", t["acceptance"])],
                "paras": [f"{c['criterion']}: {c['detail']}" for c in s["acceptance"] if c.get("detail")]})
    return out


def render_html(s: dict, plots_dir: Path | None) -> str:
    skipped = {}
    if plots_dir and (plots_dir / "index.json").is_file():
        try:
            skipped = json.loads((plots_dir / "index.json").read_text()).get("skipped", {})
        except ValueError:
            skipped = {}
    secs = sections(s)
    color = VERDICT_COLORS.get(s["verdict"], "#555")
    body = ["<h1>NSA validation report</h1>",
            f'<p class="note">Generated {esc(s.get("generated"))} · '
            + " · ".join(f'<a href="#{esc(sec["id"])}">{esc(sec["title"])}</a>' for sec in secs) + "</p>"]
    for sec in secs:
        body.append(f'<h2 id="{esc(sec["id"])}">{esc(sec["title"])}</h2>')
        if "verdict" in sec:
            body.append(f'<p><span class="verdict" style="background:{color}">{esc(sec["verdict"])}</span></p>')
            body.append("<p>Why:</p><ul>" + "".join(f"<li>{esc(i)}</li>" for i in sec["items"]) + "</ul>")
        for p in sec.get("paras", []):
            body.append(f"<p>{esc(p)}</p>")
        if sec.get("list2"):
            body.append("<p>Key numbers:</p><ul>" + "".join(f"<li>{esc(i)}</li>" for i in sec["list2"]) + "</ul>")
        for title, (header, rows) in sec.get("tables", []):
            if title:
                body.append(f"<h3>{esc(title)}</h3>")
            body.append(html_table(header, rows))
        if sec.get("logs"):
            body.append(html_logs(sec["logs"]))
        for name, packages in sec.get("freeze", []):
            body.append(f"<details><summary>pip freeze of {esc(name)} ({len(packages)} packages)</summary>"
                        f"<pre>{esc(chr(10).join(packages))}</pre></details>")
        for name, caption in sec.get("plots", []):
            body.append(plot_html(plots_dir, name, caption, skipped))
    title = f"NSA validation: {s['verdict']}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_md(s: dict, plots_dir: Path | None, md_dir: Path | None = None) -> str:
    secs = sections(s)
    out = ["# NSA validation report", "", f"Generated {md_cell(s.get('generated'))}", ""]
    for sec in secs:
        out += [f"## {sec['title']}", ""]
        if "verdict" in sec:
            out += [f"**Verdict: {sec['verdict']}**", "", "Why:", ""] + [f"- {md_cell(i)}" for i in sec["items"]] + [""]
        for p in sec.get("paras", []):
            out += [md_cell(p), ""]
        if sec.get("list2"):
            out += ["Key numbers:", ""] + [f"- {md_cell(i)}" for i in sec["list2"]] + [""]
        for title, (header, rows) in sec.get("tables", []):
            if title:
                out += [f"### {md_cell(title)}", ""]
            out += [markdown_table(header, rows)]
        if sec.get("logs"):
            out += [md_logs(sec["logs"])]
        for name, caption in sec.get("plots", []):
            if plots_dir and (plots_dir / name).is_file():
                # A link relative to the markdown file, so results/ can be moved or zipped whole.
                rel = os.path.relpath(plots_dir / name, md_dir) if md_dir else str(plots_dir / name)
                out += [f"![{md_cell(caption)}]({Path(rel).as_posix()})", ""]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary", default="results/summary.json")
    ap.add_argument("--plots", default="results/plots")
    ap.add_argument("--out-html", default="results/report.html")
    ap.add_argument("--out-md", default="results/report.md")
    args = ap.parse_args(argv)
    s = json.loads(Path(args.summary).read_text())
    plots_dir = Path(args.plots).resolve() if args.plots else None
    write_atomic(Path(args.out_html), render_html(s, plots_dir))
    write_atomic(Path(args.out_md), render_md(s, plots_dir, Path(args.out_md).resolve().parent))
    print(f"report: {args.out_html} ({s['verdict']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
