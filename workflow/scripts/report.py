"""Render the summary as one self-contained HTML file and a markdown twin.

Usage: report.py --summary results/summary.json --plots results/plots \
                 --out-html results/report.html --out-md results/report.md

The first screen is the verdict, its reasons in plain words, and one row per variant
(correctness, decode and training change with CI, equivalence, memory); the details follow, each
fact once (a failed job's log tail appears only under "Failed jobs"). The HTML has inline CSS and
the plots as base64 data URIs, so it opens from disk with no server and fetches nothing; it fits a
900 px wide window without sideways scrolling. Every string that came from git, the config or a
log is HTML-escaped: a branch may be named ``<script>…</script>``.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import write_atomic
from tables import build_tables, markdown_table, md_cell, short

VERDICT_COLORS = {"PASS": "#1e7b34", "FAIL": "#b3261e", "INCOMPLETE": "#9a6700", "INCONCLUSIVE": "#5b5b8a"}
# A cell reads as bad when it says one of these (whole words, case-sensitive where it matters).
# "not slower beyond ±15% (may be faster ...)" is the first screen's pass-side wording: not a bad cell.
BAD_CELL = re.compile(r"\b(FAIL|FAILED|MISSING|INCOMPLETE|INCONCLUSIVE|TOO NOISY|DIFFERS|(?<!not )slower|did not|not run)\b"
                      r"|≠| differ\b")
GOOD_CELL = re.compile(r"^(pass|passed|ok)\b")

PLOTS = {
    "decode": [("decode_latency.png", "Decode step per context: median over processes; bars: spread between "
                                      "processes. Log scale where runs differ 10× or more."),
               ("decode_delta.png", "Change vs the baseline with its CI; shaded: ± the threshold "
                                    "(max of tolerance and noise floor)")],
    "training": [("training_loss.png", "Loss per step (the reference: the same model with dense attention)"),
                 ("training_throughput.png", "Tokens/s per run (median over processes), reference included")],
    "memory": [("memory.png", "Workspace bytes reserved (numbers: growth events) and allocator peak")],
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1100px;
color:#1b1b1b;padding:0 1em;line-height:1.4;overflow-wrap:break-word}
h1{font-size:1.5em;margin-bottom:.3em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
h3{font-size:1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;margin:.5em 0;font-size:.82em;width:100%;table-layout:auto}
th,td{border:1px solid #d0d0d0;padding:.25em .45em;text-align:left;vertical-align:top}
td.long{overflow-wrap:anywhere}
th{background:#f3f3f3}td.bad{background:#fdecea}td.good{background:#eef7ee}
.verdict{display:inline-block;color:#fff;font-weight:bold;padding:.25em .8em;border-radius:4px;font-size:1.2em}
ul.reasons{margin:.4em 0 .8em 0;padding-left:1.3em}ul.reasons li{margin:.15em 0}
pre{background:#f6f6f6;padding:.6em;font-size:.8em;max-height:30em;overflow-y:auto;white-space:pre-wrap;
word-break:break-all}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;height:auto;border:1px solid #eee;box-sizing:border-box;display:block}
.note{color:#555;font-size:.9em}details{margin:.4em 0}summary{cursor:pointer}
"""


def esc(x) -> str:
    return html.escape("" if x is None else str(x), quote=True)


# Columns of free text the user wrote (a commit subject saying "fix FAIL ..."): never coloured.
FREE_TEXT_COLUMNS = {"ref", "subject"}


def cell_class(text: str, judged: bool = True) -> str:
    # Only a cell with a long unbreakable token (a path, a URL) may break anywhere: letting every
    # cell do so would let the table squeeze short columns into one letter per line.
    verdict = "bad" if BAD_CELL.search(text) else "good" if GOOD_CELL.search(text) else ""
    classes = [verdict if judged else ""]
    if any(len(word) > 28 for word in text.split()):
        classes.append("long")
    joined = " ".join(c for c in classes if c)
    return f' class="{joined}"' if joined else ""


