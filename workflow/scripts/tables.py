"""The summary's tables: display strings for the report (markdown and HTML render the same
header + rows) and raw rows for the CSV files, and writing them all (summary JSON last)."""

from __future__ import annotations

import csv
import io as _io
import json
import math
from pathlib import Path

from harness import write_atomic  # one atomic writer for every result file (temp + rename)
from results_io import UNSUPPORTED

STATUS_WORDS = {UNSUPPORTED: "not supported by this implementation"}


def fmt_num(x, digits: int = 4) -> str:
    if x is None:
        return ""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return f"{x:.{digits}g}"
    return str(x)


def fmt_pct(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:+.{digits}f}%"


def fmt_spread(x) -> str:
    return "" if x is None else f"{x:.2f}%"


def fmt_ci(lo, hi) -> str:
    return "" if lo is None or hi is None else f"{lo:+.2f}% to {hi:+.2f}%"


def fmt_p(p) -> str:
    return "" if p is None else f"{p:.2g}"


def fmt_bytes(b) -> str:
    if b is None:
        return ""
    b = float(b)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024.0
    return str(b)


def fmt_status(r: dict) -> str:
    st = r.get("status") or ""
    text = STATUS_WORDS.get(st, st)
    if st == UNSUPPORTED and r.get("reason"):
        text += f": {r['reason']}"
    return text


def short(sha) -> str:
    return str(sha or "")[:10]


def _where(r) -> str:
    return "" if r.get("context") is None else str(r["context"])


def _call(r) -> str:
    if r.get("status") not in ("ok", None):
        return fmt_status(r)
    call = r.get("call") or ""
    return call if r.get("judged", True) else f"{call} (not judged)"


def comparison_table(rows: list[dict], first_cols, unit: str):
    header = [h for h, _ in first_cols] + ["ctx", "mode", f"{unit}: from → to", "delta", "CI of delta", "call"]
    out = []
    for r in rows:
        vals = [fn(r) for _, fn in first_cols]
        if r.get("status") != "ok":
            out.append(vals + ["", "", "", "", "", fmt_status(r)])
            continue
        out.append(vals + [_where(r), str(r.get("mode") or ""),
                           f"{fmt_num(r.get('baseline_value'))} → {fmt_num(r.get('value'))}",
                           fmt_pct(r.get("delta_pct")), fmt_ci(r.get("ci_low_pct"), r.get("ci_high_pct")), _call(r)])
    return header, out


def cells_table(cells: list[dict], unit: str):
    header = ["run", "reserve", "ctx", "mode", "processes", f"median {unit}", "spread within", "spread between"]
    return header, [[c["variant"], str(c["reserve"] or ""), _where(c), str(c["mode"]), fmt_num(c["processes"]),
                     fmt_num(c["value"]), fmt_spread(c["within_pct"]), fmt_spread(c["between_pct"])] for c in cells]


def noise_table(noise: dict):
    header = ["mode", "judged", "A/A max |delta|", "spread between processes (all cells)", "reference's alone", "floor",
              "tolerance", "a change needs its CI beyond"]
    rows = []
    for n in noise.values():
        pooled = "" if n.get("pooled_between_pct") is None else \
            (f"{n['pooled_between_pct']:.2f}% over {n['pooled_cells']} cells, "
             f"{n['pooled_process_pct']:.2f}% beyond their samples' scatter"
             + (" and each generation's common shift" if n.get("paired") else "") + f" → ±{n['pooled_pct']:.2f}%")
        rows.append([n["mode"], fmt_num(n["judged"]), fmt_spread(n["aa_pct"]), pooled,
                     fmt_spread(n["reference_process_pct"]), fmt_spread(n["floor_pct"]) or "not measured",
                     f"{n['tolerance_pct']:g}%", f"±{n['threshold_pct']:.2f}%"
                     + (" (TOO NOISY)" if n["too_noisy"] and n["judged"] else "")])
    return header, rows


RESULT_WORDS = {"pass": "pass", "fail": "FAIL", "incomplete": "INCOMPLETE", "inconclusive": "INCONCLUSIVE",
                "info": "info", "not judged": "not judged"}


