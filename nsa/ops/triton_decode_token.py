"""The decode step's work on its new token, in one Triton kernel: what the torch step does between
the input projection and the attention (:meth:`nsa.NSAAttention._append`, its plain reference).

From the projections ``y [B, 1, P]`` of one token per sequence at the device position ``pos``:

- RoPE of the queries (returned: ``q_rope [B, 1, H, d_k]``) and of the selection and window keys;
- the gates, ``sigmoid`` of their logits (returned: ``[B, 1, H, 3]``);
- the six cache appends: selection keys and values at row ``pos``, window keys and values at
  ``pos % W`` of their rings, the raw compression-branch keys and values at ``pos % l``;
- on a step that completes a compression block (``pos + 1 >= l`` and ``(pos + 1 - l) % d == 0``),
  phi of the block (the raw ring, oldest first, with this token last) into compressed slot
  ``(pos + 1 - l) / d``. Other steps write no compressed slot.

Under ``torch.compile`` the same work was eight inductor kernels of about 1-1.5 us each (H100
profile of the seed layer's step at 2K context): a CUDA-graph step pays about a microsecond per
launch, so one kernel is the lever. One program per (sequence, group) rotates, copies and gates;
phi runs in column tiles of its output, each program reading the ring and a ``[l*d, tile]`` slice of
the weight, and returns at once on a step that emits nothing (15 of 16 at ``d = 16``). Everything is
computed in float32 and stored in the destination's dtype; the angles are ``pos * inv_freq``
(``inv_freq`` from :func:`nsa.ops.rope.rope_inv_freq`, as ``apply_rope`` computes them).
"""

from __future__ import annotations

import torch

from . import checks
from .triton_attention import _interpreting, _on, triton

