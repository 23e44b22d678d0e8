"""Selection scores and top-n block selection in Triton: the selection's input at long context.

The reference path (:func:`nsa.ops.selection.select_from_compressed`) builds the compressed
probabilities ``[B, T, H, N]`` a chunk of queries at a time, sums each group's heads, maps them to
selection blocks with an ``[N, nb]`` overlap matmul and sorts every row: some forty kernels per
chunk and hundreds of chunks at 64K. Here two kernels per chunk do the same:

- ``_scores``: a program owns ``BLOCK_T`` queries of one GQA group. It walks the compressed keys
  those queries can see in tiles of ``BLOCK_N`` tokens, recomputes ``p = exp(q.k * scale - lse)``
  for every head of the group (``lse`` from the compressed branch's forward, or from ``_lse``),
  sums the heads, and maps the tile to selection blocks by the overlap weights, computed from
  indices (``overlap(i, j) / l``, as :func:`nsa.ops.selection.overlap_matrix`). A tile of
  ``BLOCK_N`` tokens starts at a selection-block boundary (``BLOCK_N * d = NBT * l_sel``), so it
  adds to its own ``NBT`` blocks and, through a token's tail, to the next ``NBT``; that part is
  carried to the next tile in registers, and every score is written once. Probabilities never
  reach memory; the scores ``[B, T_chunk, G, nb]`` do (float32). The heads go in chunks of ``HB``
  inside the key loop (the other order, chunks outside and each chunk's queries loaded once, was
  5% slower on the H100 at 64K and is not kept).
- ``_topn``: one row per ``(b, t, g)``: the forced blocks (0, the current and the previous one),
  then the highest-scoring candidates, ties to the lower block, NaN lowest, exactly as
  :func:`nsa.ops.select_blocks`; the chosen blocks are written in ascending order, ``-1`` after.

Both have plain references: :func:`nsa.ops.selection_scores` over
:func:`nsa.ops.compressed_attention`'s probabilities, and :func:`nsa.ops.select_blocks`. The
tests compare them under Triton's interpreter (CPU) and on a GPU.
"""

from __future__ import annotations

import math

import torch

from . import checks
from .triton_attention import _interpreting, _last_dim_contiguous, _pad, _prec, triton