def build_tables(s: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Every table of the report as (header, rows of display strings); escaping is the renderer's job."""
    t = {}
    t["overview"] = (["variant", "correctness", "decode vs baseline", "training vs baseline", "equivalence",
                      "memory"],
                     [[r["variant"] + (f" ({r['role']})" if r["role"] else ""), r["correctness"], r["decode"],
                       r["training"], r["equivalence"], r["memory"]] for r in s["overview"]])
    t["variants"] = (["variant", "ref", "commit", "subject"],
                     [[v["name"], str(v.get("ref") or ""), short(v.get("sha")), str(v.get("subject") or "")]
                      for v in s["variants"]])
    t["environment"] = (["commit", "status", "python", "torch", "cuda / gpu", "implementation", "installer"],
                        [[f"{short(r['sha'])} ({', '.join(r['variants'])})", fmt_status(r), fmt_num(r["python"]),
                          fmt_num(r["torch"]),
                          " / ".join(x for x in (fmt_num(r["cuda"]), fmt_num(r["gpu"]), fmt_num(r["driver"])) if x),
                          " ".join(x for x in (fmt_num(r.get("adapter")),
                                               fmt_num(r.get("implementation_version") or r.get("nsa_version"))) if x),
                          fmt_num(r["installer"])] for r in s["environment"]])
    t["placement"] = (["job", "variant", "reserve", "node", "GPU", "SLURM job"],
                      [[r["job"], r["variant"], fmt_num(r["reserve"]), fmt_num(r["node"]), fmt_num(r["gpu"]),
                        fmt_num(r["slurm_job_id"])] for r in s.get("placement") or []])
    t["routes"] = (["commit", "branch", "route", "reason"],
                   [[r["variant"], str(r["branch"]), fmt_num(r["route"]), fmt_num(r["reason"])] for r in s["routes"]])
    t["reserve_configs"] = (["name", "variables"],
                            [[n, ", ".join(f"{k}={v}" for k, v in (s["reserve_configs"].get(n) or {}).items())
                              or "(none: grow on demand)"] for n in s["reserves"]])
    t["correctness"] = (["suite", "commit", "reserve", "status", "passed", "failed", "skipped", "errors", "note"],
                        [[r["suite"], r["variant"], r["reserve"], fmt_status(r), fmt_num(r["passed"]),
                          fmt_num(r["failed"]), fmt_num(r["skipped"]), fmt_num(r["errors"]),
                          str(r.get("note") or r.get("error") or "")] for r in s["correctness"]])
    t["consistency"] = (["commit", "reserve", "status", "max abs error", "worst position", "tolerance", "dtype"],
                        [[r["variant"], r["reserve"], "FAIL" if r.get("passed") is False else fmt_status(r),
                          fmt_num(r.get("max_abs_err"), 3), fmt_num(r.get("worst_position")),
                          fmt_num(r.get("tolerance")), fmt_num(r.get("dtype"))] for r in s.get("consistency") or []])
    for key, sec, unit in (("decode", s["decode"], "ms"), ("training", s["training"], "tokens/s")):
        t[f"{key}_vs_baseline"] = comparison_table(sec["rows"], [("commit", lambda r: r["variant"]),
                                                                 ("reserve", lambda r: r["reserve"])], unit)
        t[f"{key}_reserves"] = comparison_table(sec["reserve_rows"], [
            ("commit", lambda r: r["variant"]),
            ("config", lambda r: f"{r['reserve']} vs {r.get('reference_reserve') or ''}")], unit)
        t[f"{key}_aa"] = comparison_table(sec["aa"], [("A/A", lambda r: f"{r['variant_b']} vs {r['variant_a']}"),
                                                      ("reserve", lambda r: r["reserve"])], unit)
        t[f"{key}_cells"] = cells_table(sec["cells"], unit)
        t[f"{key}_noise"] = noise_table(sec.get("noise") or {})
    t["training_runs"] = (["commit", "reserve", "tokens/s", "vs dense", "loss first → last", "drop", "NaN", "peak mem"],
                          [[r["variant"], r["reserve"], fmt_num(r["tokens_per_s"]),
                            "" if r["nsa_over_dense"] is None else f"{r['nsa_over_dense']:.2f}×",
                            f"{fmt_num(r['loss_first'])} → {fmt_num(r['loss_last'])}",
                            fmt_pct(r["loss_drop_pct"], 1), fmt_num(r["nan"]), fmt_bytes(r["peak_mem_bytes"])]
                           for r in s["training"].get("loss_rows", [])])
    m = s["memory"]
    t["reserves"] = (["workload", "variable", "high-water", "recommended", "configured"],
                     [[r["workload"], r["variable"], fmt_num(r["high_water"]),
                       fmt_num(r["recommended"]) if r["recommended"] else "unset (not used)",
                       ", ".join(f"{k}={v}" for k, v in r["configured"].items())] for r in m["recommended"]])
    t["workspaces"] = (["stage", "commit", "reserve", "workspace", "allocations", "growth", "reserved",
                        "high-water rows / keys"],
                       [[r["source"], r["variant"], r["reserve"], r["workspace"], fmt_num(r["allocations"]),
                         fmt_num(r["growth_events"]), fmt_bytes(r["bytes_reserved"]),
                         f"{fmt_num(r['high_water_rows'])} / {fmt_num(r['high_water_keys'])}"]
                        for r in m["workspace_rows"]])
    keys = []
    for r in m["allocator_rows"]:
        keys += [k for k in r if k not in ("source", "variant", "reserve") and k not in keys]
    t["allocator"] = (["stage", "commit", "reserve"] + keys,
                      [[r["source"], r["variant"], r["reserve"]]
                       + [fmt_bytes(r.get(k)) if "bytes" in k else fmt_num(r.get(k)) for k in keys]
                       for r in m["allocator_rows"]])
    t["equivalence"] = (["commit", "reserve", "status", "max abs diff vs reference", "worst output", "blocks",
                         "same bits as own first config"],
                        [[r["variant"], r["reserve"], "reference" if r.get("is_reference") else fmt_status(r),
                          fmt_num(r.get("max_abs_diff_all"), 3), str(r.get("worst_output") or ""),
                          "" if r.get("blocks_equal") is None else
                          ("identical" if r["blocks_equal"] else f"{r['blocks_differ']} of {r['blocks_total']} differ"),
                          fmt_num(r.get("bit_identical"))] for r in s["equivalence"]["rows"]])
    # Reasons of decisive lines are the verdict's, on the first screen; only information notes here.
    t["acceptance"] = (["criterion", "result", "measured", "threshold", "notes"],
                       [[c["title"], RESULT_WORDS.get(c["status"], c["status"]), str(c["measured"]),
                         str(c["threshold"]), "; ".join(c["reasons"]) if c["status"] == "info" else ""]
                        for c in s["acceptance"]])
    t["jobs"] = (["stage", "variant", "reserve", "status", "error"],
                 [[j["stage"], str(j.get("variant") or ""), str(j.get("reserve") or ""), j["status"],
                   str(j.get("error") or "")] for j in s["jobs"]])
    return t


def md_cell(text) -> str:
    """Markdown table cell: pipes escaped, HTML-significant characters entity-encoded, one line."""
    text = "" if text is None else str(text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "_(no rows)_\n"
    lines = ["| " + " | ".join(md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _json_default(x):
    if isinstance(x, set):
        return sorted(x)
    if hasattr(x, "item"):  # numpy scalars
        return x.item()
    return str(x)


def json_clean(x):
    """NaN/inf are not JSON: write them as strings so any JSON reader can load the summary."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x


def _flat(row: dict, prefix: str = "") -> dict:
    """One CSV row: nested dicts become dotted columns, lists JSON; log tails stay in the JSON/report."""
    out = {}
    for k, v in row.items():
        if k in ("log_tail", "pip_freeze"):
            continue
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (list, tuple)):
            out[prefix + k] = json.dumps(v)
        else:
            out[prefix + k] = v
    return out


def raw_tables(s: dict) -> dict[str, list[dict]]:
    """Machine-readable rows (unformatted numbers) for the CSV files."""
    m, d, t = s["memory"], s["decode"], s["training"]
    return {"overview": s["overview"], "environment": s["environment"], "correctness": s["correctness"],
            "consistency": s.get("consistency") or [], "decode": d["rows"], "decode_reserves": d["reserve_rows"],
            "decode_aa": d["aa"], "decode_cells": d["cells"], "decode_noise": list(d["noise"].values()),
            "training": t["rows"], "training_reserves": t["reserve_rows"], "training_aa": t["aa"],
            "training_cells": t["cells"], "training_noise": list(t["noise"].values()),
            "training_runs": t.get("loss_rows", []), "workspaces": m["workspace_rows"],
            "allocator": m["allocator_rows"], "reserves": m["recommended"], "equivalence": s["equivalence"]["rows"],
            "acceptance": s["acceptance"], "jobs": s["jobs"]}


def csv_rows(rows: list[dict]) -> str:
    flat = [_flat(r) for r in rows]
    header = []
    for r in flat:
        header += [k for k in r if k not in header]
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(json_clean(flat))
    return buf.getvalue()


def write_outputs(s: dict, out: Path, tables_dir: Path) -> None:
    # CSV: raw values for further analysis; markdown: the formatted tables of the report.
    for name, rows in raw_tables(s).items():
        write_atomic(tables_dir / f"{name}.csv", csv_rows(rows))
    for name, (header, rows) in build_tables(s).items():
        write_atomic(tables_dir / f"{name}.md", markdown_table(header, rows))
    # The summary last: a rule that waits for it then finds the tables complete too.
    write_atomic(out, json.dumps(json_clean(s), indent=1, default=_json_default, allow_nan=False) + "\n")
