"""Decode worker: one process in a commit's environment, timing one implementation's decode step.

    decode_worker.py --spec JSON      (started by bench_decode.py; talks JSON lines on stdin/stdout)

Set-up builds the layer through the adapter (or the harness's dense reference layer), prefills one
cache per context, and prepares every timing mode the device and the adapter's capabilities allow:
``eager`` (one ``decode_step`` per sample), ``graph`` (a CUDA-graph replay of the step) and
``compiled_graph`` (the adapter's ``prepare_decode``, e.g. ``compile_decode()``, then a graph:
how decode is deployed). Each ``sample`` request times one block of ``steps`` per context and mode,
every block starting again from the same prefilled cache, so every block measures the same
positions. Samples: CUDA events on GPU, perf_counter on CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapter_api  # noqa: E402
import harness  # noqa: E402


class DecodeWorker:
    def __init__(self, spec: dict):
        import torch

        self.torch = torch
        harness.set_threads(spec.get("threads"))
        self.adapter = harness.worker_adapter(spec)
        self.device = spec["device"]
        caps = adapter_api.capabilities(self.adapter)
        why = adapter_api.unsupported_on(self.adapter, self.device, spec["dtype"])
        if why:
            raise adapter_api.Unsupported(why)
        if not caps["decode"]:
            raise adapter_api.Unsupported("unsupported: decode (the adapter declares no decode cache)")
        harness.set_determinism(self.device, spec.get("flush_denormal", True))
        self.steps, self.warmup, self.batch = spec["steps"], spec["warmup"], spec["batch"]
        cuda = self.device == "cuda"
        wanted = spec.get("modes") or ["eager", "graph", "compiled_graph"]
        self.modes = ["eager"]
        if cuda and caps["cuda_graph"] and "graph" in wanted:
            self.modes.append("graph")
        if cuda and caps["cuda_graph"] and caps["compile"] and "compiled_graph" in wanted:
            self.modes.append("compiled_graph")
        self.timer = harness.Timer(self.device)
        self.probe = harness.MemoryProbe(self.device)
        torch.manual_seed(spec["seed"])
        a = self.adapter
        self.layer = a.build_layer(spec["model"], device=self.device, dtype=spec["dtype"]).eval()
        dim = spec["model"]["dim"]
        dtype = getattr(torch, spec["dtype"])
        gen = torch.Generator().manual_seed(spec["seed"] + 1)
        self.x_t = torch.randn(self.batch, 1, dim, generator=gen).to(self.device, dtype)
        extra = self.warmup + self.steps + 8  # warm-up, timed steps, and a graph capture's own steps
        self.pristine, self.graphs = {}, {m: {} for m in self.modes if m != "eager"}
        with torch.no_grad():
            for ctx in spec["contexts"]:
                x = torch.randn(self.batch, ctx, dim, generator=gen).to(self.device, dtype)
                _, cache = a.prefill(self.layer, x, a.new_cache(self.layer, self.batch, ctx + extra))
                self.pristine[ctx] = cache
            if "graph" in self.modes:
                for ctx, cache in self.pristine.items():
                    self.graphs["graph"][ctx] = self._capture(self.layer, copy.deepcopy(cache))
            if "compiled_graph" in self.modes:
                compiled = copy.deepcopy(self.layer)
                a.prepare_decode(compiled)
                for ctx, cache in self.pristine.items():
                    self.graphs["compiled_graph"][ctx] = self._capture(compiled, copy.deepcopy(cache))
        if hasattr(a, "reset_workspaces"):
            a.reset_workspaces()  # counters from here on describe steady-state decode, not the prefill
        self.info = {"modes": self.modes, "routes": harness.safe_routes(a, self.layer)}

    def _capture(self, layer, cache):
        torch, step = self.torch, self.adapter.decode_step
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and, for a compiled step, compilation) off the graph
                _, cache = step(layer, self.x_t, cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            _, cache = step(layer, self.x_t, cache)
        return graph, cache

    def sample(self) -> dict:
        import tinylm

        out = {}
        step = self.adapter.decode_step
        with self.torch.no_grad():
            for ctx, pristine in self.pristine.items():
                holder = {"cache": copy.deepcopy(pristine)}

                def one():
                    holder["cache"] = step(self.layer, self.x_t, holder["cache"])[1]

                for _ in range(self.warmup):
                    one()
                self.probe.start()
                out[str(ctx)] = {"eager_ms": [self.timer(one) for _ in range(self.steps)]}
                self.probe.stop()
                for mode, graphs in self.graphs.items():
                    graph, gcache = graphs[ctx]
                    tinylm.copy_state_(gcache, pristine)
                    for _ in range(self.warmup):
                        graph.replay()
                    self.probe.start()
                    out[str(ctx)][f"{mode}_ms"] = [self.timer(graph.replay) for _ in range(self.steps)]
                    self.probe.stop()
        return {"contexts": out}

    def finish(self) -> dict:
        stats = adapter_api.call_optional(self.adapter, "workspace_stats")
        return {"workspace_stats": stats, "memory": self.probe.as_dict(), "routes": harness.safe_routes(self.adapter, self.layer)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec)
    return harness.serve(lambda: DecodeWorker(spec), {"sample": lambda w, m: w.sample(),
                                                       "finish": lambda w, m: w.finish()})


if __name__ == "__main__":
    sys.exit(main())
