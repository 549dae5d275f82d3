"""The Triton kernels of kernels/attention.py (FlashAttention-2 with grouped-query heads and packed sequences).

Every loop over blocks is split in two: blocks that need no mask (strictly below the causal diagonal, and fully
inside the sequence) run a lean body with unmasked loads; the diagonal blocks and the sequence's last partial
block run a masked body. Scores are in base 2: P = exp2(S * scale * log2(e) - LSE2).

  _attn_fwd       program = (query block, sequence x q head); K/V stream through in key blocks; saves LSE2.
  _attn_bwd_delta Delta = rowsum(dO * O) per row and head.
  _attn_bwd_dkdv  program = (key block, sequence x KV head), key-major: K and V stay on chip while Q and dO of the
                  G query heads that read them stream through in query blocks; every matmul has the key block
                  as its M side, so on sm_90 all of them are wgmma. With FUSED_DQ it also adds dS K into an fp32
                  dQ buffer with atomics (5 matmuls per block pair, as FlashAttention-2); without, _attn_bwd_dq
                  builds dQ separately (7 matmuls, deterministic).
  _attn_bwd_dq    program = (query block, sequence x q head); dQ = sum over key blocks of dS K.
Pointer arguments are contiguous [B, T, H, D] (padded) or [N, H, D] (packed, batch stride 0, rows found through
CU); q, o, dO and dQ share one set of strides, k, v, dK and dV another, so a tile's offsets are computed once for
all of them (per-element address registers are what spills first). LSE/DELTA are fp32 [B, Hq, T] or [1, Hq, N].
"""

import triton
import triton.language as tl


