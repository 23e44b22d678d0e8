"""GPU: time the Triton kernels' launch options against the ones the library chooses, at long T.

    python tools/tile_sweep.py [--lengths 65536] [--only compressed scoring selection window]
                               [--candidates "fwd " "dq "] [--rounds 2] [--budget-s 400] [--json out.json]

The library picks tiles from ahead-of-time sm_90 builds (registers and spills), never from timings:
``triton_attention._tile_options`` (window and compressed attention, forward and backward),
``triton_scoring.score_tiles`` (selection scores) and ``triton_selection.kernel_options``. This
script replaces one of those functions at a time with a candidate and times the kernels it governs,
on the issue-8 shape (B=1, 64 query heads in 4 groups, d_k = d_v = 128, l=32, d=16, l'=64, n=16,
w=512, bf16). Every candidate's outputs are compared with the library's choice (max abs diff) and
candidates are interleaved over ``--rounds`` rounds (CUDA events, median). A candidate that does not
fit (out of shared memory or registers) is reported as such. Nothing here changes the library: a
winner becomes a change to the option function, with this script's numbers in the commit.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nsa.bench_smoke import _Timer  # noqa: E402
from nsa.ops import triton_attention as ta  # noqa: E402
from nsa.ops import triton_scoring as ts  # noqa: E402
from nsa.ops import triton_selection as tsel  # noqa: E402
from nsa.ops.selection import select_blocks  # noqa: E402

B, H, G, D, L, STRIDE, SEL, NSEL, W = 1, 64, 4, 128, 32, 16, 64, 16, 512
DTYPE = torch.bfloat16
DEVICE = "cuda"  # --smoke: cpu under TRITON_INTERPRET=1, tiny shapes, two candidates per family


def _time(fn, warmup=2, reps=5) -> float:
    for _ in range(warmup):
        fn()
    timer = _Timer(torch.device(DEVICE))  # CUDA events on a GPU
    return statistics.median(timer(fn) for _ in range(reps if DEVICE == "cuda" else 1))


def _diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) for x, y in zip(a, b))


# --- candidates ------------------------------------------------------------------------------------

def attention_candidates(windowed: bool) -> list[tuple[str, dict]]:
    """(name, one ``_tile_options`` entry): the library's first choice, then one kernel's
    (BLOCK_M, BLOCK_N, warps, stages) changed at a time."""
    base = ta._tile_options(torch.device(DEVICE), torch.bfloat16, D, D, windowed)[0]
    out = [("library", base)]
    tiles = {"fwd": [(64, 64), (128, 64), (128, 128), (64, 128)], "dkdv": [(32, 64), (64, 64), (64, 128), (128, 64)],
             "dq": [(64, 32), (128, 32), (64, 64), (128, 64)]}
    stages_of = {"fwd": [2, 3], "dkdv": [1, 2], "dq": [1, 2]}
    for kernel, shapes in tiles.items():
        for (bm, bn), warps, stages in itertools.product(shapes, [4, 8], stages_of[kernel]):
            option = (bm, bn, warps, stages)
            if option != base[kernel]:
                out.append((f"{kernel} {bm}x{bn} w{warps} s{stages}", dict(base, **{kernel: option})))
    return out


def scoring_candidates() -> list[tuple[str, dict]]:
    base = ts.score_tiles(H // G, D)
    out = [("library", base)]
    for queries, heads, warps in itertools.product([16, 32], [2, 4, 8, 16], [4, 8]):
        opts = dict(base, queries=queries, heads=heads, warps=warps)
        if queries * heads <= 256 and opts != base:
            out.append((f"q{queries} h{heads} w{warps}", opts))
    for stages in (1, 2, 4):
        if stages != base["stages"]:
            out.append((f"stages {stages}", dict(base, stages=stages)))
    return out


def selection_candidates() -> list[tuple[str, dict]]:
    base = tsel.kernel_options(H // G, D, torch.device(DEVICE))
    out = [("library", base)]
    # The forward and dQ loops over the selected blocks have no branch: Triton pipelines their
    # gathered loads at num_stages >= 2.
    for kernel in ("fwd", "dq"):
        for warps, stages in itertools.product((4, 8), (1, 2, 3)):
            if (warps, stages) != (base[f"{kernel}_warps"], base[f"{kernel}_stages"]):
                out.append((f"{kernel} w{warps} s{stages}", dict(base, **{f"{kernel}_warps": warps,
                                                                         f"{kernel}_stages": stages})))
    for queries, warps, stages in itertools.product([1, 2, 4], [4, 8], [1, 2]):
        out.append((f"dkdv q{queries} w{warps} s{stages}", dict(base, dkdv_queries=queries, dkdv_warps=warps,
                                                                 dkdv_stages=stages)))
    for segment in (512, 2048, 4096):
        out.append((f"segment {segment}", dict(base, segment=segment)))
    return out


# --- one family ------------------------------------------------------------------------------------

def _attention_job(T, windowed):
    gen = torch.Generator().manual_seed(T)
    S = T if windowed else (T - L) // STRIDE + 1
    q, k, v = ((torch.randn(*s, generator=gen) * 0.5).to(DEVICE, DTYPE)
               for s in ((B, T, H, D), (B, S, G, D), (B, S, G, D)))
    do = torch.randn(B, T, H, D, generator=gen).to(DEVICE, DTYPE)
    stride, offset, window = (1, 0, W) if windowed else (STRIDE, L - 1, None)
    scale = 1 / math.sqrt(D)

    def fwd():
        return ta._forward(q, k, v, stride, offset, window, scale)

    o, lse = fwd()

    def bwd():
        return ta._backward(do, q, k, v, o, lse, stride, offset, window, scale)

    return {"forward": fwd, "backward": bwd}


def _scoring_job(T):
    gen = torch.Generator().manual_seed(T)
    N = (T - L) // STRIDE + 1
    q = (torch.randn(B, T, H, D, generator=gen) * 0.5).to(DEVICE, DTYPE)
    k = (torch.randn(B, N, G, D, generator=gen) * 0.5).to(DEVICE, DTYPE)
    lse = ts.compressed_lse(q, k, block_len=L, block_stride=STRIDE)
    nb = -(-T // SEL)

    def scores():  # every query at once (the library splits T into chunks of scores; the kernel is the same)
        return (ts.block_scores(q, k, lse, groups=G, block_len=L, block_stride=STRIDE, sel_block_len=SEL,
                                num_blocks=nb),)

    return {"scores": scores}


def _selection_job(T):
    gen = torch.Generator().manual_seed(T)
    q, k, v = ((torch.randn(B, *s, generator=gen) * 0.5).to(DEVICE, DTYPE) for s in ((T, H, D), (T, G, D), (T, G, D)))
    do = torch.randn(B, T, H, D, generator=gen).to(DEVICE, DTYPE)
    scores = torch.rand(B, T, G, -(-T // SEL), generator=gen).to(DEVICE)
    idx = select_blocks(scores, sel_block_len=SEL, n_sel=NSEL).to(torch.int32).contiguous()
    scale = 1 / math.sqrt(D)

    def fwd():
        return tsel._forward(q, k, v, idx, SEL, scale)

    o, lse = fwd()

    def bwd():
        return tsel._backward(do, q, k, v, idx, o, lse, SEL, scale)

    return {"forward": fwd, "backward": bwd}


FAMILIES = {
    "compressed": (lambda: attention_candidates(False), lambda T: _attention_job(T, False), ta, "_tile_options",
                   lambda c: (lambda *a, **k: [c])),
    "window": (lambda: attention_candidates(True), lambda T: _attention_job(T, True), ta, "_tile_options",
               lambda c: (lambda *a, **k: [c])),
    "scoring": (scoring_candidates, _scoring_job, ts, "score_tiles", lambda c: (lambda *a, **k: c)),
    "selection": (selection_candidates, _selection_job, tsel, "kernel_options", lambda c: (lambda *a, **k: c)),
}


def sweep(family: str, T: int, rounds: int, prefixes=None) -> list[dict]:
    """``prefixes``: time only the candidates whose names start with one of these (and the library's)."""
    candidates_of, job_of, module, attr, patch = FAMILIES[family]
    candidates = candidates_of()[:2] if DEVICE != "cuda" else candidates_of()
    if prefixes:
        candidates = [c for c in candidates if c[0] == "library" or c[0].startswith(tuple(prefixes))]
    original = getattr(module, attr)
    jobs = job_of(T)
    rows = {name: {"family": family, "T": T, "candidate": name, "options": opts, "ms": {}, "max_diff": 0.0}
            for name, opts in candidates}
    reference = {}
    try:
        for r in range(rounds):
            for name, opts in candidates if r % 2 == 0 else candidates[::-1]:  # alternate the order per round
                row = rows[name]
                if "error" in row:
                    continue
                setattr(module, attr, patch(opts))
                ta._chosen.clear()
                try:
                    for part, fn in jobs.items():
                        out = fn()
                        if name == "library" and part not in reference:
                            reference[part] = [x.detach().clone() for x in out if torch.is_tensor(x)]
                        elif part in reference:
                            row["max_diff"] = max(row["max_diff"], _diff([x for x in out if torch.is_tensor(x)],
                                                                         reference[part]))
                        row["ms"].setdefault(part, []).append(_time(fn))
                except Exception as e:  # noqa: BLE001 - a candidate that does not fit is a result
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                finally:
                    setattr(module, attr, original)
                    ta._chosen.clear()
    finally:
        setattr(module, attr, original)
    out = []
    for row in rows.values():
        row["ms"] = {part: statistics.median(v) for part, v in row["ms"].items()}
        out.append(row)
    return out


def report(rows: list[dict]) -> None:
    base = {(r["family"], r["T"]): r for r in rows if r["candidate"] == "library"}
    for key in sorted(base, key=lambda k: (k[0], k[1])):
        family, T = key
        lib = base[key]["ms"]
        print(f"\n{family} at T={T}: library " + ", ".join(f"{p} {v:.2f} ms" for p, v in lib.items()), flush=True)
        ranked = sorted((r for r in rows if (r["family"], r["T"]) == key and r["candidate"] != "library"),
                        key=lambda r: sum(r["ms"].values()) if "error" not in r and r["ms"] else math.inf)
        for r in ranked:
            if "error" in r:
                print(f"  {r['candidate']:28s} {r['error']}")
                continue
            parts = ", ".join(f"{p} {v:.2f} ms ({v / lib[p]:.2f}x)" for p, v in r["ms"].items() if p in lib)
            print(f"  {r['candidate']:28s} {parts}  max diff {r['max_diff']:.2e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[65536])
    ap.add_argument("--only", nargs="+", choices=sorted(FAMILIES), default=["compressed", "scoring", "selection", "window"])
    ap.add_argument("--candidates", nargs="+", default=None, metavar="PREFIX",
                    help="only candidates whose names start with these (e.g. 'fwd ' 'dq '), beside the library's")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=400.0, help="start no new (family, T) after this")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--smoke", action="store_true", help="check the script on CPU (TRITON_INTERPRET=1, tiny shapes)")
    args = ap.parse_args(argv)
    if args.smoke:
        global B, H, G, D, L, STRIDE, SEL, NSEL, W, DEVICE, DTYPE
        B, H, G, D, L, STRIDE, SEL, NSEL, W, DEVICE, DTYPE = 1, 4, 2, 16, 8, 4, 16, 3, 32, "cpu", torch.float32
        args.lengths, args.rounds = [64], 1
    elif not torch.cuda.is_available():
        sys.exit("tile_sweep.py times CUDA kernels: no CUDA device here")
    start, rows = time.perf_counter(), []
    for T in args.lengths:
        for family in args.only:
            if time.perf_counter() - start > args.budget_s:
                print(f"skipped {family} at T={T}: the {args.budget_s:.0f} s budget is spent", flush=True)
                continue
            rows += sweep(family, T, args.rounds, args.candidates)
            report([r for r in rows if r["family"] == family and r["T"] == T])
            if args.json:
                args.json.write_text(json.dumps(rows, indent=1))
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
