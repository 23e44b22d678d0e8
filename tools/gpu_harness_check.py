"""The harness's CUDA paths through an adapter, in one process, in a minute: decode in every mode
(eager, graph, compiled + graph), a few training steps under autocast, decode == forward in bf16.

    python tools/gpu_harness_check.py [--adapter nsa] [--dense]

Run on a GPU machine before a long workflow run; prints one line per check and exits non-zero on
the first error. (The workflow's own tests cover the same code on CPU.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow" / "scripts"))
import adapter_api  # noqa: E402
import consistency  # noqa: E402
import decode_worker  # noqa: E402
import train_worker  # noqa: E402

MODEL = {"dim": 256, "groups": 2, "heads_per_group": 4, "d_k": 32, "d_v": 32, "block_len": 32, "block_stride": 16,
         "sel_block_len": 64, "n_sel": 16, "window": 512}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", default="nsa")
    ap.add_argument("--dense", action="store_true", help="the harness's dense reference layer instead")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the same code")
    args = ap.parse_args(argv)
    path = str(adapter_api.adapter_path(args.adapter))
    layer = "dense" if args.dense else "impl"
    name = "dense" if args.dense else args.adapter
    t0 = time.perf_counter()
    w = decode_worker.DecodeWorker({"adapter": path, "layer": layer, "device": args.device, "dtype": "bfloat16",
                                    "contexts": [512, 2048], "steps": 20, "warmup": 5, "batch": 1, "seed": 0,
                                    "model": MODEL, "modes": ["eager", "graph", "compiled_graph"], "threads": 1})
    sample = w.sample()["contexts"]
    medians = {ctx: {m: round(sorted(s)[len(s) // 2], 4) for m, s in modes.items()} for ctx, modes in sample.items()}
    print(f"decode {name}: modes {w.info['modes']}, median ms {medians} (setup + sample {time.perf_counter() - t0:.1f} s)")
    print(f"decode {name}: finish {w.finish()}")
    t0 = time.perf_counter()
    tw = train_worker.TrainWorker({"adapter": path, "layer": layer, "device": args.device, "model": MODEL, "seed": 0,
                                   "threads": 1, "sizes": {"warmup": 2, "batch": 4, "seq_len": 1024, "layers": 1,
                                                           "vocab": 512, "lr": 1e-3, "dtype": "bfloat16"}})
    steps = tw.steps(3)
    print(f"train {name}: tokens/s {[round(x) for x in steps['tokens_per_s']]}, loss {steps['loss']} "
          f"({time.perf_counter() - t0:.1f} s), {tw.finish()['peak_mem_bytes'] / 2**20:.0f} MiB peak")
    import harness

    rec = consistency.compare(harness.worker_adapter({"adapter": path, "layer": layer}),
                              {"device": args.device, "model": MODEL, "seed": 0,
                               "sizes": {"batch": 2, "seq_len": 2048, "prefix": 1920, "dtype": "bfloat16"},
                               "tolerance": {"bfloat16": 5e-2}})
    print(f"consistency {name}: passed={rec['passed']} max_abs_err={rec['max_abs_err']:.4g} at {rec['worst_position']} "
          f"(tolerance {rec['tolerance']:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
