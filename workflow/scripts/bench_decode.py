"""Decode microbenchmark of every (variant, reserve config), interleaved, k processes each.

    bench_decode.py --runs '[{"variant", "sha", "reserve", "env_json", "vars"}]' --sizes '{...}' \
        --model '{...}' --adapter workflow/adapters/nsa.py --device cpu --out results/decode/decode.json

The coordinator (workflow/scripts/interleave.py) starts ``processes`` decode workers
(workflow/scripts/decode_worker.py) per run and one set for the reference workload (the harness's
dense layer), and asks them for blocks of samples in shuffled rounds. Raw samples are kept per
process; the report's statistics work on per-process summaries.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleave  # noqa: E402


def merge(proc: dict, answer: dict) -> None:
    contexts = proc.setdefault("contexts", {})
    for ctx, modes in answer["contexts"].items():
        for mode, samples in modes.items():
            contexts.setdefault(ctx, {}).setdefault(mode, []).extend(samples)


def main(argv=None) -> int:
    ap = interleave.bench_parser(__doc__.splitlines()[0], "contexts, steps, warmup, rounds, processes, batch, dtype, modes",
                                 timeout=1800)
    args = ap.parse_args(argv)
    sizes = json.loads(args.sizes)
    spec = {**{k: sizes[k] for k in ("contexts", "steps", "warmup", "batch", "dtype", "modes") if k in sizes},
            "device": args.device, "model": json.loads(args.model), "seed": args.seed,
            "flush_denormal": not args.no_flush_denormal, "adapter": args.adapter, "threads": args.threads}
    interleave.run_benchmark(args, spec, script="decode_worker.py", request={"cmd": "sample"}, merge=merge,
                             what="decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