if triton is not None:
    import triton.language as tl

    from .triton_elementwise import _rotate

    @triton.jit
    def _copy(X, OUT, D: tl.constexpr, DP: tl.constexpr):
        c = tl.arange(0, DP)
        tl.store(OUT + c, tl.load(X + c, mask=c < D).to(OUT.dtype.element_ty), mask=c < D)

    @triton.jit
    def _phi(X_NEW, BUF, PE, WT, BIAS, pos, row_raw, row_out, sbr, ct, D: tl.constexpr, DP: tl.constexpr,
             L: tl.constexpr, MEAN: tl.constexpr, BLOCK_O: tl.constexpr):
        # Output columns [ct * BLOCK_O, +BLOCK_O) of phi over the raw ring (rows row_raw.., slot
        # (pos + 1 + j) % L is the j-th oldest); the newest token (j = L - 1) is read at X_NEW, the
        # projection itself, rounded to the cache's dtype as the cache holds it.
        o = ct * BLOCK_O + tl.arange(0, BLOCK_O)
        omask = o < D
        c = tl.arange(0, DP)
        cmask = c < D
        cols = o if MEAN else c
        cols_mask = omask if MEAN else cmask
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for j in range(L):
            slot = (pos + 1 + j) % L
            x = tl.load(BUF + (row_raw + slot) * sbr + cols, mask=cols_mask & (j < L - 1), other=0.0).to(tl.float32)
            new = tl.load(X_NEW + cols, mask=cols_mask & (j == L - 1), other=0.0)
            x += new.to(BUF.dtype.element_ty).to(tl.float32)
            x += tl.load(PE + j * D + cols, mask=cols_mask, other=0.0).to(tl.float32)
            if MEAN:
                acc += x
            else:
                w = tl.load(WT + (j * D + c)[:, None] * D + o[None, :], mask=cmask[:, None] & omask[None, :],
                            other=0.0).to(tl.float32)
                acc += tl.sum(x[:, None] * w, 0)
        if MEAN:
            acc = acc / L
        else:
            acc += tl.load(BIAS + o, mask=omask, other=0.0).to(tl.float32)
        tl.store(BUF + row_out * sbr + o, acc.to(BUF.dtype.element_ty), mask=omask)

    @triton.jit
    def _dec_token(Y, GL, INV, POS, QR, GATES, KB, VB, PEK, PEV, WK, WV, BK, BV,
                   syb, sglb, sqb, sqh, sgb, sgh, skb, skr, skg, svb, svr, svg,
                   K_SLC, K_WIN, K_RAW, K_CMP, V_SLC, V_WIN, V_RAW, V_CMP, W,
                   G: tl.constexpr, HPG: tl.constexpr, HPP: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                   HALFP: tl.constexpr, DV: tl.constexpr, DVP: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
                   MEAN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, CTK: tl.constexpr):
        # grid (B * G, 1 + phi's column tiles of keys and values)
        bg = tl.program_id(0)
        b = (bg // G).to(tl.int64)
        g = bg % G
        part = tl.program_id(1)
        pos = tl.load(POS)
        H: tl.constexpr = G * HPG
        y = Y + b * syb
        kb = KB + b * skb + g * skg
        vb = VB + b * svb + g * svg
        kcol = (H + 2 * G + g) * DK  # the projections' order: q, k_slc, k_win, k_cmp, v_cmp, v_slc, v_win
        vcol = (H + 3 * G) * DK + g * DV
        if part == 0:
            HALF: tl.constexpr = DK // 2
            i = tl.arange(0, HALFP)
            imask = i < HALF
            angle = pos.to(tl.float32) * tl.load(INV + i, mask=imask, other=0.0)
            cos, sin = tl.cos(angle), tl.sin(angle)
            r = tl.arange(0, HPP)
            head = g * HPG + r
            hmask = r < HPG
            _rotate(y + head[:, None] * DK + i[None, :], QR + b * sqb + head[:, None] * sqh + i[None, :],
                    hmask[:, None] & imask[None, :], cos[None, :], sin[None, :], HALF)
            _rotate(y + (H + g) * DK + i, kb + (K_SLC + pos) * skr + i, imask, cos, sin, HALF)
            _rotate(y + (H + G + g) * DK + i, kb + (K_WIN + pos % W) * skr + i, imask, cos, sin, HALF)
            _copy(y + kcol, kb + (K_RAW + pos % L) * skr, DK, DKP)
            _copy(y + vcol, vb + (V_RAW + pos % L) * svr, DV, DVP)
            _copy(y + vcol + G * DV, vb + (V_SLC + pos) * svr, DV, DVP)
            _copy(y + vcol + 2 * G * DV, vb + (V_WIN + pos % W) * svr, DV, DVP)
            j = tl.arange(0, 4)
            gmask = hmask[:, None] & (j < 3)[None, :]
            logit = tl.load(GL + b * sglb + head[:, None] * 3 + j[None, :], mask=gmask, other=0.0).to(tl.float32)
            tl.store(GATES + b * sgb + head[:, None] * sgh + j[None, :], tl.sigmoid(logit).to(GATES.dtype.element_ty),
                     mask=gmask)
        else:
            if (pos + 1 >= L) & ((pos + 1 - L) % D == 0):
                slot = (pos + 1 - L) // D
                ct = part - 1
                if ct < CTK:
                    _phi(y + kcol, kb, PEK, WK, BK, pos, K_RAW, K_CMP + slot, skr, ct, DK, DKP, L, MEAN, BLOCK_K)
                else:
                    _phi(y + vcol, vb, PEV, WV, BV, pos, V_RAW, V_CMP + slot, svr, ct - CTK, DV, DVP, L, MEAN,
                         BLOCK_V)


ROW_NAMES = ("k_slc", "k_win", "k_raw", "k_cmp", "v_slc", "v_win", "v_raw", "v_cmp")


def phi_tile(d: int) -> int:
    """Output columns per phi program: a weight tile ``[d, tile]`` per ring slot of at most 4096 float32
    values, 32 per thread on 4 warps (sm_90 builds: d_k = 192 in tiles of 32 spilled 32 bytes), and
    at most 32 columns."""
    dp = triton.next_power_of_2(d)
    return min(32, dp, 4096 // dp)


def _prepare_token(y, gate_logits, buffers, rows, pos, inv_freq, pos_k, pos_v, phi_k, phi_v, bias_k, bias_v,
                   heads, d_k, d_v, block_len, block_stride, compress):
    B, groups = y.shape[0], buffers[0].shape[2]
    kb, vb = buffers[0], buffers[-1]
    q_rope = torch.empty(B, 1, heads, d_k, device=y.device, dtype=y.dtype)
    gates = torch.empty(B, 1, heads, 3, device=y.device, dtype=gate_logits.dtype)
    block_k, block_v = phi_tile(d_k), phi_tile(d_v)
    ctk, ctv = triton.cdiv(d_k, block_k), triton.cdiv(d_v, block_v)
    p = triton.next_power_of_2
    _dec_token[(B * groups, 1 + ctk + ctv)](
        y, gate_logits, inv_freq, pos, q_rope, gates, kb, vb, pos_k.contiguous(), pos_v.contiguous(),
        phi_k.contiguous(), phi_v.contiguous(), bias_k, bias_v, y.stride(0), gate_logits.stride(0),
        q_rope.stride(0), q_rope.stride(2), gates.stride(0), gates.stride(2), *kb.stride()[:3], *vb.stride()[:3], *rows,
        G=groups, HPG=heads // groups, HPP=p(heads // groups), DK=d_k, DKP=p(d_k), HALFP=p(d_k // 2), DV=d_v,
        DVP=p(d_v), L=block_len, D=block_stride, MEAN=compress == "mean", BLOCK_K=block_k, BLOCK_V=block_v, CTK=ctk,
        num_warps=4)
    return q_rope, gates


@torch.library.custom_op("nsa::decode_prepare_token", mutates_args=("buffers",))
def _prepare_token_op(y: torch.Tensor, gate_logits: torch.Tensor, buffers: list[torch.Tensor], rows: list[int],
                      pos: torch.Tensor, inv_freq: torch.Tensor, pos_k: torch.Tensor, pos_v: torch.Tensor,
                      phi_k: torch.Tensor, phi_v: torch.Tensor, bias_k: torch.Tensor, bias_v: torch.Tensor,
                      heads: int, d_k: int, d_v: int, block_len: int, block_stride: int,
                      compress: str) -> tuple[torch.Tensor, torch.Tensor]:
    # A custom op, as decode_attention: torch.compile keeps it one opaque call that writes the cache
    # buffers in place; no host synchronisation, so CUDA graphs capture it. (No argument may be named
    # ``mode``: inductor's auto_functionalized takes one of that name.)
    with _on(y.device):
        return _prepare_token(y, gate_logits, buffers, rows, pos, inv_freq, pos_k, pos_v, phi_k, phi_v, bias_k,
                              bias_v, heads, d_k, d_v, block_len, block_stride, compress)


@_prepare_token_op.register_fake
def _(y, gate_logits, buffers, rows, pos, inv_freq, pos_k, pos_v, phi_k, phi_v, bias_k, bias_v, heads, d_k, d_v,
      block_len, block_stride, compress):
    B = y.shape[0]
    return y.new_empty(B, 1, heads, d_k), gate_logits.new_empty(B, 1, heads, 3)


def prepare_token(y: torch.Tensor, gate_logits: torch.Tensor, buffers: tuple, rows: dict, pos: torch.Tensor,
                  inv_freq: torch.Tensor, phi: tuple, *, heads: int, d_k: int, d_v: int, block_len: int,
                  block_stride: int, compress: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The new token's RoPE, gates, cache appends and phi (see the module); returns ``q_rope
    [B, 1, H, d_k]`` and ``gates [B, 1, H, 3]``.

    ``y [B, 1, P]``: the layer's projections of the token, in its order (queries, selection and window
    keys, compression keys, compression, selection and window values); ``gate_logits [B, 1, 3H]``
    (last dim contiguous, as both); ``buffers`` and ``rows``: :class:`nsa.attention.NSACache`'s
    (keys in the first buffer, values in the last); ``pos [1]`` int64 on the device;
    ``inv_freq [d_k/2]`` float32; ``phi``: ``(pos_k, pos_v, phi_k, phi_v, bias_k, bias_v)``, the
    layer's (weights and biases unused with ``compress="mean"``). No checks beyond the device: reached
    through :mod:`nsa.routes` with the layer's own tensors.
    """
    if triton is None:
        raise RuntimeError("prepare_token: Triton is not installed (pip install triton)")
    if y.device.type != "cuda" and not _interpreting():
        checks.fail("prepare_token", "y.device", str(y.device), "a CUDA device (CPU tensors only under "
                    "TRITON_INTERPRET=1, set before Triton is first imported)")
    starts = [rows[name][1] for name in ROW_NAMES]
    return _prepare_token_op(y, gate_logits, list(buffers), starts + [rows["k_win"][2]], pos, inv_freq, *phi,
                             heads, d_k, d_v, block_len, block_stride, compress)
