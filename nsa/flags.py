"""Every ``NSA_*`` environment variable, read once, validated, frozen.

This is the only module that looks at the environment. The rest of the package asks
:func:`settings` for a typed :class:`Settings` object. Tests that need other values use
:func:`override` (a context manager; also ``nsa.override_settings``) or :func:`reload_settings` after changing ``os.environ``.
``import nsa`` reads the settings once, so a bad value fails there, not at the first forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping

import torch

# Upper bound on any reserve value, whatever the device: a typo such as an extra three zeros
# should fail here with a clear message, not as an out-of-memory error deep inside a kernel.
# The device-memory check happens when a workspace is first sized (see ``nsa.ops.workspace``).
MAX_RESERVE = 2**40


class SettingsError(ValueError):
    """An ``NSA_*`` variable holds a value outside what it accepts."""


@dataclasses.dataclass(frozen=True)
class Settings:
    # Routes (booleans).
    prefill_batched: bool = True  # NSA_PREFILL_BATCHED: vectorised prefill (1) or per-token reference (0)
    sel_ranges_v2: bool = True  # NSA_SEL_RANGES_V2: vectorised range builder (1) or reference (0)
    use_sel_pack: bool = True  # NSA_USE_SEL_PACK: packed selection (1) or gather route (0)
    use_fa2: bool = False  # NSA_USE_FA2: master switch for the FlashAttention-2 routes
    use_fa2_cmp: bool = True  # NSA_USE_FA2_CMP: compressed branch through FA-2 (needs NSA_USE_FA2)
    use_fa2_win: bool = True  # NSA_USE_FA2_WIN: window branch through FA-2 (needs NSA_USE_FA2)
    use_flex: bool = True  # NSA_USE_FLEX: FlexAttention for GPU selection/window where Triton does not run them
    use_triton: bool = True  # NSA_USE_TRITON: GPU Triton kernels (compressed, scoring, selection, window, decode)
    # NSA_USE_TRITON_ELEMENTWISE: GPU prefill/training RoPE and gated combine in one Triton pass each
    # (H100, issue 8's layer at 64K: forward 82.4 -> 67.5 ms, forward + backward 233.8 -> 200.0)
    use_triton_elementwise: bool = True
    # Workspace reserves (0 = grow on demand).
    sel_pack_reserve_n: int = 0  # NSA_SEL_PACK_RESERVE_N: packed-selection rows
    sel_pack_reserve_l: int = 0  # NSA_SEL_PACK_RESERVE_L: keys per packed-selection row
    varlen_reserve_n: int = 0  # NSA_VARLEN_RESERVE_N: varlen query rows
    varlen_reserve_k: int = 0  # NSA_VARLEN_RESERVE_K: varlen packed keys/values
    # Rows per chunk of the packed-selection prefill; bounds its workspace (0 = automatic).
    sel_pack_chunk_rows: int = 0  # NSA_SEL_PACK_CHUNK_ROWS

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def as_env(self) -> dict[str, str]:
        """The settings as the environment variables that would produce them."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[_ENV_NAMES[f.name]] = str(int(value)) if isinstance(value, bool) else str(value)
        return out


_ENV_NAMES = {
    "prefill_batched": "NSA_PREFILL_BATCHED",
    "sel_ranges_v2": "NSA_SEL_RANGES_V2",
    "use_sel_pack": "NSA_USE_SEL_PACK",
    "use_fa2": "NSA_USE_FA2",
    "use_fa2_cmp": "NSA_USE_FA2_CMP",
    "use_fa2_win": "NSA_USE_FA2_WIN",
    "use_flex": "NSA_USE_FLEX",
    "use_triton": "NSA_USE_TRITON",
    "use_triton_elementwise": "NSA_USE_TRITON_ELEMENTWISE",
    "sel_pack_reserve_n": "NSA_SEL_PACK_RESERVE_N",
    "sel_pack_reserve_l": "NSA_SEL_PACK_RESERVE_L",
    "varlen_reserve_n": "NSA_VARLEN_RESERVE_N",
    "varlen_reserve_k": "NSA_VARLEN_RESERVE_K",
    "sel_pack_chunk_rows": "NSA_SEL_PACK_CHUNK_ROWS",
}
ENV_VARS = tuple(_ENV_NAMES.values())

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_INT = re.compile(r"^[0-9]+$")