def html_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return '<p class="note">(no rows)</p>'
    out = ["<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead><tbody>"]
    judged = [h not in FREE_TEXT_COLUMNS for h in header]
    for row in rows:
        out.append("<tr>" + "".join(f"<td{cell_class(str(c), j)}>{esc(c)}</td>" for c, j in zip(row, judged)) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def failure_logs(jobs: list[dict]) -> list[tuple[str, str]]:
    """(title, log tail) per failed job, each distinct log once."""
    seen, out = set(), []
    for j in jobs:
        text = j.get("log_tail")
        if not text or text in seen:
            continue
        seen.add(text)
        where = " / ".join(str(j[k]) for k in ("variant", "reserve") if j.get(k))
        body = text if not j.get("error") or j["error"] in text else f"{j['error']}\n{text}"
        out.append((f"{j['stage']} {where}: {j['status']}".replace("  ", " "), body))
    return out


def _longest_backtick_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best


def plot_html(plots_dir: Path | None, name: str, caption: str, skipped: dict) -> str:
    path = plots_dir / name if plots_dir else None
    if path is None or not path.is_file():
        return f'<p class="note">({esc(caption)}: no plot, {esc(skipped.get(name, "not drawn"))})</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def _generations_words(dec: dict) -> str:
    """How the decode workers lived: in generations of ``alive`` per run, compared in pairs."""
    alive, k = (dec.get("sizes") or {}).get("alive"), dec.get("processes")
    if not dec.get("paired") or not isinstance(alive, int) or not k:
        return ""
    return f" ({alive} of each run alive at a time: {-(-k // alive)} generations, compared in pairs)"


def run_facts(s: dict) -> list[str]:
    """One line each: what was compared, on what, under which conditions."""
    base = s["baseline"]
    impl = s.get("implementation") or {}
    dec = s["decode"]
    facts = [f"Warning: {w}" for w in s.get("warnings") or []]
    facts += [f"Baseline: variant {base['variant']} ({short(base['sha'])}); reference reserve config: {base['reserve']} "
             f"(the first declared). Device {s.get('device')}"
             + (f", implementation {impl.get('adapter')}" if impl.get("adapter") else "")
             + (f", {dec.get('processes')} worker processes per run" if dec.get("processes") else "")
             + _generations_words(dec)
             + (f", {dec.get('rounds')} rounds" if dec.get("rounds") else "") + f". Repository: {s.get('repo')}."]
    host = (s.get("conditions", {}).get("decode") or {}).get("host") or {}
    if host:
        bb, ba = host.get("busy_cores_before"), host.get("busy_cores_after")
        busy = [f"{bb:.1f} before, {ba:.1f} after decode"] \
            if isinstance(bb, (int, float)) and isinstance(ba, (int, float)) else []
        during = {name: ((s.get("conditions", {}).get(stage) or {}).get("host") or {}).get("other_cores_during")
                  for stage, name in (("decode", "decode"), ("train", "training"))}
        during = [f"{v:.2f} during {name}" for name, v in during.items() if isinstance(v, (int, float))]
        if during:
            busy.append("on average " + " and ".join(during))
        load = f"; cores busy with other work {', '.join(busy)}" if busy else ""
        steal = host.get("steal_pct")
        steal = f"; hypervisor steal {steal:.1f}% of CPU time during decode" if isinstance(steal, (int, float)) else ""
        malloc = "; freed memory kept for reuse (glibc malloc thresholds)" if host.get("malloc_reuse") else ""
        facts.append(f"Host: {host.get('cpu_model')}, {host.get('cores')} cores, threads per worker: "
                     f"{host.get('threads')}{load}{steal}{malloc}.")
    gpu = (s.get("conditions", {}).get("decode") or {}).get("gpu_before")
    if isinstance(gpu, dict) and gpu:
        facts.append("GPU before decode: " + ", ".join(f"{k} {v}" for k, v in gpu.items()
                                                       if not isinstance(v, (dict, list))) + ".")
    judged = dec.get("judged_modes") or []
    others = [m for m in dec.get("modes") or [] if m not in judged]
    if judged:
        facts.append(f"Decode judged in {', '.join(judged)} mode"
                     + (f"; {', '.join(others)} reported as information (host-bound)" if others else "")
                     + (f" ({dec['judged_note']})" if dec.get("judged_note") else "") + ".")
    return facts


METHOD = ("Every run (commit × reserve config, and a reference workload: the harness's own dense attention, "
          "identical code everywhere) is measured by several worker processes, interleaved in rounds. A process "
          "is summarised by its median; a cell by the mean of its processes' medians. A change is the ratio of "
          "two cells; its CI comes from a hierarchical bootstrap (resample processes, then samples within "
          "them; paired where the processes ran in generations, so what one generation shifts for every run "
          "cancels), and it is called only when the whole CI lies beyond ± max(tolerance, noise floor). The noise "
          "floor per mode is the larger of the A/A twins' largest |delta| and what the spread between processes, "
          "beyond what their own samples' scatter explains, implies for two cells of identical code; that "
          "spread is pooled over every cell of the mode (the median cell's: one process standing apart does "
          "not speak for the run), the reference workload's included. 'No change' needs the whole CI "
          "inside the threshold; a CI reaching past it on the worse side is 'uncertain'. A floor above the "
          "tolerance, or an uncertain cell, makes the verdict INCONCLUSIVE, never PASS; only a change beyond even "
          "that noise makes it FAIL.")


def sections(s: dict) -> list[dict]:
    """The report as sections of paragraphs, tables, plots and logs (format-neutral)."""
    t = build_tables(s)
    acc = s["acceptance_settings"]
    dec = s["decode"]
    ref = s["equivalence"]["reference"]
    out = [{"id": "summary", "title": "Summary", "verdict": s["verdict"], "items": s["reasons"],
            "tables": [("", t["overview"])], "paras": run_facts(s),
            "warnings": (s.get("conditions") or {}).get("warnings") or []},
           {"id": "variants", "title": "Variants", "tables": [("", t["variants"])]},
           {"id": "placement", "title": "Where the jobs ran",
            "paras": ["Each timing job measures every run it compares on one node (one GPU) in one job; outputs "
                      "compared across equivalence jobs must come from one GPU model, or they are not compared."],
            "tables": [("", t["placement"])]},
           {"id": "correctness", "title": "Correctness",
            "paras": ["Each commit's own suites, in its environment, under each reserve config."],
            "tables": [("", t["correctness"])]
            + ([("Decode matches forward (prefill + decode steps vs one forward pass)", t["consistency"])]
               if s.get("consistency") is not None else [])}]
    lvl = f"{int(round(acc['ci_level'] * 100))}%"
    out.append({"id": "decode", "title": "Decode",
                "paras": [f"Timer: {dec.get('timer')}. Deltas with their {lvl} CI; calls as in "
                          f"'Method'. Tolerance {acc.get('decode_tolerance_pct')}%."],
                "tables": [("Noise floor per timing mode", t["decode_noise"]),
                           ("Each commit vs the baseline, same reserve config", t["decode_vs_baseline"]),
                           (f"Reserve configs vs {s['reserves'][0] if s['reserves'] else ''}, within each commit",
                            t["decode_reserves"]),
                           ("A/A: one commit listed twice (any difference is noise)", t["decode_aa"]),
                           ("Every cell: spread within and between processes", t["decode_cells"])],
                "plots": PLOTS["decode"]})
    out.append({"id": "training", "title": "Training",
                "paras": [f"TinyLM on synthetic data; tokens/s after warm-up. Tolerance "
                          f"{acc.get('train_tolerance_pct')}%; the loss must fall by ≥ "
                          f"{acc.get('min_loss_drop_pct')}% and never be NaN."],
                "tables": [("Runs", t["training_runs"]), ("Noise floor", t["training_noise"]),
                           ("Each commit vs the baseline", t["training_vs_baseline"]),
                           ("Reserve configs within each commit", t["training_reserves"]),
                           ("A/A", t["training_aa"]), ("Spread within and between processes", t["training_cells"])],
                "plots": PLOTS["training"]})
    out.append({"id": "equivalence", "title": "Equivalence",
                "paras": [f"Identical weights and inputs through every commit × reserve config, in float32 (TF32 "
                          f"off), compared with {ref['variant']} / {ref['reserve']}: outputs within "
                          f"{acc.get('equiv_atol')}, selected block indices identical where the implementation "
                          f"exposes them, and each reserve config bit for bit equal to its commit's first config."]
                + ([f"On {s.get('device')} the benchmarks run in {s['bench_dtype']}, where an implementation may "
                    "take other kernels than in float32 (this repository's Triton kernels take float16/bfloat16 "
                    "only): those are not compared across commits here. Within each commit, \"Decode matches "
                    f"forward\" compares its decode steps with its forward pass in "
                    f"{'/'.join(sorted({r['dtype'] for r in s.get('consistency') or [] if r.get('dtype')})) or 'its dtype'}."]
                   if s.get("bench_dtype") not in (None, "float32") else []),
                "tables": [("", t["equivalence"])]})
    env_lines = " ".join(f"{k}={v}" for k, v in (s["memory"].get("recommended_env") or {}).items())
    out.append({"id": "memory", "title": "Memory",
                "paras": ["Workspace and allocator counters of one process per run. Recommended reserves: each "
                          "high-water mark rounded up to a power of two, for the workload named."]
                + ([f"To pre-size for every measured workload: {env_lines}"] if env_lines else []),
                "tables": [("Recommended reserves", t["reserves"]), ("Workspaces", t["workspaces"]),
                           ("Allocator", t["allocator"])], "plots": PLOTS["memory"]})
    common = ", ".join(f"{k}={v}" for k, v in (s.get("common_env") or {}).items()) or "(none)"
    out.append({"id": "environment", "title": "Environment",
                "tables": [("Per commit", t["environment"]), ("Routes each branch took, and why", t["routes"]),
                           ("Reserve configs, in declared order", t["reserve_configs"])],
                "paras": [f"Common environment for every job: {common}"],
                "freeze": [(f"{short(r['sha'])} ({', '.join(r['variants'])})", r["pip_freeze"])
                           for r in s["environment"] if r["pip_freeze"]]})
    if s["jobs"]:
        out.append({"id": "failed", "title": "Failed jobs", "tables": [("", t["jobs"])],
                    "logs": failure_logs(s["jobs"])})
    out.append({"id": "acceptance", "title": "Acceptance criteria", "tables": [("", t["acceptance"])]})
    out.append({"id": "method", "title": "Method", "paras": [METHOD]})
    return out


def _skipped(plots_dir: Path | None) -> dict:
    if plots_dir and (plots_dir / "index.json").is_file():
        try:
            return json.loads((plots_dir / "index.json").read_text()).get("skipped", {})
        except ValueError:
            return {}
    return {}


def render_html(s: dict, plots_dir: Path | None) -> str:
    skipped = _skipped(plots_dir)
    secs = sections(s)
    color = VERDICT_COLORS.get(s["verdict"], "#555")
    body = [f'<h1>NSA validation: <span class="verdict" style="background:{color}">{esc(s["verdict"])}</span></h1>',
            f'<p class="note">Generated {esc(s.get("generated"))} · '
            + " · ".join(f'<a href="#{esc(sec["id"])}">{esc(sec["title"])}</a>' for sec in secs[1:]) + "</p>"]
    for sec in secs:
        if sec["id"] != "summary":
            body.append(f'<h2 id="{esc(sec["id"])}">{esc(sec["title"])}</h2>')
        if "verdict" in sec:
            body.append('<ul class="reasons">' + "".join(f"<li>{esc(i)}</li>" for i in sec["items"]) + "</ul>")
        # Explanations before a section's tables; on the first screen, the facts after the table.
        paras = [f'<p class="note">{esc(p)}</p>' if sec["id"] == "summary" else f"<p>{esc(p)}</p>"
                 for p in sec.get("paras", [])]
        if sec["id"] != "summary":
            body += paras
        for title, (header, rows) in sec.get("tables", []):
            if title:
                body.append(f"<h3>{esc(title)}</h3>")
            body.append(html_table(header, rows))
        if sec["id"] == "summary":
            body += paras
        if sec.get("warnings"):
            body.append('<p class="note"><b>Machine conditions:</b> ' + "; ".join(esc(w) for w in sec["warnings"])
                        + "</p>")
        for title, text in sec.get("logs", []):
            body.append(f"<details open><summary>{esc(title)}: log tail</summary><pre>{esc(text)}</pre></details>")
        for name, packages in sec.get("freeze", []):
            body.append(f"<details><summary>pip freeze of {esc(name)} ({len(packages)} packages)</summary>"
                        f"<pre>{esc(chr(10).join(packages))}</pre></details>")
        for name, caption in sec.get("plots", []):
            body.append(plot_html(plots_dir, name, caption, skipped))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc('NSA validation: ' + s['verdict'])}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def render_md(s: dict, plots_dir: Path | None, md_dir: Path | None = None) -> str:
    out = [f"# NSA validation: {s['verdict']}", "", f"Generated {md_cell(s.get('generated'))}", ""]
    for sec in sections(s):
        if sec["id"] != "summary":
            out += [f"## {sec['title']}", ""]
        if "verdict" in sec:
            out += [f"- {md_cell(i)}" for i in sec["items"]] + [""]
        paras = [line for p in sec.get("paras", []) for line in (md_cell(p), "")]
        if sec["id"] != "summary":
            out += paras
        for title, (header, rows) in sec.get("tables", []):
            if title:
                out += [f"### {md_cell(title)}", ""]
            out += [markdown_table(header, rows)]
        if sec["id"] == "summary":
            out += paras
        if sec.get("warnings"):
            out += ["**Machine conditions:** " + "; ".join(md_cell(w) for w in sec["warnings"]), ""]
        for title, text in sec.get("logs", []):
            fence = "`" * max(3, _longest_backtick_run(text) + 1)  # a fence the log itself cannot close
            out += [f"**{md_cell(title)}** (log tail):", "", fence, text, fence, ""]
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
