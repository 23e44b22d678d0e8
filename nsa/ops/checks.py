"""Argument checks shared by the public ops: each failure is a ``ValueError`` naming the op, the
argument, its value and what is accepted.

Checks on shapes, dtypes and Python numbers run on the host and cost nothing on the device. Checks
on tensor *values* (block indices, positions) need the values on the host, which on a GPU is a
synchronisation; :func:`check_values` decides when they run (see its docstring).
"""

from __future__ import annotations

import numbers

import torch

_INT_DTYPES = tuple(getattr(torch, name) for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                                                      "uint64") if hasattr(torch, name))
_INT_NAMES = ", ".join(str(d).replace("torch.", "") for d in _INT_DTYPES)


def fail(op: str, arg: str, value, accepted: str):
    raise ValueError(f"{op}: {arg}={value!r} is invalid; accepted: {accepted}")


def need_int(op: str, arg: str, value, minimum: int = 1) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        fail(op, arg, value, f"an integer >= {minimum}")
    return int(value)


def need_scale(op: str, scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (0 < float(scale) < float("inf")):
        fail(op, "scale", scale, "None (1/sqrt(d_k)) or a finite number > 0")
    return float(scale)


def need_compression(op: str, block_len, block_stride) -> tuple[int, int]:
    """The spec's constraints on ``l`` and ``d``: ``0 < d <= l`` and ``l % d == 0``."""
    block_len = need_int(op, "block_len", block_len)
    block_stride = need_int(op, "block_stride", block_stride)
    if block_stride > block_len:
        fail(op, "block_stride", block_stride, f"0 < block_stride <= block_len ({block_len})")
    if block_len % block_stride:
        fail(op, "block_len", block_len, f"a multiple of block_stride ({block_stride})")
    return block_len, block_stride


def need_tensor(op: str, arg: str, x, ndim: int, layout: str, *, floating: bool = True) -> torch.Tensor:
    """``x`` is a tensor of ``ndim`` dims (``layout`` names them for the message)."""
    if not isinstance(x, torch.Tensor):
        fail(op, arg, type(x).__name__, f"a torch.Tensor {layout}")
    if x.dim() != ndim:
        fail(op, f"{arg}.shape", list(x.shape), f"{ndim} dims {layout}")
    if floating and not x.is_floating_point():
        fail(op, f"{arg}.dtype", x.dtype, "a floating dtype (float16, bfloat16, float32, float64)")
    return x


def need_index(op: str, arg: str, x, shape: tuple | None, layout: str) -> torch.Tensor:
    """An integer index tensor of any integer dtype (``shape`` entries of None are free), returned
    as int64: what every route computes with (a no-op for int64 input)."""
    if not isinstance(x, torch.Tensor):
        fail(op, arg, type(x).__name__, f"an integer torch.Tensor {layout}")
    if x.dtype not in _INT_DTYPES:
        fail(op, f"{arg}.dtype", x.dtype, f"any integer dtype ({_INT_NAMES})")
    if shape is not None and (x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape))):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        fail(op, f"{arg}.shape", list(x.shape), f"[{want}] {layout}")
    return x.long()


def need_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{name}.dtype={d}" for name, d in dtypes.items())
        raise ValueError(f"{op}: mixed dtypes ({given}); accepted: one floating dtype for all of "
                         f"{', '.join(tensors)} (cast them first; the computation runs in that dtype)")


def need_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        given = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"{op}: tensors on different devices ({given}); accepted: all on one device")


def need_groups(op: str, heads: int, groups: int, heads_arg: str, groups_arg: str) -> int:
    """``H = G * h``: returns ``h``."""
    if groups < 1 or heads % groups:
        raise ValueError(f"{op}: {heads_arg} has {heads} heads and {groups_arg} has {groups} groups; accepted: "
                         f"a head count divisible by the group count (H = G * h, GQA)")
    return heads // groups


def need_attention_inputs(op: str, q, k, v, *, q_name: str = "q", k_name: str = "k", v_name: str = "v") -> int:
    """``q [B, T, H, d_k]``, ``k [B, S, G, d_k]``, ``v [B, S, G, d_v]``, one dtype and device; returns ``h``."""
    need_tensor(op, q_name, q, 4, "[B, T, H, d_k]")
    need_tensor(op, k_name, k, 4, "[B, S, G, d_k]")
    need_tensor(op, v_name, v, 4, "[B, S, G, d_v]")
    need_same_dtype(op, **{q_name: q, k_name: k, v_name: v})
    need_same_device(op, **{q_name: q, k_name: k, v_name: v})
    B, _, H, Dk = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        fail(op, f"{k_name}.shape/{v_name}.shape", (list(k.shape), list(v.shape)), f"batch {B} as in {q_name}")
    if k.shape[3] != Dk:
        fail(op, f"{k_name}.shape", list(k.shape), f"head dim d_k={Dk} as in {q_name}")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        fail(op, f"{v_name}.shape", list(v.shape), f"[B, S, G, d_v] with S, G as in {k_name} {list(k.shape)}")
    return need_groups(op, H, k.shape[2], q_name, k_name)


def need_positions(op: str, positions, T: int, device: torch.device) -> torch.Tensor | None:
    """``positions [T]`` (or None) on ``device``, returned as int64."""
    if positions is None:
        return None
    if isinstance(positions, torch.Tensor) and positions.device != device:
        fail(op, "positions.device", str(positions.device), f"the queries' device ({device})")
    return need_index(op, "positions", positions, (T,), "[T]: the absolute position of each query")


def check_values(validate: bool | None, *tensors: torch.Tensor) -> bool:
    """Whether to check tensor values now.

    ``validate=None`` (the default of every op): only when every tensor is on the CPU, where reading
    values costs no device synchronisation; never while ``torch.compile`` traces (a data-dependent
    branch would break the graph). ``True``: always (on a GPU this synchronises). ``False``: never;
    the caller vouches for the values (the NSA module does, on its hot paths).
    """
    if validate is False:
        return False
    if validate is None and (torch.compiler.is_compiling() or any(t.device.type != "cpu" for t in tensors)):
        return False
    return True


def need_nonnegative_positions(op: str, positions: torch.Tensor | None, validate: bool | None) -> None:
    if positions is None or positions.numel() == 0 or not check_values(validate, positions):
        return
    low = int(positions.min())
    if low < 0:
        fail(op, "positions", f"tensor with min {low}", "positions >= 0")