def _parse_bool(var: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(
        f"{var}={raw!r} is not a boolean; accepted: 1/0, true/false, yes/no, on/off"
    )


def _parse_reserve(var: str, raw: str) -> int:
    value = raw.strip().replace("_", "")
    if not _INT.match(value):
        raise SettingsError(
            f"{var}={raw!r} is not a non-negative integer; accepted: a plain decimal integer "
            f"from 0 (grow on demand) to {MAX_RESERVE} (no suffixes, signs or expressions)"
        )
    number = int(value)
    if number > MAX_RESERVE:
        raise SettingsError(f"{var}={raw!r} exceeds the limit {MAX_RESERVE}; accepted: 0..{MAX_RESERVE}")
    return number


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Build validated settings from ``environ`` (default: ``os.environ``)."""
    environ = os.environ if environ is None else environ
    unknown = sorted(k for k in environ if k.startswith("NSA_") and k not in ENV_VARS)
    if unknown:
        # A misspelt flag silently doing nothing is the worst outcome for a benchmark.
        given = ", ".join(f"{k}={environ[k]!r}" for k in unknown)
        raise SettingsError(f"unknown NSA_* variable(s): {given}; accepted: {', '.join(ENV_VARS)}")
    values = {}
    for f in dataclasses.fields(Settings):
        var = _ENV_NAMES[f.name]
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        values[f.name] = _parse_bool(var, raw) if f.type in (bool, "bool") else _parse_reserve(var, raw)
    return Settings(**values)


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of ``device`` (host RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - exotic hosts
        return 2**62


def _largest_memory_bytes() -> int:
    # CUDA devices are asked only when CUDA is already initialised: initialising it here, at import,
    # would cost seconds and break programs that fork workers after `import nsa` (even
    # torch.cuda.is_available() may touch the driver, so only is_initialized() is asked).
    sizes = [device_memory_bytes(torch.device("cpu"))]
    if torch.cuda.is_initialized():
        sizes += [device_memory_bytes(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    return max(sizes)


# The smallest element a workspace holds (float16/bfloat16) and the narrowest head (1 value).
_MIN_BYTES_PER_VALUE = 2


def check_reserves_fit(s: Settings) -> None:
    """Reserves that cannot fit in memory at any dtype or head width fail now, not at first use.

    The exact check (dtype and head width known) runs when a workspace is first sized.
    """
    limit = _largest_memory_bytes()
    sel_pack = ((max(s.sel_pack_reserve_n, 1) * max(s.sel_pack_reserve_l, 1))
                if s.sel_pack_reserve_n or s.sel_pack_reserve_l else 0)
    for names, count in ((("sel_pack_reserve_n", "sel_pack_reserve_l"), sel_pack),
                         (("varlen_reserve_n",), s.varlen_reserve_n), (("varlen_reserve_k",), s.varlen_reserve_k)):
        need = count * _MIN_BYTES_PER_VALUE
        if need > limit:
            given = " x ".join(f"{_ENV_NAMES[n]}={getattr(s, n)}" for n in names)
            raise SettingsError(
                f"{given} needs at least {need} bytes (2-byte values, head dim 1), more than the largest memory "
                f"here ({limit} bytes); accepted: reserves whose workspace fits in device memory (0 = grow on demand)"
            )


_current: Settings | None = None


def settings() -> Settings:
    """The process-wide settings, read from the environment on first use (``import nsa`` does)."""
    global _current
    if _current is None:
        _current = reload_settings()
    return _current


def reload_settings() -> Settings:
    """Re-read and validate the environment (after tests change ``os.environ``)."""
    global _current
    fresh = from_env()
    check_reserves_fit(fresh)
    _current = fresh
    return _current


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Temporarily replace some settings: ``with override(use_sel_pack=False): ...``."""
    global _current
    previous = settings()
    bad = sorted(set(changes) - {f.name for f in dataclasses.fields(Settings)})
    if bad:
        raise SettingsError(f"unknown setting(s) {bad}; accepted: {sorted(_ENV_NAMES)}")
    _current = dataclasses.replace(previous, **changes)
    try:
        yield _current
    finally:
        _current = previous
