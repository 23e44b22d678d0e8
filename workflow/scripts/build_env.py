"""Build one commit's Python environment and record what is in it (``env.json``).

    build_env.py --checkout results/checkouts/SHA --env results/envs/SHA --out results/env/SHA/env.json

The environment is a venv made with ``--system-site-packages`` *plus* a ``.pth`` file naming the
site-packages of the interpreter running this script. The second part matters where that
interpreter is itself a venv (the lent H100's ``python3`` is): ``--system-site-packages`` then
inherits the *base* interpreter's packages, not the venv's, so torch would be missing and an
offline install would fail. The commit is installed without build isolation and without
resolving dependencies first, so nothing is downloaded when the host already has everything
(air-gapped GPU boxes); the commit's declared dependencies (from its own metadata) and the
implementation's extra requirements that the host does not satisfy are installed afterwards (that
needs an index). With ``install: pythonpath`` the commit is not installed: its checkout goes first
on ``sys.path`` (as projects that run from their checkout document) and the dependencies come from
its pyproject.toml. ``uv`` is used when present, pip otherwise.

A failure at any step still writes ``env.json`` with ``"status": "failed"`` and the log's tail,
so the commit shows as FAILED and the other commits go on.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PTH_NAME = "_nsa_workflow_host.pth"


def host_site_dirs() -> list[str]:
    """Where the running interpreter finds its packages (site-packages, user site, PYTHONPATH),
    minus any directory holding an ``nsa`` package: the code under test must come from the commit."""
    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    dirs += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    out = []
    for d in dirs:
        d = os.path.abspath(d)
        if d not in out and os.path.isdir(d) and not os.path.exists(os.path.join(d, "nsa", "__init__.py")):
            out.append(d)
    return out


def env_site_packages(env_dir: Path) -> Path:
    """The new venv's site-packages (same layout as this interpreter's)."""
    rel = Path(sysconfig.get_path("purelib", vars={"base": "X"})).relative_to("X")
    return Path(env_dir) / rel


def make_venv(env_dir: Path, log) -> None:
    if env_dir.exists():
        shutil.rmtree(env_dir)  # a half-built env from an interrupted run: start over
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], log)
    sp = env_site_packages(env_dir)
    sp.mkdir(parents=True, exist_ok=True)
    (sp / PTH_NAME).write_text("".join(f"{d}\n" for d in host_site_dirs()))


class StepFailed(RuntimeError):
    pass


def run(cmd: list[str], log, env=None, cwd=None, timeout=1800) -> str:
    """Run a build step, logging its output; StepFailed names the step on failure."""
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    # Its own process group, so a timeout or Ctrl-C also ends what it started (pip's builds).
    proc = harness.start_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"`{' '.join(cmd[:4])} ...` timed out after {timeout} s") from None
    finally:
        harness.end_group(proc)
    log.write(stdout + stderr)
    log.flush()
    if proc.returncode != 0:
        raise StepFailed(f"`{' '.join(cmd[:6])} ...` failed ({harness.describe_exit(proc.returncode)})")
    return stdout


def host_module_origin(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return os.path.realpath(spec.origin) if spec and spec.origin else None


def install_commands(py: str, checkout: Path, uv: str | None) -> tuple[str, list[str]]:
    """The installer's name and the command that installs the commit itself, offline-safe."""
    if uv:
        return "uv", [uv, "pip", "install", "--python", py, "--no-deps", "--no-build-isolation", str(checkout)]
    return "pip", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--ignore-installed",
                   "--no-input", "--disable-pip-version-check", "--no-warn-script-location", str(checkout)]


# Runs in the new env: which of the requirements given as JSON (argv[1]) it does not satisfy.
MISSING_DEPS = r"""
import importlib.metadata as md, json, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
missing = []
for line in json.loads(sys.argv[1]):
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(str(req)); continue
    if req.specifier and not req.specifier.contains(have, prereleases=True):
        missing.append(str(req))
print(json.dumps(missing))
"""

# Runs in the new env: the requirements of the distributions installed *into it* (the commit's own
# metadata, whatever its build system), never of a same-named package elsewhere on the host.
INSTALLED_REQUIRES = r"""
import importlib.metadata as md, json, sys
skip = {"pip", "setuptools", "wheel"}
reqs = []
for dist in md.distributions(path=[sys.argv[1]]):
    if (dist.metadata["Name"] or "").lower() not in skip:
        reqs += dist.requires or []
print(json.dumps(reqs))
"""


