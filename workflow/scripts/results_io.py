"""Reading the pipeline's raw result files into plain, normalised records (no judging here).

Every loader returns dicts with a normalised ``status``: ``ok``, ``FAILED`` (the job ran and broke,
or its file is unreadable), ``MISSING`` (the job never finished), ``unsupported`` (the
implementation cannot do this; never a failure) or ``not run`` (a suite collected fewer tests than
it requires). Records carry ``schema_version`` and the reader checks it: the benchmark files must be version 2
(k worker processes per run and a reference workload); version 1 is refused with a message saying
to rerun the stage.
"""

from __future__ import annotations

import json
from pathlib import Path

OK, FAILED, MISSING, UNSUPPORTED, NOT_RUN = "ok", "FAILED", "MISSING", "unsupported", "not run"
SCHEMA_VERSIONS = (1, 2)
LOG_TAIL_CHARS = 4000
_STATUS = {"ok": OK, "failed": FAILED, "unsupported": UNSUPPORTED, "not_run": NOT_RUN, "missing": MISSING}


def tail(text, limit: int = LOG_TAIL_CHARS) -> str | None:
    """The end of a log (string or list of lines), short enough for a table cell."""
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = "\n".join(str(t) for t in text)
    text = str(text)
    return text if len(text) <= limit else "…" + text[-limit:]


def num(x):
    """A float, or None for missing/non-numeric values (never raises on odd input)."""
    if isinstance(x, bool):
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def norm_status(raw, default: str | None = None) -> str:
    raw = str(raw if raw is not None else (default or "")).lower()
    return _STATUS.get(raw, FAILED)


def read_record(path: Path, default_status: str | None = None) -> dict:
    """A result JSON as a dict with a normalised ``status``.

    A missing file means the job never finished; an unreadable one (a half-written file from an
    interrupted run) is FAILED, never taken as a result; a ``schema_version`` this reader does not
    know is FAILED with a message saying so.
    """
    path = Path(path)
    if not path.exists():
        return {"status": MISSING, "error": f"{path} not found (the job did not finish)", "path": str(path)}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"status": FAILED, "error": f"unreadable result {path}: {e}", "path": str(path)}
    if not isinstance(data, dict):
        return {"status": FAILED, "error": f"{path}: expected a JSON object", "path": str(path)}
    version = data.get("schema_version", 1)
    if version not in SCHEMA_VERSIONS:
        return {"status": FAILED, "path": str(path),
                "error": f"{path}: schema_version {version!r} is not one this report reads "
                         f"({', '.join(map(str, SCHEMA_VERSIONS))}); rerun the stage with this checkout"}
    raw = data.get("status", default_status)
    data["status"] = norm_status(raw)
    if str(raw).lower() not in _STATUS:
        data.setdefault("error", f"{path}: status {raw!r} is not one of {', '.join(_STATUS)}")
    data["schema_version"] = version
    if "log_tail" in data:
        data["log_tail"] = tail(data["log_tail"])
    data["path"] = str(path)
    return data


# ----------------------------------------------------------------------------- meta

def load_meta(results: Path) -> dict:
    """meta/variants.json with the variants, reserve configurations in declared order, suites."""
    meta = read_record(Path(results) / "meta" / "variants.json", default_status="ok")
    if meta["status"] == OK and not isinstance(meta.get("variants"), dict):
        meta = {**meta, "status": FAILED, "error": "variants.json has no variants"}
    variants = {str(k): ({"ref": v.get("ref"), "sha": v.get("sha"), "subject": v.get("subject")}
                         if isinstance(v, dict) else {"ref": None, "sha": None, "subject": None})
                for k, v in (meta.get("variants") or {}).items()} if meta["status"] == OK else {}
    configs = meta.get("reserve_configs") or {"none": {}}
    # The reference configuration is the first *declared*; meta lists the order explicitly because
    # a JSON writer may sort mapping keys.
    order = [str(r) for r in (meta.get("reserve_order") or configs)]
    order += [str(r) for r in configs if str(r) not in order]
    baseline = meta.get("baseline") if meta.get("baseline") in variants else next(iter(variants), None)
    return {"record": meta, "status": meta["status"], "variants": variants, "reserves": order,
            "reserve_configs": configs, "suites": meta.get("suites") or {}, "device": meta.get("device"),
            "baseline": baseline, "acceptance": meta.get("acceptance") or {}, "repo": meta.get("repo"),
            "common_env": meta.get("common_env") or {}, "implementation": meta.get("implementation") or {},
            "capabilities": meta.get("capabilities") or {}, "processes": meta.get("processes"),
            "warnings": [str(w) for w in meta.get("warnings") or []],
            # Results written by the measurement code of schema 2 come with a consistency stage.
            "has_consistency": "reserve_order" in meta or "processes" in meta}