@triton.jit
def _seq_bounds(CU, b, T, VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens when packed, else (0, T)."""
    if VARLEN:
        start = tl.load(CU + b)
        return start, tl.load(CU + b + 1) - start
    return 0, T


@triton.jit
def _tile(X, b, sb, h, sh, row0, st, offs_r, offs_d):
    """Pointers to rows row0 + offs_r of head h of sequence b: the scalar part in int64 (no overflow on long
    batches), the per-element part in int32 (half the registers of int64 offsets)."""
    X = X + tl.cast(b, tl.int64) * sb + tl.cast(h, tl.int64) * sh + tl.cast(row0, tl.int64) * st
    return X + offs_r[:, None] * st + offs_d[None, :]


@triton.jit
def _load(ptrs, mask_r, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; rows past the sequence (MASK_ROWS) and padded head-dim columns read as 0."""
    if MASK_ROWS:
        if BLOCK_D == D:
            x = tl.load(ptrs, mask=mask_r[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=mask_r[:, None] & (offs_d < D)[None, :], other=0.0)
    else:
        if BLOCK_D == D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return x


@triton.jit
def _fwd_step(acc, m_i, l_i, q, K, V, b, skb, skh, skt, kvh, start, n0, offs_m, offs_n, offs_d,
              seqlen, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One key block of the online softmax."""
    kn = n0 + offs_n
    k = _load(_tile(K, b, skb, kvh, skh, start + n0, skt, offs_n, offs_d), kn < seqlen, offs_d, D, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=PREC)                                     # (BLOCK_M, BLOCK_N)
    if MASKED:                               # the sequence's end, and the causal diagonal
        valid = (kn < seqlen)[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= kn[None, :])
        qk = tl.where(valid, qk, float("-inf"))
    # every row sees a valid key in its first block (key 0, or its own diagonal), so m stays finite
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load(_tile(V, b, skb, kvh, skh, start + n0, skt, offs_n, offs_d), kn < seqlen, offs_d, D, BLOCK_D, MASKED)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,              # q/k/v/o as in the module docstring; LSE: out, base-2 logsumexp
              CU,                           # int32 cu_seqlens (varlen) or a dummy
              sqb, sqt, sqh, skb, skt, skh,   # strides (batch, token, head) of q and o, of k and v
              slb, slh,                     # LSE strides (batch, head)
              T, H, GROUP, scale,           # padded length, q heads, q heads per KV head, 1/sqrt(D)
              D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:                               # the longest rows first: the last wave is short blocks
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = pid_bh // H, pid_bh % H
    start, seqlen = _seq_bounds(CU, b, T, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kvh = h // GROUP
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    q = _load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634    # exp(x) = exp2(x * log2(e))
    if CAUSAL:
        n_full = m0 // BLOCK_N * BLOCK_N     # key blocks entirely below the diagonal
        hi = tl.minimum(m0 + BLOCK_M, seqlen)
    else:
        n_full = seqlen // BLOCK_N * BLOCK_N
        hi = seqlen
    for n0 in range(0, n_full, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, b, skb, skh, skt, kvh, start, n0, offs_m,
                                  offs_n, offs_d, seqlen, qk_scale, D, BLOCK_D, False, CAUSAL, PREC)
    for n0 in range(n_full, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_step(acc, m_i, l_i, q, K, V, b, skb, skh, skt, kvh, start, n0, offs_m,
                                  offs_n, offs_d, seqlen, qk_scale, D, BLOCK_D, True, CAUSAL, PREC)
    acc = acc / l_i[:, None]
    o_ptrs = _tile(O, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d)
    if BLOCK_D == D:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None])
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + b.to(tl.int64) * slb + h * slh + start + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, CU, sqb, sqt, sqh, slb, slh, T, H,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    """DELTA (out, fp32, LSE's layout) = rowsum(dO * O); o and do share strides."""
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    start, seqlen = _seq_bounds(CU, b, T, VARLEN)
    m0 = pid_m * BLOCK_M
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = m0 + offs_r < seqlen
    o = _load(_tile(O, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, True)
    do = _load(_tile(DO, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, True)
    tl.store(DELTA + b.to(tl.int64) * slb + h * slh + start + m0 + offs_r,
             tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask_m)


@triton.jit
def _dkdv_step(dk, dv, k, v, Q, DO, DQ, LSE_h, DELTA_h, b, h, sqb, sqt, sqh, start,
               m0, offs_r, offs_n, offs_d, seqlen, qk_scale, scale, D: tl.constexpr, BLOCK_D: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, ROW_MASK: tl.constexpr, FUSED_DQ: tl.constexpr, PREC: tl.constexpr):
    """One query block against the program's key block, in the transposed (key-major) orientation."""
    offs_m = m0 + offs_r
    mask_m = offs_m < seqlen
    q = _load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, ROW_MASK)
    do = _load(_tile(DO, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, ROW_MASK)
    if ROW_MASK:             # rows past the end read q = dO = 0, LSE = Delta = 0: they add exactly nothing
        lse = tl.load(LSE_h + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA_h + offs_m, mask=mask_m, other=0.0)
    else:
        lse = tl.load(LSE_h + offs_m)
        delta = tl.load(DELTA_h + offs_m)
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC)                                    # (BLOCK_N, BLOCK_M)
    pT = tl.exp2(qkT * qk_scale - lse[None, :])
    if CAUSAL_MASK:
        pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
    dk = tl.dot(dsT, q, dk, input_precision=PREC)
    if FUSED_DQ:             # dQ^T = K^T dS^T: the head dim is the M side, so this is wgmma too
        dqT = tl.dot(tl.trans(k), dsT, input_precision=PREC) * scale                      # (BLOCK_D, BLOCK_M)
        ptrs = DQ + tl.cast(b, tl.int64) * sqb + tl.cast(h, tl.int64) * sqh + \
            tl.cast(start + m0, tl.int64) * sqt + offs_r[None, :] * sqt + offs_d[:, None]
        tl.atomic_add(ptrs, dqT, mask=mask_m[None, :] & (offs_d < D)[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV,   # dk/dv: out
                   DQ,                                 # fp32 dQ accumulator (FUSED_DQ)
                   CU, sqb, sqt, sqh, skb, skt, skh, slb, slh,  # q, do, dq share strides; so do k, v, dk, dv
                   T, HKV, GROUP, scale,
                   D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, FUSED_DQ: tl.constexpr, PREC: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, kvh = pid_bh // HKV, pid_bh % HKV
    start, seqlen = _seq_bounds(CU, b, T, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < seqlen
    k = _load(_tile(K, b, skb, kvh, skh, start + n0, skt, tl.arange(0, BLOCK_N), offs_d), mask_n, offs_d, D,
              BLOCK_D, True)
    v = _load(_tile(V, b, skb, kvh, skh, start + n0, skt, tl.arange(0, BLOCK_N), offs_d), mask_n, offs_d, D,
              BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    m_full = seqlen // BLOCK_M * BLOCK_M     # query blocks entirely inside the sequence
    if CAUSAL:                               # earlier queries cannot see this key block
        lo = n0
        n_diag = (tl.minimum(n0 + BLOCK_N, seqlen) - n0 + BLOCK_M - 1) // BLOCK_M  # BLOCK_N % BLOCK_M == 0
    else:
        lo = 0
        n_diag = 0
    lo_full = lo + n_diag * BLOCK_M
    n_tail = (seqlen - tl.maximum(lo_full, m_full) + BLOCK_M - 1) // BLOCK_M          # 0 or 1
    for g in range(0, GROUP):
        h = kvh * GROUP + g
        lse_h = LSE + b.to(tl.int64) * slb + h * slh + start
        delta_h = DELTA + b.to(tl.int64) * slb + h * slh + start
        # masked steps: the diagonal blocks, then the last partial query block
        for i in range(0, n_diag + n_tail):
            m0 = tl.where(i < n_diag, lo + i * BLOCK_M, tl.maximum(lo_full, m_full))
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, DQ, lse_h, delta_h, b, h, sqb, sqt, sqh, start, m0, offs_r,
                                offs_n, offs_d, seqlen, qk_scale, scale, D, BLOCK_D, CAUSAL, True, FUSED_DQ, PREC)
        for m0 in range(lo_full, m_full, BLOCK_M):
            dk, dv = _dkdv_step(dk, dv, k, v, Q, DO, DQ, lse_h, delta_h, b, h, sqb, sqt, sqh, start, m0, offs_r,
                                offs_n, offs_d, seqlen, qk_scale, scale, D, BLOCK_D, False, False, FUSED_DQ, PREC)
    mask = mask_n[:, None] & (offs_d < D)[None, :]
    tl.store(_tile(DK, b, skb, kvh, skh, start + n0, skt, tl.arange(0, BLOCK_N), offs_d),
             (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(_tile(DV, b, skb, kvh, skh, start + n0, skt, tl.arange(0, BLOCK_N), offs_d),
             dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _dq_step(dq, q, do, lse, delta, K, V, b, skb, skh, skt, kvh, start, n0, offs_m, offs_n, offs_d,
             seqlen, qk_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
             PREC: tl.constexpr):
    kn = n0 + offs_n
    k = _load(_tile(K, b, skb, kvh, skh, start + n0, skt, offs_n, offs_d), kn < seqlen, offs_d, D, BLOCK_D, MASKED)
    v = _load(_tile(V, b, skb, kvh, skh, start + n0, skt, offs_n, offs_d), kn < seqlen, offs_d, D, BLOCK_D, MASKED)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None])   # (BLOCK_M, BLOCK_N)
    if MASKED:
        valid = (kn < seqlen)[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= kn[None, :])
        p = tl.where(valid, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(k.dtype)
    return tl.dot(ds, k, dq, input_precision=PREC)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ,         # dq: out
                 CU, sqb, sqt, sqh, skb, skt, skh, slb, slh, T, H, GROUP, scale,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m
    b, h = pid_bh // H, pid_bh % H
    start, seqlen = _seq_bounds(CU, b, T, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    kvh = h // GROUP
    offs_r = tl.arange(0, BLOCK_M)
    offs_m = m0 + offs_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    q = _load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, True)
    do = _load(_tile(DO, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask_m, offs_d, D, BLOCK_D, True)
    lse = tl.load(LSE + b.to(tl.int64) * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + b.to(tl.int64) * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    qk_scale = scale * 1.4426950408889634
    if CAUSAL:
        n_full = m0 // BLOCK_N * BLOCK_N
        hi = tl.minimum(m0 + BLOCK_M, seqlen)
    else:
        n_full = seqlen // BLOCK_N * BLOCK_N
        hi = seqlen
    for n0 in range(0, n_full, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, b, skb, skh, skt, kvh, start, n0, offs_m, offs_n,
                      offs_d, seqlen, qk_scale, D, BLOCK_D, False, CAUSAL, PREC)
    for n0 in range(n_full, hi, BLOCK_N):
        dq = _dq_step(dq, q, do, lse, delta, K, V, b, skb, skh, skt, kvh, start, n0, offs_m, offs_n,
                      offs_d, seqlen, qk_scale, D, BLOCK_D, True, CAUSAL, PREC)
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    tl.store(_tile(DQ, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), (dq * scale).to(DQ.dtype.element_ty),
             mask=mask)