if triton is not None:
    import triton.language as tl

    from .triton_attention import _group_rows, _key_range, _tile, _visible

    @triton.jit
    def _lse(Q, K, LSE, sqb, sqt, sqh, skb, sks, skg, slb, slt, Tc, T0, N, qk_scale,
             G: tl.constexpr, HPG: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr, L: tl.constexpr,
             D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        # Natural-log softmax denominators of the compressed scores, rows of the flattened
        # (t, head of group g) space; -inf where no compressed token is visible. Rows are local
        # (0..Tc-1) and positions T0 + row: shifting the tokens' offset by -T0 keeps visibility.
        r0, b, g, t, t64, head, rmask, q = _group_rows(Q, sqb, sqt, sqh, Tc, G, HPG, DK, DKP, BLOCK_M)
        offset = L - 1 - T0
        _, j_hi = _key_range(r0, Tc, N, D, offset, 0, HPG, BLOCK_M, False)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for j0 in range(0, j_hi, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b * skb, offs_n.to(tl.int64), sks, g * skg, DK, DKP, offs_n < j_hi)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # log2 units
            s = tl.where(_visible(t, offs_n, j_hi, D, offset, 0, False), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
            m_i = m_new
        has = l_i > 0
        lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + b * slb + t64 * slt + head, lse, mask=rmask)

    @triton.jit
    def _overlap(offs_n, blk, L: tl.constexpr, D: tl.constexpr, SEL: tl.constexpr):
        """``[tokens, blocks]`` float32: raw positions compressed token ``offs_n`` shares with selection
        block ``blk``, over ``L`` (the reference's ``overlap_matrix``)."""
        lo = tl.maximum((offs_n * D)[:, None], (blk * SEL)[None, :])
        hi = tl.minimum((offs_n * D + L)[:, None], (blk * SEL + SEL)[None, :])
        return tl.maximum(hi - lo, 0).to(tl.float32) / L

    @triton.jit
    def _scores(Q, K, LSE, OUT, sqb, sqt, sqh, skb, sks, skg, slb, slt, sob, sot, sog, Tc, T0, N, NB, qk_scale,
                G: tl.constexpr, HPG: tl.constexpr, HB: tl.constexpr, DK: tl.constexpr, DKP: tl.constexpr,
                L: tl.constexpr, D: tl.constexpr, SEL: tl.constexpr, NBT: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_N: tl.constexpr, PREC: tl.constexpr):
        t0 = tl.program_id(0) * BLOCK_T
        b = (tl.program_id(1) // G).to(tl.int64)
        g = tl.program_id(1) % G
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < Tc
        # Rows of one head chunk: BLOCK_T queries x HB heads, query-major (the head sum is a reshape).
        rows = tl.arange(0, BLOCK_T * HB)
        r_t = t0 + rows // HB
        r_mask = r_t < Tc
        r_t64 = r_t.to(tl.int64)
        offs_b = tl.arange(0, NBT)
        offset = L - 1 - T0  # positions are T0 + local row, as in _lse
        _, j_hi = _key_range(t0, Tc, N, D, offset, 0, 1, BLOCK_T, False)
        carry = tl.zeros([BLOCK_T, NBT], tl.float32)
        for j0 in range(0, j_hi, BLOCK_N):
            offs_n = j0 + tl.arange(0, BLOCK_N)
            k = _tile(K, b * skb, offs_n.to(tl.int64), sks, g * skg, DK, DKP, offs_n < j_hi)
            vis = r_mask[:, None] & _visible(r_t, offs_n, j_hi, D, offset, 0, False)
            summed = tl.zeros([BLOCK_T, BLOCK_N], tl.float32)
            for hc in range(0, HPG, HB):
                head = g * HPG + hc + rows % HB
                q = _tile(Q, b * sqb, r_t64, sqt, head[:, None] * sqh, DK, DKP, r_mask)
                lse = tl.load(LSE + b * slb + r_t64 * slt + head, mask=r_mask, other=0.0) * 1.4426950408889634
                s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
                p = tl.where(vis, tl.exp2(s - tl.where(vis, lse[:, None], s)), 0.0)
                summed += tl.sum(tl.reshape(p, [BLOCK_T, HB, BLOCK_N]), 1)
            blk = (j0 // BLOCK_N) * NBT + offs_b  # this tile's own blocks
            own = tl.dot(summed, _overlap(offs_n, blk, L, D, SEL), input_precision="ieee") + carry
            tl.store(OUT + b * sob + offs_t.to(tl.int64)[:, None] * sot + g * sog + blk[None, :], own,
                     mask=tmask[:, None] & (blk < NB)[None, :])
            carry = tl.dot(summed, _overlap(offs_n, blk + NBT, L, D, SEL), input_precision="ieee")
        blk = tl.cdiv(j_hi, BLOCK_N) * NBT + offs_b  # the last tile's tails (zeros when nothing was seen)
        tl.store(OUT + b * sob + offs_t.to(tl.int64)[:, None] * sot + g * sog + blk[None, :], carry,
                 mask=tmask[:, None] & (blk < NB)[None, :])

    @triton.jit
    def _keys(sc, j, cur, NB):
        """Ranking keys of scores ``sc [rows, NBP]`` (blocks ``j``) for queries in block ``cur``: the
        forced blocks (0, the current and the previous one) ``+inf``, non-candidates (after ``cur``,
        past ``NB``) ``-inf``, NaN the lowest finite value, infinities clamped: as the reference."""
        cand = (j[None, :] <= cur) & (j < NB)[None, :]
        forced = cand & ((j[None, :] == 0) | (j[None, :] == cur) | (j[None, :] == cur - 1))
        big = 3.4028234663852886e38  # float32 max
        key = tl.where(sc != sc, -big, tl.minimum(tl.maximum(sc, -big), big))
        key = tl.where(cand, key, float("-inf"))
        return tl.where(forced, float("inf"), key)

    @triton.jit
    def _store_chosen(OUT, base, chosen, j, rmask, ROWS: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr):
        """``ROWS`` rows' chosen blocks (``chosen [ROWS, NBP]``, 0/1) at ``OUT + base``, ascending, ``-1`` after."""
        slot = tl.cumsum(chosen, 1) - 1
        tl.store(OUT + base[:, None] + slot, (j[None, :] + slot * 0).to(tl.int64), mask=rmask[:, None] & (chosen > 0))
        count = tl.sum(chosen, 1)
        s = tl.arange(0, NSP)
        tl.store(OUT + base[:, None] + s[None, :], tl.full([ROWS, NSP], -1, tl.int64),
                 mask=rmask[:, None] & (s[None, :] >= count[:, None]) & (s[None, :] < NSEL))

    @triton.jit
    def _ranked(key, NBP: tl.constexpr, NSEL: tl.constexpr):
        """One row's top-n from its keys ``[1, NBP]`` (:func:`_keys`) in one pass: block ``j`` is
        chosen when fewer than ``NSEL`` blocks rank before it (a higher key, or an equal key and a
        lower index) and its key is not ``-inf``: the blocks :func:`_topn`'s rounds pick. One
        ``[NBP, NBP]`` comparison and one sum, where the rounds take ``NSEL`` dependent reductions
        (with barriers between warps): for the decode step's short rows (``NBP <= 64``), inside the
        short-context kernel (``nsa.ops.triton_decode._dec_front``), which runs on 4 or 8 warps."""
        kv = tl.reshape(key, [NBP])
        i = tl.arange(0, NBP)
        before = (kv[:, None] > kv[None, :]) | ((kv[:, None] == kv[None, :]) & (i[:, None] < i[None, :]))
        rank = tl.sum(before.to(tl.int32), 0)
        return tl.reshape(((rank < NSEL) & (kv > float("-inf"))).to(tl.int32), [1, NBP])

    @triton.jit
    def _topn(SC, OUT, POS, ssb, sst, ssg, sob, sot, sog, R, Tc, T0, NB,
              G: tl.constexpr, SEL: tl.constexpr, NSEL: tl.constexpr, NSP: tl.constexpr, NBP: tl.constexpr,
              BLOCK_R: tl.constexpr, POS_PTR: tl.constexpr):
        # Queries at positions T0 + row; POS_PTR: T0 is read from POS (a decode step's device position).
        if POS_PTR:
            T0 = tl.load(POS)
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # flattened (b, t, g)
        rmask = rows < R
        b = (rows // (Tc * G)).to(tl.int64)
        t_loc = ((rows // G) % Tc).to(tl.int64)
        g = rows % G
        j = tl.arange(0, NBP)
        sc = tl.load(SC + (b * ssb + t_loc * sst + g * ssg)[:, None] + j[None, :],
                     mask=rmask[:, None] & (j < NB)[None, :], other=0.0)
        key = _keys(sc, j, ((T0 + t_loc) // SEL)[:, None], NB)
        chosen = tl.zeros([BLOCK_R, NBP], tl.int32)
        for _ in range(NSEL):
            # One reduction per round: the largest key and its first (lowest) index; none once only
            # -inf (non-candidates, taken blocks) is left.
            m, first = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
            hit = (j[None, :] == first[:, None]) & (m > float("-inf"))[:, None]
            chosen = tl.where(hit, 1, chosen)
            key = tl.where(hit, float("-inf"), key)
        _store_chosen(OUT, b * sob + t_loc * sot + g * sog, chosen, j, rmask, BLOCK_R, NSEL, NSP)


def supported(H: int, groups: int, d_k: int, block_len: int, block_stride: int, sel_block_len: int) -> str | None:
    """Why these kernels cannot score this shape, or None when they can (the route table asks)."""
    h = H // groups
    if h & (h - 1):
        return f"{h} heads per group (the head sum needs a power of two)"
    if sel_block_len % block_stride or (sel_block_len // block_stride) & (sel_block_len // block_stride - 1):
        return f"sel_block_len/block_stride = {sel_block_len}/{block_stride} (a power of two is needed)"
    if 16 * sel_block_len // block_stride > 128:
        return f"sel_block_len/block_stride = {sel_block_len // block_stride} (tiles of 16 blocks exceed 128 tokens)"
    if block_len > 16 * sel_block_len + block_stride:
        return f"block_len={block_len} spans more than two tiles of 16 selection blocks"
    if d_k > 256:
        return f"d_k={d_k} (up to 256)"
    return None


LSE_TILES = (64, 64)  # (rows, compressed tokens) of the _lse kernel on a GPU


def score_tiles(h: int, dkp: int) -> dict:
    """``_scores`` tiles: 16 queries (the smallest ``tl.dot`` side: the head sum leaves one row per
    query; 32 where timed faster, below) and a chunk of their heads at a time. Built for sm_90, 8
    warps, by Triton 3.6 (the lent GPU's) and 3.9, these keep every kernel at d <= 192 and every
    head count up to 16 free of register spills. At d=128, 128 rows spill when they hold all of a
    group's 8 heads (224 bytes with Triton 3.6, none with 16 heads in two chunks): 64 rows there.
    ``stages``: Triton's default on NVIDIA GPUs (3), stated so tools/tile_sweep.py can vary it."""
    if dkp == 128 and h > 8:
        # Timed on the lent H100 at the issue-8 layer (16 heads per group, d=128, l=32, d=16, l'=64;
        # all queries' scores, bf16; tools/tile_sweep.py's scoring job, same process): 32 queries x 2
        # heads, 4 warps took 11.3-12.6 ms at 64K and 0.95 ms at 16K, against 18.6-18.9 and 1.49 ms
        # for 16 x 8 at 8 warps (16 x 4 at 4 warps: 13.2-13.5 and 1.08). No spill (Triton 3.6, 3.9).
        return {"queries": 32, "heads": 2, "warps": 4, "stages": 3}
    rows = 128 if dkp < 128 or (dkp == 128 and h > 8) else 64
    return {"queries": 16, "heads": min(h, max(1, rows // 16)), "warps": 8, "stages": 3}


def top_tiles(nb: int) -> tuple[int, int]:
    """``_topn``: the padded block count and the rows per program (about 4096 scores per program)."""
    nbp = triton.next_power_of_2(max(nb, 16))
    return nbp, max(1, min(16, 4096 // nbp))


def _chunk_len(B: int, G: int, nb: int, device: torch.device) -> int:
    # One chunk's float32 scores: 2**26 elements (256 MB) on a GPU, 2**20 under the interpreter.
    budget = 1 << 26 if device.type == "cuda" else 1 << 20
    return max(16, budget // max(1, B * G * nb) // 16 * 16)


def _check_device(op: str, x: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError(f"{op}: Triton is not installed (pip install triton)")
    if x.device.type != "cuda" and not _interpreting():
        checks.fail(op, "device", str(x.device), "a CUDA device (CPU tensors only under TRITON_INTERPRET=1, "
                    "set before Triton is first imported)")


def compressed_lse(q: torch.Tensor, k_cmp: torch.Tensor, *, block_len: int, block_stride: int,
                   scale: float | None = None, positions_start: int = 0) -> torch.Tensor:
    """``[B, T, H]`` float32: natural log of the compressed branch's softmax denominator for queries
    at positions ``positions_start + 0..T-1`` (``-inf`` before the first whole block)."""
    op = "compressed_lse"
    _check_device(op, q)
    q, k_cmp = _last_dim_contiguous(q, k_cmp)  # the kernels step through the head dim with stride 1
    B, T, H, Dk = q.shape
    N, G = k_cmp.shape[1], k_cmp.shape[2]
    lse = torch.empty(B, T, H, device=q.device, dtype=torch.float32)
    if T == 0 or B == 0:
        return lse
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    h = H // G
    rows, keys = LSE_TILES if q.device.type == "cuda" else (32, 16)  # interpreter: tests cross tiles
    _lse[(triton.cdiv(T * h, rows), B * G)](
        q, k_cmp, lse, *q.stride()[:3], *k_cmp.stride()[:3], *lse.stride()[:2], T, positions_start, N,
        scale * 1.4426950408889634, G=G, HPG=h, DK=Dk, DKP=_pad(Dk), L=block_len, D=block_stride,
        BLOCK_M=rows, BLOCK_N=keys, PREC=_prec(q.dtype))
    return lse


def block_scores(q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, *, groups: int, block_len: int,
                 block_stride: int, sel_block_len: int, num_blocks: int, scale: float | None = None,
                 positions_start: int = 0) -> torch.Tensor:
    """``[B, T, G, num_blocks]`` float32: :func:`nsa.ops.selection_scores` of the compressed
    probabilities ``exp(q.k_cmp * scale - lse)`` of queries at ``positions_start + 0..T-1``, without
    holding them. ``lse`` as :func:`compressed_lse` (or the compressed branch's forward) gives it."""
    op = "block_scores"
    _check_device(op, q)
    q, k_cmp = _last_dim_contiguous(q, k_cmp)
    B, T, H, Dk = q.shape
    N, G = k_cmp.shape[1], k_cmp.shape[2]
    why = supported(H, groups, Dk, block_len, block_stride, sel_block_len)
    if why is not None or G != groups:
        checks.fail(op, "shape", why or f"k_cmp has {G} groups", f"{groups} groups and a shape "
                    "triton_scoring.supported() accepts")
    out = torch.zeros(B, T, G, num_blocks, device=q.device, dtype=torch.float32)
    if T == 0 or B == 0 or N == 0:
        return out
    scale = 1.0 / math.sqrt(Dk) if scale is None else scale
    h = H // G
    tile = score_tiles(h, _pad(Dk))
    nbt = 16  # selection blocks per tile of compressed tokens (tl.dot's smallest side)
    _scores[(triton.cdiv(T, tile["queries"]), B * G)](
        q, k_cmp, lse, out, *q.stride()[:3], *k_cmp.stride()[:3], *lse.stride()[:2], *out.stride()[:3],
        T, positions_start, N, num_blocks, scale * 1.4426950408889634,
        G=G, HPG=h, HB=tile["heads"], DK=Dk, DKP=_pad(Dk), L=block_len, D=block_stride, SEL=sel_block_len, NBT=nbt,
        BLOCK_T=tile["queries"], BLOCK_N=nbt * sel_block_len // block_stride, PREC=_prec(q.dtype),
        num_warps=tile["warps"], num_stages=tile["stages"])
    return out


def top_blocks(scores: torch.Tensor, *, sel_block_len: int, n_sel: int, positions_start: int = 0,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`nsa.ops.select_blocks` for ``scores [B, T, G, nb]`` (float32) of queries at positions
    ``positions_start + 0..T-1``: ``[B, T, G, n_sel]`` int64, ascending, ``-1`` in empty slots.
    ``out`` may be a (strided) int64 view to write into."""
    op = "top_blocks"
    checks.need_tensor(op, "scores", scores, 4, "[B, T, G, nb]")
    B, T, G, nb = scores.shape
    n_sel = checks.need_int(op, "n_sel", n_sel, minimum=3)
    if T and (positions_start + T - 1) // sel_block_len >= nb:
        checks.fail(op, "scores.shape", list(scores.shape),
                    f"nb > {(positions_start + T - 1) // sel_block_len} blocks, to hold the last position's block")
    _check_device(op, scores)
    if scores.dtype != torch.float32 or scores.stride(-1) != 1:
        scores = scores.float().contiguous()
    if out is None:
        out = torch.empty(B, T, G, n_sel, device=scores.device, dtype=torch.long)
    R = B * T * G
    if R == 0:
        return out
    nbp, block_r = top_tiles(nb)
    _topn[(triton.cdiv(R, block_r),)](
        scores, out, scores, *scores.stride()[:3], *out.stride()[:3], R, T, positions_start, nb,
        G=G, SEL=sel_block_len, NSEL=n_sel, NSP=triton.next_power_of_2(n_sel), NBP=nbp, BLOCK_R=block_r,
        POS_PTR=False, num_warps=4)
    return out


def select_from_compressed(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor | None = None, *, groups: int,
                           block_len: int, block_stride: int, sel_block_len: int, n_sel: int,
                           num_blocks: int | None = None, lse: torch.Tensor | None = None,
                           chunk_rows: int | None = None) -> torch.Tensor:
    """:func:`nsa.ops.selection.select_from_compressed` in two kernels per chunk of queries.

    ``lse [B, T, H]``: the compressed branch's log-sum-exp when its forward gave one (the Triton
    route does); otherwise it is computed here. ``v_cmp`` is unused (the signature is the
    reference's). Prefill positions ``0..T-1``; no autograd (indices carry no gradient).
    """
    B, T, H, _ = q.shape
    G = groups
    if num_blocks is None:
        num_blocks = -(-T // sel_block_len)
    cmp = {"block_len": block_len, "block_stride": block_stride}
    out = torch.empty(B, T, G, n_sel, device=q.device, dtype=torch.long)
    chunk = chunk_rows or _chunk_len(B, G, num_blocks, q.device)
    with torch.no_grad():
        for start in range(0, T, chunk):
            qc = q[:, start:start + chunk]
            lc = compressed_lse(qc, k_cmp, **cmp, positions_start=start) if lse is None else lse[:, start:start + chunk]
            scores = block_scores(qc, k_cmp, lc, groups=G, **cmp, sel_block_len=sel_block_len,
                                  num_blocks=num_blocks, positions_start=start)
            top_blocks(scores, sel_block_len=sel_block_len, n_sel=n_sel, positions_start=start,
                       out=out[:, start:start + chunk])
    return out