def _pyproject(checkout: Path) -> dict:
    import tomllib

    path = Path(checkout) / "pyproject.toml"
    if not path.exists():
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise StepFailed(f"{path} is not valid TOML ({e}): cannot read the commit's requirements") from None


def build_requirements(checkout: Path) -> list[str]:
    """``[build-system].requires`` of the commit (setuptools when it declares none, as pip does):
    installing without build isolation needs them in the environment first."""
    return list(_pyproject(checkout).get("build-system", {}).get("requires", ["setuptools>=40.8.0"]))


def declared_requirements(checkout: Path) -> list[str]:
    """``[project].dependencies`` of the commit's pyproject.toml (the checkout-on-sys.path mode)."""
    path = Path(checkout) / "pyproject.toml"
    project = _pyproject(checkout).get("project", {})
    if "dependencies" in project.get("dynamic", []):
        raise StepFailed(f"{path} declares its dependencies as dynamic; use install: pip for this implementation")
    return list(project.get("dependencies", []))


def install(py: str, checkout: Path, env_dir: Path, mode: str, extra: list[str], log, timeout: int) -> str:
    """Put the commit into the env (``pip``: installed; ``pythonpath``: its checkout first on
    sys.path, as its docs run it), then install its declared dependencies and ``extra`` that the
    inherited host packages do not satisfy (offline when there are none)."""
    uv = shutil.which("uv")
    installer, cmd = install_commands(py, checkout, uv)
    env = harness.child_env()
    if installer == "pip":
        probe = subprocess.run([py, "-c", "import pip"], capture_output=True, env=env)
        if probe.returncode != 0:  # the host has no pip to inherit: give the env its own
            run([py, "-m", "ensurepip", "--default-pip"], log, env=env, timeout=timeout)
    site_dir = env_site_packages(env_dir)
    if mode == "pip":
        install_missing(py, build_requirements(checkout), installer, uv, log, env, timeout, "build requirements")
        run(cmd, log, env=env, timeout=timeout)
        wanted = json.loads(run([py, "-c", INSTALLED_REQUIRES, str(site_dir)], log, env=env, timeout=timeout) or "[]")
    else:
        # A .pth line that starts with "import" is executed: this one puts the checkout *first*.
        (site_dir / "_nsa_workflow_checkout.pth").write_text(
            f"import sys; sys.path.insert(0, {str(Path(checkout).resolve())!r})\n")
        wanted = declared_requirements(checkout)
        installer = "pythonpath"
    install_missing(py, wanted + list(extra), installer, uv, log, env, timeout, "requirements")
    return installer


def install_missing(py: str, wanted: list[str], installer: str, uv, log, env, timeout: int, what: str) -> None:
    """Install those of ``wanted`` that the environment (with the host's packages) does not satisfy."""
    if not wanted:
        return
    missing = json.loads(run([py, "-c", MISSING_DEPS, json.dumps(wanted)], log, env=env, timeout=timeout).strip() or "[]")
    if missing:
        log.write(f"{what} not satisfied by the host: {missing}; installing them (needs an index)\n")
        deps_cmd = ([uv, "pip", "install", "--python", py] if uv
                    else [py, "-m", "pip", "install", "--no-input", "--disable-pip-version-check"])
        run(deps_cmd + missing, log, env=env, timeout=timeout)


