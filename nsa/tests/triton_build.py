"""Triton kernels tested without a GPU: built for an H100 (sm_90), and run under the interpreter.

``triton.compile`` runs Triton's real front end and back end (with its bundled ptxas), which the
interpreter never runs: a kernel that only the compiler rejects, or one that spills registers or
outgrows shared memory at its chosen tiles, fails here on a CPU-only machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import traceback

import pytest

H100_SHARED_BYTES = 227 * 1024


def nvidia_backend():
    """Skip unless this Triton can build for NVIDIA GPUs."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends import backends
    except ImportError:
        backends = {}
    if "nvidia" not in backends:
        pytest.skip("this Triton has no NVIDIA backend (ptxas) to build with")
    return triton


def build_sm90(kernel, constexprs: dict, types: dict, *, warps: int, stages: int):
    """Compile ``kernel`` for sm_90. ``types``: argument name -> Triton type ("*bf16", "fp32", ...);
    arguments in neither mapping are ``i32``."""
    triton = nvidia_backend()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": stages})


def usage(compiled) -> dict:
    """``{"registers", "spill_bytes", "shared_bytes"}`` of a compiled kernel (cuobjdump -res-usage:
    STACK is the per-thread local memory that spilled registers use)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise AssertionError(f"cuobjdump -res-usage printed no REG/STACK line: {text!r}")
    return {"registers": int(found.group(1)), "spill_bytes": int(found.group(2)),
            "shared_bytes": compiled.metadata.shared}


# --- Triton's interpreter -------------------------------------------------------------------------


# "i/n": run_cases runs every n-th case from the i-th (interpreter_results' parallel subprocesses).
SHARD_VAR = "TRITON_CASES_SHARD"


def interpreter_processes() -> int:
    """Interpreter subprocesses per test module: one per core, at most 2 (a case runs on one thread;
    the test process waits meanwhile). On the 2-core CI machine the interpreted cases took about 130
    s of a ten-minute suite in one process each."""
    return max(1, min(2, os.cpu_count() or 1))


def run_cases(jobs: dict) -> dict:
    """``{name: job()}`` for every case (with ``TRITON_CASES_SHARD=i/n``, every n-th from the i-th);
    an exception becomes that case's ``error`` (the others still run). A Triton whose interpreter
    cannot run these kernels at all gives ``{"skip": reason}``."""
    import torch
    import triton

    shard = os.environ.get(SHARD_VAR)
    if shard:
        i, n = (int(x) for x in shard.split("/"))
        jobs = {name: job for k, (name, job) in enumerate(jobs.items()) if k % n == i}
    torch.set_num_threads(1)
    results = {}
    for name, job in jobs.items():
        try:
            results[name] = job()
        except Exception as exc:  # reported per case by the tests
            if "only 0-dimensional arrays can be converted" in repr(exc):
                return {"skip": f"triton {triton.__version__}'s interpreter cannot run loops with runtime "
                                f"bounds under numpy >= 2.4 (fixed in triton 3.9): {exc!r}"}
            results[name] = {"error": traceback.format_exc(limit=4)}
    return results


def interpreter_results(module: str, compute_all) -> dict:
    """``compute_all()`` under Triton's interpreter. It must be on before Triton is first imported, and
    ``import nsa`` imports it, so unless this process already interprets the cases run in
    subprocesses, ``python -m <module>``, each printing its share of ``compute_all()`` (see
    :func:`interpreter_processes`) as its last line of JSON."""
    from nsa.ops.triton_attention import _interpreting

    pytest.importorskip("numpy", reason="Triton's interpreter needs numpy")
    if _interpreting():
        results = compute_all()
    else:
        n = interpreter_processes()
        procs = [subprocess.Popen([sys.executable, "-m", module], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=dict(os.environ, TRITON_INTERPRET="1", **{SHARD_VAR: f"{i}/{n}"}))
                 for i in range(n)]
        finished = []
        try:
            for proc in procs:
                finished.append((proc, *proc.communicate(timeout=600)))
        except subprocess.TimeoutExpired:
            pytest.fail(f"interpreter subprocess of {module} ran past 600 s")
        finally:
            for proc in procs:
                proc.kill()  # a no-op on the ones that ended
        results = {}
        for proc, out, err in finished:
            if proc.returncode != 0 or not out.strip():
                pytest.fail(f"interpreter subprocess failed (rc={proc.returncode}): {err[-3000:]}")
            part = json.loads(out.strip().splitlines()[-1])
            if "skip" in part:
                pytest.skip(part["skip"])
            results.update(part)
    if "skip" in results:
        pytest.skip(results["skip"])
    return results


def interpreter_fixture(module: str, compute_all):
    """The module-scoped ``interpreter_results`` fixture of a test module: ``compute_all()``'s cases
    under the interpreter (see :func:`interpreter_results`), computed once per module."""

    @pytest.fixture(scope="module", name="interpreter_results")
    def fixture() -> dict:
        return interpreter_results(module, compute_all)

    return fixture


def case(results: dict, name: str) -> dict:
    """One case of ``results``; a case that raised fails the test with its own traceback."""
    r = results[name]
    assert "error" not in r, r.get("error")
    return r


def layer_route_errors(patches: dict, *, batch: int, T: int, n_sel: int) -> dict:
    """A small float32 layer with ``patches`` (``nsa.routes`` function name -> the Route it should
    return) against the same layer on the routes it takes unpatched: ``o``, the output's max error,
    and ``grads``, that of the input's and every parameter's gradient, each relative to its own
    largest value but not below a thousandth of the largest of all (the key compression's bias and
    position embedding shift every compressed key alike, which softmax ignores, so their true
    gradients are zero and what both routes give is rounding noise); ``taken``: the patched run's
    ``routes_taken`` names."""
    import torch

    from nsa import NSAAttention, NSAConfig, routes

    cfg = NSAConfig(dim=32, groups=2, heads_per_group=2, d_k=16, d_v=16, block_len=8, block_stride=4,
                    sel_block_len=16, n_sel=n_sel, window=16)
    torch.manual_seed(3)
    layer = NSAAttention(cfg)
    x = torch.randn(batch, T, 32, generator=torch.Generator().manual_seed(4))

    def run():
        xg = x.clone().requires_grad_()
        y = layer(xg)
        return y, torch.autograd.grad(y.square().sum(), [xg, *layer.parameters()], allow_unused=True)

    y_ref, g_ref = run()
    real = {name: getattr(routes, name) for name in patches}
    for name, route in patches.items():
        setattr(routes, name, lambda *a, _route=route, **k: _route)
    try:
        y, g = run()
        taken = {branch: r["route"] for branch, r in layer.routes_taken.items()}
    finally:
        for name, fn in real.items():
            setattr(routes, name, fn)
    floor = 1e-3 * max(float(b.abs().max()) for b in g_ref if b is not None)
    return {"o": float((y - y_ref).abs().max() / y_ref.abs().max()),
            "grads": max(float((a - b).abs().max()) / max(float(b.abs().max()), floor)
                         for a, b in zip(g, g_ref) if b is not None),
            "taken": taken}
