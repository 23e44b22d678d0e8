"""Reusable workspaces with counters, pre-sized by the ``NSA_*_RESERVE_*`` knobs.

A workspace is one flat buffer per (device, dtype) that hands out contiguous views of exactly the
requested shape. Because a view of the same shape has the same layout whatever the capacity behind
it, pre-sizing never changes an output bit; it only changes how often the buffer grows.
"""

from __future__ import annotations

import dataclasses

import torch

from ..flags import SettingsError, device_memory_bytes


@dataclasses.dataclass
class _Counters:
    allocations: int = 0  # buffers allocated (first sizing included)
    growth_events: int = 0  # re-allocations because a call needed more than the capacity
    bytes_reserved: int = 0  # bytes currently held across this workspace's buffers
    high_water_rows: int = 0  # most rows one call asked for
    high_water_keys: int = 0  # most keys (per row, or in total for varlen) one call asked for
    capacity_rows: int = 0
    capacity_keys: int = 0
    requests: int = 0


class Workspace:
    """Rows x keys capacity; ``buffer(tag, numel, dtype, device)`` returns a flat view."""

    def __init__(self, name: str, rows_var: str, keys_var: str):
        self.name = name
        self.rows_var, self.keys_var = rows_var, keys_var
        self.counters = _Counters()
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._capacity: dict[tuple, tuple[int, int]] = {}

    def buffer(self, tag: str, rows: int | None, keys: int | None, width: int, dtype: torch.dtype,
               device: torch.device, reserve: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """A contiguous ``[rows * keys * width]`` view; grows the backing buffer when needed.

        Pass ``None`` for a dimension the buffer does not have (the varlen workspace keeps query
        rows and packed keys in separate buffers); its reserve then does not apply. ``reserve``
        ``(rows, keys)`` pre-sizes a buffer at its first allocation (0 = exactly what the call
        needs); the route table passes the ``NSA_*_RESERVE_*`` settings, the workspace reads none.
        """
        c = self.counters
        # Inside torch.compile the request counters are left alone: reading them would make every
        # count a new guard (a recompile per step). Sizes and growth are still tracked below.
        if not torch.compiler.is_compiling():
            c.requests += 1
            if rows is not None:
                c.high_water_rows = max(c.high_water_rows, rows)
            if keys is not None:
                c.high_water_keys = max(c.high_water_keys, keys)
        rows_, keys_ = (1 if rows is None else rows), (1 if keys is None else keys)
        key = (tag, device, dtype, width)
        cap_rows, cap_keys = self._capacity.get(key, (0, 0))
        if rows_ > cap_rows or keys_ > cap_keys:
            reserve_rows, reserve_keys = reserve if key not in self._buffers else (0, 0)
            new_rows = max(rows_, cap_rows, reserve_rows if rows is not None else 0)
            new_keys = max(keys_, cap_keys, reserve_keys if keys is not None else 0)
            nbytes = new_rows * new_keys * width * torch.empty((), dtype=dtype).element_size()
            limit = device_memory_bytes(device)
            if nbytes > limit:
                raise SettingsError(
                    f"workspace {self.name!r} would need {nbytes} bytes ({self.rows_var}={new_rows} rows x "
                    f"{self.keys_var}={new_keys} keys x {width} values), more than the {device} has "
                    f"({limit} bytes); lower {self.rows_var} / {self.keys_var} (an op's workspace_reserve)"
                )
            old = self._buffers.pop(key, None)
            if old is not None:
                c.growth_events += 1
                c.bytes_reserved -= old.numel() * old.element_size()
                del old
            self._buffers[key] = torch.empty(new_rows * new_keys * width, dtype=dtype, device=device)
            self._capacity[key] = (new_rows, new_keys)
            c.allocations += 1
            c.bytes_reserved += nbytes
            if rows is not None:
                c.capacity_rows = max(c.capacity_rows, new_rows)
            if keys is not None:
                c.capacity_keys = max(c.capacity_keys, new_keys)
        return self._buffers[key][: rows_ * keys_ * width]

    def reset(self):
        self._buffers.clear()
        self._capacity.clear()
        self.counters = _Counters()

    def stats(self) -> dict:
        return dataclasses.asdict(self.counters)


SEL_PACK = Workspace("sel_pack", "NSA_SEL_PACK_RESERVE_N", "NSA_SEL_PACK_RESERVE_L")
VARLEN = Workspace("varlen", "NSA_VARLEN_RESERVE_N", "NSA_VARLEN_RESERVE_K")
_ALL = (SEL_PACK, VARLEN)


def workspace_stats() -> dict[str, dict]:
    """Counters per workspace: allocations, growth events, bytes reserved, high-water marks."""
    return {ws.name: ws.stats() for ws in _ALL}


def reset_workspaces() -> None:
    """Free every workspace buffer and zero the counters."""
    for ws in _ALL:
        ws.reset()
