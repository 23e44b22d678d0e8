"""The NSA attention layer: three branches, sigmoid gates, one output projection.

    o_t = g_cmp * Attn(q_t, phi(K, V)) + g_slc * Attn(q_t, selected blocks) + g_win * Attn(q_t, last w)

Read top to bottom: projections, the three branches (prefill), the decode step with its caches.
The how of each branch lives in :mod:`nsa.ops`; which kernel runs lives in :mod:`nsa.routes`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from . import routes
from .config import NSAConfig
from .ops import naive
from .ops.common import acc_dtype, gated_combine
from .ops.compressed import compress_tokens, compressed_attention
from .ops.rope import apply_rope, rope_inv_freq
from .ops.selection import overlap_matrix, select_blocks, selection_scores
from .ops.window import ring_window_attention


_CACHE_ROWS = ("slc", "win", "raw", "cmp")  # the caches of each of K and V, in their buffer's row order


@dataclasses.dataclass
class NSACache:
    """Preallocated decode caches of one layer (spec "Decode"); every shape is fixed at creation.

    ``pos`` is the next position as a device tensor, so ``decode_step`` never reads it on the host.
    The eight caches are row ranges (dim 1) of one buffer ``[B, rows, G, d]`` when ``d_k == d_v``,
    else of two (keys', values'): a compiled decode step appends its six rows with one ``index_copy_``
    per buffer, one kernel where six separate caches took six (H100 profile, seed layer).
    """

    buffers: tuple  # one [B, rows, G, d] tensor, or the keys' and the values'
    rows: dict  # cache name ("k_slc", ...) -> (buffer index, first row, row count)
    pos: torch.Tensor  # [1] long: tokens held
    overlap: torch.Tensor  # [N, nb] selection-score overlap matrix for max_len, in the scores' dtype
    max_len: int
    inv_freq: torch.Tensor  # [d_k/2] float32 RoPE frequencies (the Triton token step's)
    prefilled: bool = False
    steps: int = 0  # decode steps issued from Python (graph replays do not count)

    def view(self, name: str) -> torch.Tensor:
        """One cache, a view of its buffer:

        - ``k_slc`` / ``v_slc [B, max_len, G, d]``: raw selection keys (RoPE applied) and values, all tokens;
        - ``k_win`` / ``v_win [B, W, G, d]``: ring of the last ``W = min(w, max_len)`` window keys/values;
        - ``k_raw`` / ``v_raw [B, l, G, d]``: ring of the last ``l`` raw compression-branch keys/values;
        - ``k_cmp`` / ``v_cmp [B, N + 1, G, d]``: compressed keys/values; slot ``N`` is scratch for
          non-emitting steps.
        """
        buf, start, n = self.rows[name]
        return self.buffers[buf][:, start:start + n]

    k_slc = property(lambda self: self.view("k_slc"))
    v_slc = property(lambda self: self.view("v_slc"))
    k_win = property(lambda self: self.view("k_win"))
    v_win = property(lambda self: self.view("v_win"))
    k_raw = property(lambda self: self.view("k_raw"))
    v_raw = property(lambda self: self.view("v_raw"))
    k_cmp = property(lambda self: self.view("k_cmp"))
    v_cmp = property(lambda self: self.view("v_cmp"))

    def write(self, rows) -> None:
        """``rows``: ``(cache name, row index [n] long, values [B, n, G, d])``. Under ``torch.compile``
        one ``index_copy_`` per buffer (inductor makes it one kernel); eagerly one per cache, on its
        view, which needs no index arithmetic (in eager and CUDA-graph steps every op is a launch)."""
        if not torch.compiler.is_compiling():
            for name, index, values in rows:
                self.view(name).index_copy_(1, index, values)
            return
        for b, buf in enumerate(self.buffers):
            mine = [(self.rows[name][1] + index, values) for name, index, values in rows if self.rows[name][0] == b]
            if mine:
                buf.index_copy_(1, torch.cat([i for i, _ in mine]), torch.cat([v for _, v in mine], dim=1))

    def read(self, rows) -> list:
        """``rows``: ``(cache name, row index [n] long)``; the rows ``[B, n, G, d]`` of each, one
        ``index_select`` per buffer under ``torch.compile``, one per cache eagerly (as :meth:`write`)."""
        if not torch.compiler.is_compiling():
            return [self.view(name).index_select(1, index) for name, index in rows]
        out = [None] * len(rows)
        for b, buf in enumerate(self.buffers):
            mine = [(k, self.rows[name][1] + index) for k, (name, index) in enumerate(rows) if self.rows[name][0] == b]
            if mine:
                got = buf.index_select(1, torch.cat([i for _, i in mine]))
                for (k, _), part in zip(mine, got.split([i.numel() for _, i in mine], dim=1)):
                    out[k] = part
        return out

    def reset(self) -> None:
        self.pos.zero_()
        self.prefilled, self.steps = False, 0


class NSAAttention(nn.Module):
    def __init__(self, cfg: NSAConfig):
        super().__init__()
        if not isinstance(cfg, NSAConfig):
            raise TypeError(f"NSAAttention takes an NSAConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        H, G, dk, dv, l = cfg.num_heads, cfg.groups, cfg.d_k, cfg.d_v, cfg.block_len
        # One matmul for every projection; each branch still has its own K/V weights (paper §3.3).
        # Order: queries and the two RoPE'd keys first (one rotation covers them), then the rest.
        self.split = [H * dk, G * dk, G * dk, G * dk, G * dv, G * dv, G * dv]
        gate_in_proj = cfg.gate_hidden == 0
        self.proj = nn.Linear(cfg.dim, sum(self.split) + (3 * H if gate_in_proj else 0), bias=False)
        self.gate_mlp = None if gate_in_proj else nn.Sequential(
            nn.Linear(cfg.dim, cfg.gate_hidden), nn.SiLU(), nn.Linear(cfg.gate_hidden, 3 * H))
        self.out = nn.Linear(H * dv, cfg.dim, bias=False)
        self._compiled_decode = None
        # The route of each branch the last forward/prefill took, as backends() names them ({} before).
        self.routes_taken: dict = {}
        # phi: intra-block position embedding plus a linear map of the flattened block.
        self.pos_k = nn.Parameter(torch.zeros(l, dk))
        self.pos_v = nn.Parameter(torch.zeros(l, dv))
        self.phi_k = nn.Parameter(torch.empty(l * dk, dk))
        self.phi_v = nn.Parameter(torch.empty(l * dv, dv))
        self.phi_k_bias = nn.Parameter(torch.zeros(dk))
        self.phi_v_bias = nn.Parameter(torch.zeros(dv))
        self.reset_phi()

    def reset_phi(self):
        """Start phi near mean pooling, so early training sees sensible compressed tokens."""
        l = self.cfg.block_len
        for w, d in ((self.phi_k, self.cfg.d_k), (self.phi_v, self.cfg.d_v)):
            with torch.no_grad():
                w.copy_(torch.eye(d).repeat(l, 1) / l + torch.randn(l * d, d) / math.sqrt(l * d) * 0.1)

    # --- projections ------------------------------------------------------------------------------

    def _project(self, x: torch.Tensor, positions: torch.Tensor, rope=apply_rope):
        cfg = self.cfg
        B, T, _ = x.shape
        H, G = cfg.num_heads, cfg.groups
        y = self.proj(x)
        parts = torch.split(y, self.split + ([3 * H] if self.gate_mlp is None else []), dim=-1)
        q, _, _, kc, vc, vs, vw = parts[:7]
        q = q.view(B, T, H, cfg.d_k)
        kc = kc.view(B, T, G, cfg.d_k)
        vc, vs, vw = (p.view(B, T, G, cfg.d_v) for p in (vc, vs, vw))
        gate_logits = parts[7] if self.gate_mlp is None else self.gate_mlp(x)
        gates = torch.sigmoid(gate_logits).view(B, T, H, 3)
        # RoPE for the slc and win branches; compressed keys carry positions through phi instead.
        rotated = rope(y[..., : (H + 2 * G) * cfg.d_k].view(B, T, H + 2 * G, cfg.d_k), positions,
                       theta=cfg.rope_theta)
        q_rope, ks, kw = rotated.split([H, G, G], dim=2)
        return q, q_rope, kc, vc, ks, vs, kw, vw, gates

    def _projected_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype ``self.proj(x)`` gives: autocast's where autocast is on, else the weights'."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.proj.weight.dtype

    def _compress(self, kc, vc, naive_ops=False):
        cfg = self.cfg
        fn = naive.compress_tokens if naive_ops else compress_tokens
        kw = {"block_len": cfg.block_len, "block_stride": cfg.block_stride, "mode": cfg.compress}
        k_cmp = fn(kc, self.phi_k, self.phi_k_bias, self.pos_k, **kw)
        v_cmp = fn(vc, self.phi_v, self.phi_v_bias, self.pos_v, **kw)
        # Under autocast phi's float32 bias/embedding promote its output; the attention ops take one
        # dtype, that of the projections (a no-op without autocast).
        return k_cmp.to(kc.dtype), v_cmp.to(vc.dtype)

    def _compress_ring(self, kr, vr):
        """phi of the one block in the raw rings ``[B, l, G, d]`` (oldest first): ``[B, 1, G, d]`` each.

        Under ``torch.compile``, where the block is small, as a product and a sum in the accumulation
        dtype, which inductor fuses with the ring's gather: H100, seed layer at 2K context, one gather
        and two two-stage reductions per branch, 7.2 us of the step, where a gather and a GEMM per
        branch took 9.1 us (inductor's reduction unsplit, one kernel, took 11.9). Eagerly the product
        would be materialised, so the matmul of :meth:`_compress` runs there."""
        cfg = self.cfg
        B, l, G, dk = kr.shape
        small = B * G * l * max(dk, vr.shape[-1]) ** 2 <= 1 << 22  # multiply-adds of the two sums
        if not (torch.compiler.is_compiling() and cfg.compress == "linear" and small):
            return self._compress(kr, vr)
        out = []
        for x, weight, bias, pos_emb in ((kr, self.phi_k, self.phi_k_bias, self.pos_k),
                                         (vr, self.phi_v, self.phi_v_bias, self.pos_v)):
            acc = acc_dtype(x.dtype)
            blk = (x.to(acc) + pos_emb.to(acc)[:, None]).permute(0, 2, 1, 3).reshape(B, G, -1, 1)
            y = (blk * weight.to(acc)).sum(2) + bias.to(acc)
            out.append(y[:, None].to(x.dtype))
        return out

    def _combine(self, gates, o_cmp, o_slc, o_win, combine=gated_combine):
        B, T = gates.shape[:2]
        o = combine(gates, o_cmp, o_slc, o_win)
        return self.out(o.reshape(B, T, self.cfg.num_heads * self.cfg.d_v))

    # --- prefill / training -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, dim] -> [B, T, dim]``, causal; differentiable through every branch."""
        return self._prefill(x)[0]

    def _prefill(self, x: torch.Tensor):
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"expected x of shape [B, T, {cfg.dim}], got {list(x.shape)}")
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)
        # Routes follow the dtype the branches compute in, the projections': under autocast that is
        # the autocast dtype while x (a float32 residual stream) is not, and routing by x's dtype ran
        # the float32 reference ops on bf16 tensors. RoPE runs inside the projection step, so its
        # route follows the dtype the projection will give.
        prefill = routes.route_prefill()
        sequential = prefill.name == "sequential"
        taken = {"prefill": prefill}
        rope = apply_rope
        if not sequential:
            taken["rope"] = routes.route_rope(x.device, self._projected_dtype(x))
            rope = taken["rope"].fn
        q, q_rope, kc, vc, ks, vs, kw, vw, gates = self._project(x, positions, rope)
        dev, dtype = x.device, q.dtype
        k_cmp, v_cmp = self._compress(kc, vc, naive_ops=sequential)
        cmp = {"block_len": cfg.block_len, "block_stride": cfg.block_stride}
        slc = {"sel_block_len": cfg.sel_block_len}
        scoring = {"groups": cfg.groups, **cmp, **slc, "num_blocks": cfg.num_sel_blocks(T)}
        if sequential:
            # The per-token reference route: the spec, one query at a time.
            o_cmp, p = naive.compressed_attention(q, k_cmp, v_cmp, **cmp)
            scores = naive.selection_scores(p, **scoring)
            idx = naive.select_blocks(scores, **slc, n_sel=cfg.n_sel)
            o_slc = naive.selection_attention(q_rope, ks, vs, idx, **slc)
            o_win = naive.sliding_window_attention(q_rope, kw, vw, window=cfg.window)
        else:
            # The probabilities always come from the matmul route: they score the selection.
            cmp_route = taken["cmp"] = routes.route_cmp(dev, dtype, cfg.d_k, cfg.d_v)
            if cmp_route.fn is None:
                taken["select"] = routes.SELECT_FROM_CMP
                o_cmp, p = compressed_attention(q, k_cmp, v_cmp, **cmp)
                idx = select_blocks(selection_scores(p, **scoring), **slc, n_sel=cfg.n_sel)
            else:
                # The route's kernel gives the output; the selection is scored a chunk of queries at a
                # time (all probabilities at once grow as T^2), from the route's log-sum-exp if it has one.
                lse = None
                if cmp_route.lse:
                    o_cmp, lse = cmp_route.fn(q, k_cmp, v_cmp, **cmp, return_lse=True)
                else:
                    o_cmp = cmp_route.fn(q, k_cmp, v_cmp, **cmp)
                select = taken["select"] = routes.route_select(dev, dtype, cfg.num_heads, cfg.groups, cfg.d_k,
                                                               cfg.block_len, cfg.block_stride, cfg.sel_block_len)
                idx = select.fn(q, k_cmp, v_cmp, **scoring, n_sel=cfg.n_sel, lse=lse)
            needs_grad = torch.is_grad_enabled() and q_rope.requires_grad
            slc_route = taken["slc"] = routes.route_slc(dev, dtype, cfg.sel_block_len, cfg.d_k, cfg.d_v, needs_grad)
            o_slc = slc_route.fn(q_rope, ks, vs, idx, **slc)
            win_route = taken["win"] = routes.route_win(dev, dtype, cfg.d_k, cfg.d_v, needs_grad)
            o_win = win_route.fn(q_rope, kw, vw, window=cfg.window)
        combine = gated_combine
        if not sequential:
            taken["combine"] = routes.route_combine(dev, dtype)
            combine = taken["combine"].fn
        y = self._combine(gates, o_cmp, o_slc, o_win, combine)
        self.routes_taken = {b: {"route": r.name, "reason": r.reason} for b, r in taken.items()}
        return y, (kc, vc, ks, vs, kw, vw, k_cmp, v_cmp)

    # --- decode -----------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int, device=None, dtype=None) -> NSACache:
        """Preallocate the caches for ``batch`` sequences of up to ``max_len`` tokens."""
        cfg = self.cfg
        if not (isinstance(batch, int) and batch >= 1):
            raise ValueError(f"batch={batch!r} is invalid; accepted: an integer >= 1")
        if not (isinstance(max_len, int) and max_len >= 1):
            raise ValueError(f"max_len={max_len!r} is invalid; accepted: an integer >= 1")
        ref = self.proj.weight
        device = ref.device if device is None else torch.device(device)
        dtype = ref.dtype if dtype is None else dtype
        G, dk, dv = cfg.groups, cfg.d_k, cfg.d_v
        W, n_cmp = min(cfg.window, max_len), cfg.num_cmp(max_len - 1)
        counts = {"slc": max_len, "win": W, "raw": cfg.block_len, "cmp": n_cmp + 1}
        rows, used = {}, [0, 0]
        for kv in "kv":
            buf = 0 if kv == "k" or dk == dv else 1
            for name in _CACHE_ROWS:
                rows[f"{kv}_{name}"] = (buf, used[buf], counts[name])
                used[buf] += counts[name]
        buffers = tuple(torch.zeros(batch, n, G, dk if b == 0 else dv, device=device, dtype=dtype)
                        for b, n in enumerate(used) if n)
        # The overlap weights in the dtype the step computes scores in (float64 for float64 caches),
        # as prefill builds them: rounded weights would move near ties to other blocks.
        return NSACache(buffers, rows, torch.zeros(1, dtype=torch.long, device=device),
                        overlap_matrix(n_cmp, cfg.num_sel_blocks(max_len), cfg.block_len, cfg.block_stride,
                                       cfg.sel_block_len, device, acc_dtype(dtype)),
                        max_len, rope_inv_freq(dk, cfg.rope_theta, device))

    def prefill(self, x: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """Prefill output for ``x [B, T, dim]`` (as ``forward``), and fill ``cache`` with its tokens."""
        cfg = self.cfg
        B, T, _ = x.shape
        if cache.prefilled or cache.steps:
            raise ValueError("cache already holds tokens; prefill takes a fresh cache (cache.reset())")
        if T > cache.max_len or B != cache.k_slc.shape[0]:
            raise ValueError(f"x of shape {list(x.shape)} does not fit the cache "
                             f"(batch {cache.k_slc.shape[0]}, max_len {cache.max_len})")
        y, (kc, vc, ks, vs, kw, vw, k_cmp, v_cmp) = self._prefill(x)
        with torch.no_grad():
            cache.k_slc[:, :T], cache.v_slc[:, :T] = ks, vs
            W, l = cache.k_win.shape[1], cfg.block_len
            tail = torch.arange(max(0, T - W), T, device=x.device)
            cache.k_win[:, tail % W], cache.v_win[:, tail % W] = kw[:, tail], vw[:, tail]
            tail = torch.arange(max(0, T - l), T, device=x.device)
            cache.k_raw[:, tail % l], cache.v_raw[:, tail % l] = kc[:, tail], vc[:, tail]
            n = k_cmp.shape[1]
            cache.k_cmp[:, :n], cache.v_cmp[:, :n] = k_cmp, v_cmp
            cache.pos.fill_(T)
        cache.prefilled = True
        return y

    @torch.no_grad()
    def decode_step(self, x_t: torch.Tensor, cache: NSACache) -> torch.Tensor:
        """Output for one new token ``x_t [B, 1, dim]`` at position ``cache.pos``; appends it.

        No host synchronisation and static shapes: capturable in a CUDA graph.
        """
        cfg = self.cfg
        squeeze = x_t.dim() == 2
        if squeeze:
            x_t = x_t[:, None]
        if x_t.dim() != 3 or tuple(x_t.shape) != (cache.k_slc.shape[0], 1, cfg.dim):
            raise ValueError(f"expected x_t of shape [{cache.k_slc.shape[0]}, 1, {cfg.dim}] (or without the 1), "
                             f"got {list(x_t.shape)}")
        if cache.steps >= cache.max_len:
            raise ValueError(f"cache is full (max_len={cache.max_len}); allocate a longer one")
        cache.steps += 1
        y = (self._compiled_decode or self._decode)(x_t, cache)
        return y[:, 0] if squeeze else y

    def compile_decode(self, **compile_kwargs) -> NSAAttention:
        """Fuse the decode step's small ops with ``torch.compile`` (first call compiles; then use
        ``decode_step`` as usual, eagerly or inside a CUDA graph). Outputs match the eager step."""
        compile_kwargs.setdefault("dynamic", False)
        self._compiled_decode = torch.compile(self._decode, **compile_kwargs)
        return self

    def _decode(self, x_t: torch.Tensor, cache: NSACache) -> torch.Tensor:
        cfg = self.cfg
        pos = cache.pos
        l, d = cfg.block_len, cfg.block_stride
        fused = routes.route_decode(x_t.device, x_t.dtype, cfg.num_heads, cfg.groups, cfg.d_k, cfg.d_v, l, d,
                                    cfg.sel_block_len)
        if fused.prologue is None:
            q, q_rope, gates = self._append(x_t, cache)
        else:  # the same work in one kernel
            y = self.proj(x_t)
            gate_logits = y[..., sum(self.split):] if self.gate_mlp is None else self.gate_mlp(x_t)
            phi = (self.pos_k, self.pos_v, self.phi_k, self.phi_v, self.phi_k_bias, self.phi_v_bias)
            q_rope, gates = fused.prologue(y, gate_logits, cache.buffers, cache.rows, pos, cache.inv_freq, phi,
                                           heads=cfg.num_heads, d_k=cfg.d_k, d_v=cfg.d_v, block_len=l,
                                           block_stride=d, compress=cfg.compress)
            q = y[..., : cfg.num_heads * cfg.d_k].view(x_t.shape[0], 1, cfg.num_heads, cfg.d_k)

        n_cmp = cache.rows["k_cmp"][2] - 1
        k_cmp, v_cmp = cache.k_cmp[:, :n_cmp], cache.v_cmp[:, :n_cmp]
        num_blocks = cfg.num_sel_blocks(cache.max_len)
        if fused.fn is not None:
            o, _ = fused.fn(q, q_rope, gates, k_cmp, v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win, pos,
                            block_len=l, block_stride=d, sel_block_len=cfg.sel_block_len, n_sel=cfg.n_sel,
                            num_blocks=num_blocks)
            cache.pos.add_(1)
            return self.out(o.reshape(x_t.shape[0], 1, cfg.num_heads * cfg.d_v))
        # Value checks off (validate=False): positions and blocks are the step's own, and on a GPU
        # reading them on the host would synchronise every step (the step must stay graph-capturable).
        o_cmp, p = compressed_attention(q, k_cmp, v_cmp, block_len=l, block_stride=d, positions=pos, validate=False)
        slc = {"sel_block_len": cfg.sel_block_len, "positions": pos}
        scores = selection_scores(p, groups=cfg.groups, block_len=l, block_stride=d, sel_block_len=cfg.sel_block_len,
                                  num_blocks=num_blocks, overlap=cache.overlap)
        idx = select_blocks(scores, **slc, n_sel=cfg.n_sel, validate=False)
        o_slc = routes.route_slc_decode().fn(q_rope, cache.k_slc, cache.v_slc, idx, **slc)
        o_win = ring_window_attention(q_rope, cache.k_win, cache.v_win, pos)
        cache.pos.add_(1)
        return self._combine(gates, o_cmp, o_slc, o_win)

    def _append(self, x_t: torch.Tensor, cache: NSACache):
        """The new token's work before the attention: projections, RoPE and gates (returns ``q, q_rope,
        gates``); appends to the caches, and phi's compressed token once a block completes. The plain
        reference of ``triton_decode_token.prepare_token``."""
        cfg = self.cfg
        pos = cache.pos
        l, d, W = cfg.block_len, cfg.block_stride, cache.rows["k_win"][2]
        q, q_rope, kc, vc, ks, vs, kw, vw, gates = self._project(x_t, pos)
        cache.write([("k_slc", pos, ks), ("v_slc", pos, vs), ("k_win", pos % W, kw), ("v_win", pos % W, vw),
                     ("k_raw", pos % l, kc), ("v_raw", pos % l, vc)])

        # Every d tokens (once a whole block exists) phi emits a compressed token; otherwise the
        # new token goes to the scratch slot, so the step has the same shape either way.
        n_cmp = cache.rows["k_cmp"][2] - 1
        emit = (pos + 1 >= l) & ((pos + 1 - l) % d == 0)
        slot = torch.where(emit, (pos + 1 - l).div(d, rounding_mode="floor"), torch.full_like(pos, n_cmp))
        ring = (pos + 1 + torch.arange(l, device=pos.device)) % l  # raw ring slots, oldest first
        k_new, v_new = self._compress_ring(*cache.read([("k_raw", ring), ("v_raw", ring)]))
        cache.write([("k_cmp", slot, k_new), ("v_cmp", slot, v_new)])
        return q, q_rope, gates