def first_variant_per_sha(variants: dict) -> dict:
    """sha -> the first variant naming it (twins of one commit share per-commit results)."""
    out = {}
    for name, v in variants.items():
        out.setdefault(v.get("sha"), name)
    return out


# ----------------------------------------------------------------------------- per-commit files

def load_env(results: Path, sha) -> dict:
    return read_record(Path(results) / "env" / str(sha) / "env.json")


def load_tests(results: Path, sha, reserve) -> dict:
    return read_record(Path(results) / "tests" / str(sha) / str(reserve) / "summary.json")


def load_consistency(results: Path, sha, reserve) -> dict:
    return read_record(Path(results) / "consistency" / str(sha) / f"{reserve}.json")


def load_equiv(results: Path, sha, reserve) -> tuple[dict, dict | None]:
    """(record, tensors) for one commit x reserve configuration; tensors None unless both are ok."""
    rec = read_record(Path(results) / "equiv" / str(sha) / f"{reserve}.json")
    pt = Path(results) / "equiv" / str(sha) / f"{reserve}.pt"
    if rec["status"] != OK:
        return rec, None
    if not pt.exists():
        return {**rec, "status": MISSING, "error": f"{pt} not found"}, None
    try:
        return rec, load_tensors(pt)
    except ImportError:
        return {**rec, "status": MISSING, "error": "torch is not importable here; cannot compare outputs"}, None
    except Exception as e:  # noqa: BLE001 - a corrupt file is a failed job, not a crash of the report
        return {**rec, "status": FAILED, "error": f"unreadable {pt}: {e}"}, None


def load_tensors(path: Path) -> dict:
    import torch  # only here: the rest of the summary must not need torch

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise TypeError(f"{path}: expected a dict of tensors")
    return obj


# ----------------------------------------------------------------------------- benchmarks

def _process(p: dict, index: int) -> dict:
    """One worker process of a run, its decode samples keyed context -> mode (``_ms`` dropped)."""
    contexts = {}
    for ctx, modes in (p.get("contexts") or {}).items():
        for key, samples in (modes or {}).items():
            if str(key).endswith("_ms") and isinstance(samples, list):
                contexts.setdefault(str(ctx), {})[str(key)[:-3]] = samples
    return {"index": p.get("index", index), "pid": p.get("pid"), "status": norm_status(p.get("status"), "ok"),
            "error": p.get("error"), "contexts": contexts,
            "tokens_per_s": list(p.get("tokens_per_s") or []), "loss": list(p.get("loss") or []),
            "peak_mem_bytes": num(p.get("peak_mem_bytes")), "workspace_stats": p.get("workspace_stats") or {},
            "memory": p.get("memory") or {}}


def _run(r: dict, processes: list[dict]) -> dict:
    kind = r.get("kind") or "impl"
    return {"variant": r.get("variant") if kind != "reference" else "reference", "sha": r.get("sha"),
            "reserve": r.get("reserve"), "kind": kind, "status": norm_status(r.get("status"), "ok"),
            "error": r.get("error"), "reason": r.get("reason"), "log_tail": tail(r.get("log_tail")),
            "routes": r.get("routes"), "processes": processes}


def _bench_file(rec: dict) -> dict:
    return {"status": rec["status"], "error": rec.get("error"), "log_tail": rec.get("log_tail"),
            "path": rec.get("path"), "schema_version": rec.get("schema_version", 1), "device": rec.get("device"),
            "timer": rec.get("timer"), "rounds": rec.get("rounds"), "processes": rec.get("processes", 1),
            "sizes": rec.get("sizes") or {}, "modes": rec.get("modes"), "conditions": rec.get("conditions") or {},
            "placement": rec.get("placement"), "runs": []}


def _bench(path: Path) -> tuple[dict, dict]:
    """(the file's record, its runs normalised) for decode.json or train.json, schema 2 only."""
    rec = read_record(path, default_status="ok")
    if rec["status"] == OK and rec["schema_version"] < 2:
        rec = {**rec, "status": FAILED,
               "error": f"{path}: schema_version 1 (one worker process per run, no reference workload) is no "
                        f"longer read; rerun the stage with this checkout"}
    out = _bench_file(rec)
    if rec["status"] == OK:
        out["runs"] = [_run(r, [_process(p, j) for j, p in enumerate(r.get("processes") or [])])
                       for r in rec.get("runs") or [] if isinstance(r, dict)]
    return rec, out


def load_decode(results: Path) -> dict:
    """decode/decode.json: every run (impl and reference) with its processes' samples."""
    return _bench(Path(results) / "decode" / "decode.json")[1]


def load_train(results: Path) -> dict:
    """train/train.json: one interleaved job, runs as in decode (tokens/s and loss per process)."""
    return _bench(Path(results) / "train" / "train.json")[1]


def ok_processes(run: dict | None) -> list[dict]:
    if not run or run["status"] != OK:
        return []
    return [p for p in run["processes"] if p["status"] == OK]
