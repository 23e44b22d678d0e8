"""The adapter protocol: how the harness drives *an* NSA implementation (workflow/adapters/README.md).

An adapter is one Python file, kept in the workflow (never in the commit under test), so it works
for any old commit. The harness loads it twice: in the Snakemake process at start-up (to check
the configuration: ``INSTALL``, ``CAPABILITIES``, ``check_env``; no torch there) and inside each
commit's environment (to build layers and run them). So an adapter imports only the standard
library at module level and imports torch and the implementation inside its functions.

Only the standard library is imported here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ADAPTER_API = 1  # bump when a required name or a signature below changes

ADAPTERS_DIR = Path(__file__).resolve().parents[1] / "adapters"
# Built-in adapters by the name users write in config.yaml (implementation.adapter).
BUILTIN = {
    "nsa": "nsa.py",
    "nsa-vibe": "nsa_vibe.py",
    "lucidrains": "lucidrains.py",
    "fla": "fla.py",
}
REQUIRED = ("build_layer", "forward")
OPTIONAL = ("check_env", "new_cache", "prefill", "decode_step", "prepare_decode", "routes", "workspace_stats",
            "reset_workspaces", "selected_blocks", "version")
CAPABILITY_NAMES = ("decode", "backward", "cuda_graph", "compile", "workspaces", "block_indices")
DEVICES = ("cpu", "cuda")
INSTALL_MODES = ("pip", "pythonpath")


class Unsupported(Exception):
    """The implementation cannot do what was asked (a model field, a device, a dtype, a stage).

    Raise it as ``Unsupported("unsupported: block_stride=16 (this implementation needs ...)")``;
    the harness records the stage as "not supported by this implementation", never as a failure.
    """


class AdapterError(ValueError):
    """An adapter file that cannot be used: missing, wrong API version, missing names."""


def adapter_path(name_or_path: str, base: Path | None = None) -> Path:
    """The file of a built-in adapter (by name) or of a user's adapter (a path, relative to ``base``)."""
    if name_or_path in BUILTIN:
        return ADAPTERS_DIR / BUILTIN[name_or_path]
    path = Path(name_or_path).expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    if path.suffix != ".py" or not path.is_file():
        raise AdapterError(f"config key implementation.adapter = {name_or_path!r}: no such adapter; accepted: "
                           f"{', '.join(BUILTIN)} or the path of a .py file (workflow/adapters/README.md)")
    return path.resolve()


def load(path) -> ModuleType:
    """Import the adapter file at ``path`` under a private module name and check its shape."""
    path = Path(path)
    name = f"_nsa_adapter_{path.stem.replace('-', '_')}"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise AdapterError(f"adapter {path}: not importable")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    problems = check_module(module)
    if problems:
        raise AdapterError(f"adapter {path}: " + "; ".join(problems))
    return module


def check_module(module) -> list[str]:
    """What is wrong with an adapter module (empty when it follows the protocol)."""
    problems = []
    api = getattr(module, "ADAPTER_API", None)
    if api != ADAPTER_API:
        problems.append(f"ADAPTER_API is {api!r}; this harness drives version {ADAPTER_API}")
    problems += [f"defines no {n}()" for n in REQUIRED if not callable(getattr(module, n, None))]
    caps = getattr(module, "CAPABILITIES", None)
    if not isinstance(caps, dict):
        problems.append("defines no CAPABILITIES mapping")
    else:
        unknown = sorted(set(caps) - set(CAPABILITY_NAMES) - {"devices", "dtypes"})
        if unknown:
            problems.append(f"CAPABILITIES has unknown keys {unknown}; accepted: {', '.join(CAPABILITY_NAMES)}, devices, dtypes")
        if caps.get("decode") and not all(callable(getattr(module, n, None)) for n in ("new_cache", "prefill", "decode_step")):
            problems.append("CAPABILITIES['decode'] is true but new_cache/prefill/decode_step are not all defined")
    if getattr(module, "INSTALL", "pip") not in INSTALL_MODES:
        problems.append(f"INSTALL is {module.INSTALL!r}; accepted: {', '.join(INSTALL_MODES)}")
    return problems


def capabilities(module) -> dict:
    """CAPABILITIES with every flag present (missing ones are False) and the devices/dtypes it runs on."""
    caps = dict(getattr(module, "CAPABILITIES", {}))
    out = {name: bool(caps.get(name, False)) for name in CAPABILITY_NAMES}
    out["devices"] = list(caps.get("devices", DEVICES))
    out["dtypes"] = list(caps.get("dtypes", ("float32", "bfloat16", "float16")))
    return out


def unsupported_on(module, device: str, dtype: str | None = None) -> str | None:
    """Why the implementation cannot run on ``device``/``dtype`` (None when it can)."""
    caps = capabilities(module)
    if device not in caps["devices"]:
        return f"unsupported: device={device} (this implementation runs on {', '.join(caps['devices']) or 'nothing'})"
    if dtype is not None and dtype not in caps["dtypes"]:
        return f"unsupported: dtype={dtype} (this implementation runs in {', '.join(caps['dtypes'])})"
    return None


def check_env(module, variables: dict) -> list[str]:
    """The adapter's own check of the implementation's variables; one problem per line."""
    fn = getattr(module, "check_env", None)
    if fn is None:
        return []
    # Values as the job's environment will hold them (harness.child_env: a YAML true becomes "1").
    as_env = {str(k): str(int(v)) if isinstance(v, bool) else str(v) for k, v in variables.items()}
    return [str(p) for p in (fn(as_env) or [])]


def check_fields(model: dict, accepted) -> None:
    """Raise Unsupported naming the first model field the adapter does not know (never ignore one)
    or the first of ``accepted`` that is missing."""
    unknown = sorted(set(model) - set(accepted))
    if unknown:
        raise Unsupported(f"unsupported: {unknown[0]}={model[unknown[0]]!r} (this adapter maps {', '.join(accepted)})")
    missing = [f for f in accepted if f not in model]
    if missing:
        raise Unsupported(f"unsupported: {missing[0]}=None (every model field must be given)")


@contextlib.contextmanager
def recording(owner, name: str):
    """Within the block, ``owner.name`` also appends each of its results (detached copies) to the
    list this yields: how adapters observe e.g. the selected blocks without changing the code under
    test, whatever the wrapped function's signature is in that commit."""
    original = getattr(owner, name)
    seen = []

    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        seen.append(out.detach().clone())
        return out

    setattr(owner, name, wrapper)
    try:
        yield seen
    finally:
        setattr(owner, name, original)


def call_optional(module, name: str, *args, default=None, **kwargs):
    fn = getattr(module, name, None)
    return default if fn is None else fn(*args, **kwargs)
