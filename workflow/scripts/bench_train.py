"""Training throughput and loss of every (variant, reserve config), interleaved, k processes each.

    bench_train.py --runs '[{"variant", "sha", "reserve", "env_json", "vars"}]' --sizes '{...}' \
        --model '{...}' --adapter workflow/adapters/nsa.py --device cpu --out results/train/train.json

One job for all runs, like decode: ``processes`` training workers (workflow/scripts/train_worker.py)
per run, plus the reference run (the same TinyLM with the harness's dense layer: the dense twin),
all on the same machine in shuffled rounds of ``steps / rounds`` optimizer steps each, so every
comparison is made under the same conditions. Each process's loss starts with its warm-up steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import interleave  # noqa: E402


def merge(proc: dict, answer: dict) -> None:
    if "loss" not in proc:  # the warm-up steps' losses come with the worker's ready message
        proc["loss"] = list((proc.get("info") or {}).pop("warmup_loss", []))
    proc.setdefault("tokens_per_s", []).extend(answer["tokens_per_s"])
    proc["loss"].extend(answer["loss"])


def main(argv=None) -> int:
    ap = interleave.bench_parser(__doc__.splitlines()[0],
                                 "steps, warmup, rounds, processes, batch, seq_len, layers, vocab, lr, dtype", timeout=3600)
    args = ap.parse_args(argv)
    sizes = json.loads(args.sizes)
    spec = {"device": args.device, "sizes": sizes, "model": json.loads(args.model), "seed": args.seed,
            "flush_denormal": not args.no_flush_denormal, "adapter": args.adapter, "threads": args.threads}
    per_round = max(1, sizes["steps"] // sizes["rounds"])
    interleave.run_benchmark(args, spec, script="train_worker.py", request={"cmd": "steps", "n": per_round},
                             merge=merge, what="train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