def probe(py: str, device: str, adapter: str, log, timeout: int) -> dict:
    """Ask the new env what it holds (runs this script's ``probe`` mode there)."""
    cmd = harness.worker_command(Path(py).parents[1], "build_env.py", "probe", "--device", device,
                                 "--adapter", adapter)
    out = run(cmd, log, env=harness.child_env(device=device), timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


def check_torch(info: dict, host_torch: str | None) -> None:
    """The env must use the host's torch (the one with the right CUDA build), not another copy."""
    got = info.get("torch_file")
    if host_torch and got and os.path.realpath(got) != host_torch:
        raise StepFailed(f"`import torch` in the new environment resolves to {got}, not the host's {host_torch}: "
                         f"the commit's dependencies replaced torch (pin torch to the host's version)")
    if not got:
        raise StepFailed("`import torch` fails in the new environment and the host has no torch to inherit")


def build(checkout: Path, env_dir: Path, device: str, log, timeout: int, adapter: str, mode: str,
          extra: list[str]) -> dict:
    make_venv(env_dir, log)
    py = harness.env_python(env_dir)
    installer = install(py, checkout, env_dir, mode, extra, log, timeout)
    info = probe(py, device, adapter, log, timeout)
    check_torch(info, host_module_origin("torch"))
    where = os.path.realpath(env_dir if mode == "pip" else checkout)
    files = info["package_files"]
    if not files or not all(os.path.realpath(f).startswith(where + os.sep) for f in files):
        raise StepFailed(f"`import {info['package']}` in the new environment resolves to {files or 'nothing'}, "
                         f"not inside {where}: the commit's package was not {'installed into' if mode == 'pip' else 'found in'} it")
    return {"status": "ok", "installer": installer, "install": mode, "env_dir": str(env_dir), **info}


# ----------------------------------------------------------------------------- probe (inside the env)

def _driver_version() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def probe_main(device: str, adapter_file: str) -> int:
    import importlib.metadata as md
    import platform

    import torch

    import adapter_api

    adapter = adapter_api.load(adapter_file)
    package = getattr(adapter, "PACKAGE", "nsa")
    module = importlib.import_module(package)
    # A namespace package (no __init__.py) has no __file__: its portions are its __path__.
    files = [module.__file__] if getattr(module, "__file__", None) else list(getattr(module, "__path__", []))
    cuda = device == "cuda" and torch.cuda.is_available()
    # First distribution of each name in sys.path order: the one `import` would actually load.
    first = {}
    for d in md.distributions():
        name = d.metadata["Name"]
        if name:
            first.setdefault(name.lower(), f"{name}=={d.version}")
    try:
        version = adapter_api.call_optional(adapter, "version")
    except Exception as e:  # the record says why rather than failing the whole environment
        version = f"unknown ({type(e).__name__}: {e})"
    info = {
        "python": platform.python_version(), "python_executable": sys.executable,
        "torch": torch.__version__, "torch_file": torch.__file__,
        "cuda": torch.version.cuda if cuda else None, "cuda_available": bool(torch.cuda.is_available()),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "driver": _driver_version() if cuda else None,
        "adapter": {"name": getattr(adapter, "NAME", Path(adapter_file).stem), "file": adapter_file,
                    "api": adapter.ADAPTER_API},
        "package": package, "package_files": files, "implementation_version": version,
        "pip_freeze": sorted(first.values(), key=str.lower),
    }
    print(json.dumps(info, default=str))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode")
    p = sub.add_parser("probe", help="(inside the new env) print what it holds as JSON")
    p.add_argument("--device", default="cpu")
    p.add_argument("--adapter", required=True)
    ap.add_argument("--checkout", type=Path)
    ap.add_argument("--env", type=Path, help="the venv to (re)create")
    ap.add_argument("--out", type=Path, help="env.json")
    ap.add_argument("--log", type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--adapter", help="the adapter file (workflow/adapters/README.md)")
    ap.add_argument("--install", default="pip", choices=["pip", "pythonpath"])
    ap.add_argument("--extra", default="[]", help="JSON list of extra pip requirements")
    args = ap.parse_args(argv)
    if args.mode == "probe":
        return probe_main(args.device, args.adapter)
    harness.exit_on_sigterm()
    args.log.parent.mkdir(parents=True, exist_ok=True)
    # Appended to: the rule sends this process's own errors (stderr) to the same log.
    with open(args.log, "a") as log:
        try:
            record = build(args.checkout, args.env, args.device, log, args.timeout, args.adapter, args.install,
                           json.loads(args.extra))
        except (StepFailed, OSError, ValueError, KeyError) as e:
            log.write(f"\nFAILED: {e}\n")
            log.flush()
            record = harness.failed(str(e), harness.file_tail(args.log), installer=None)
    harness.write_json(args.out, record)
    print(f"environment {args.env}: {record['status']}" + (f" ({record.get('error')})" if record["status"] != "ok" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
