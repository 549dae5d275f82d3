"""Attention: O = softmax(Q K^T / sqrt(D) + mask) V, per head, grouped-query (query head h reads KV head h // G).

attention_ref is the spec (torch's scaled_dot_product_attention). The Triton kernels are FlashAttention-2:
  forward   one program per (block of BLOCK_M queries, sequence, q head); K/V stream through in BLOCK_N blocks
            with an online softmax in base 2; only the per-row logsumexp (fp32) is saved.
  backward  Delta = rowsum(dO * O); one program per (key block, sequence, KV head) loops over the G query heads
            of its group and all query blocks to build dK, dV (no atomics, no K/V copies for GQA); one program
            per (query block, sequence, q head) builds dQ. P is recomputed from the saved logsumexp.
Layouts: padded [B, T, H, D], or packed varlen [N, H, D] with cu_seqlens int32 [nseq + 1] (flash-attn's
convention: sequence i is rows cu[i]:cu[i+1]). Any length, head dims 16..128, fp16/bf16/fp32 with fp32 accumulation.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                      # the reference still works; kernels.backend() reports the fallback
    triton = None

LOG2E = 1.4426950408889634


def attention_ref(q, k, v, causal=True, cu_seqlens=None, attn_mask=None):
    """Plain-torch attention. Layouts as in kernels.attention: [B, T, H, D], or packed [N, H, D] with cu_seqlens."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        out = [attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0] for a, b in zip(bounds, bounds[1:])]
        return torch.cat(out, 0) if out else torch.empty_like(q)
    hq, hkv = q.shape[2], k.shape[2]
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads is not a multiple of {hkv} key/value heads")
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))        # (B, H, T, D)
    if attn_mask is not None:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask, enable_gqa=hq != hkv)
    else:
        # is_causal aligns the mask top-left, which is right only when queries and keys are the same positions
        if causal and q.shape[1] != k.shape[1]:
            raise ValueError("attention: causal with different query and key lengths needs an explicit attn_mask")
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hq != hkv)
    return o.transpose(1, 2)                                    # (B, T, Hq, D)


if triton is not None:
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
    def _rows_mask(mask_r, offs_d, D: tl.constexpr, BLOCK_D: tl.constexpr):
        if BLOCK_D == D:                         # the common case: no head-dim padding to mask
            mask = mask_r[:, None]
        else:
            mask = mask_r[:, None] & (offs_d < D)[None, :]
        return mask

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE,           # q/k/v/o: [B, T, H, D] or [N, H, D]; LSE fp32 [B, Hq, T] or [1, Hq, N]
                  CU,                         # int32 cu_seqlens (varlen) or a dummy
                  sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh,   # strides; head-dim stride is 1
                  slb, slh,                   # LSE strides (batch, head); token stride 1
                  T, H, scale,                # padded length, query heads, 1/sqrt(D)
                  GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
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
        q_mask = _rows_mask(mask_m, offs_d, D, BLOCK_D)
        q = tl.load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask=q_mask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634        # work in base 2: exp(x) = exp2(x * log2(e))
        hi = tl.minimum(m0 + BLOCK_M, seqlen) if CAUSAL else seqlen
        for n0 in range(0, hi, BLOCK_N):
            kn = n0 + offs_n
            mask_n = kn < seqlen
            kv_mask = _rows_mask(mask_n, offs_d, D, BLOCK_D)
            k = tl.load(_tile(K, b, skb, kvh, skh, start + n0, skt, offs_n, offs_d), mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale                        # (BLOCK_M, BLOCK_N)
            valid = mask_n[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= kn[None, :])
            qk = tl.where(valid, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a fully masked row stays 0, not NaN
            p = tl.exp2(qk - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(_tile(V, b, svb, kvh, svh, start + n0, svt, offs_n, offs_d), mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        acc = acc / l_safe[:, None]
        tl.store(_tile(O, b, sob, h, soh, start + m0, sot, offs_r, offs_d), acc.to(O.dtype.element_ty), mask=q_mask)
        # base-2 logsumexp of the scaled scores, what the backward needs to rebuild P
        tl.store(LSE + b.to(tl.int64) * slb + h * slh + start + offs_m, m_i + tl.log2(l_safe), mask=mask_m)

    @triton.jit
    def _attn_bwd_delta(O, DO, DELTA, sob, sot, soh, sdb, sdt, sdh, slb, slh, T, H,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr,
                        CU):
        """Delta = rowsum(dO * O) per (row, head), fp32 (same layout as LSE)."""
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        start, seqlen = _seq_bounds(CU, b, T, VARLEN)
        m0 = pid_m * BLOCK_M
        offs_r = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = m0 + offs_r < seqlen
        mask = _rows_mask(mask_m, offs_d, D, BLOCK_D)
        o = tl.load(_tile(O, b, sob, h, soh, start + m0, sot, offs_r, offs_d), mask=mask, other=0.0)
        do = tl.load(_tile(DO, b, sdb, h, sdh, start + m0, sdt, offs_r, offs_d), mask=mask, other=0.0)
        tl.store(DELTA + b.to(tl.int64) * slb + h * slh + start + m0 + offs_r,
                 tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=mask_m)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, CU,
                       sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, slb, slh, T, HKV, scale,
                       GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
        """dK, dV of one key block of one KV head: sums over the G query heads that read it (dk/dv share k/v's
        strides)."""
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
        b, kvh = pid_bh // HKV, pid_bh % HKV
        start, seqlen = _seq_bounds(CU, b, T, VARLEN)
        n0 = pid_n * BLOCK_N
        if n0 >= seqlen:
            return
        offs_c = tl.arange(0, BLOCK_N)
        offs_n = n0 + offs_c
        offs_r = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < seqlen
        kv_mask = _rows_mask(mask_n, offs_d, D, BLOCK_D)
        k = tl.load(_tile(K, b, skb, kvh, skh, start + n0, skt, offs_c, offs_d), mask=kv_mask, other=0.0)
        v = tl.load(_tile(V, b, svb, kvh, svh, start + n0, svt, offs_c, offs_d), mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634
        lo = n0 // BLOCK_M * BLOCK_M if CAUSAL else 0        # earlier queries cannot see this block
        for g in range(GROUP):
            h = kvh * GROUP + g
            lse_ptr = LSE + b.to(tl.int64) * slb + h * slh + start
            delta_ptr = DELTA + b.to(tl.int64) * slb + h * slh + start
            for m0 in range(lo, seqlen, BLOCK_M):
                offs_m = m0 + offs_r
                mask_m = offs_m < seqlen
                q_mask = _rows_mask(mask_m, offs_d, D, BLOCK_D)
                q = tl.load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask=q_mask, other=0.0)
                do = tl.load(_tile(DO, b, sdb, h, sdh, start + m0, sdt, offs_r, offs_d), mask=q_mask, other=0.0)
                lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
                delta = tl.load(delta_ptr + offs_m, mask=mask_m, other=0.0)
                qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale                   # (BLOCK_M, BLOCK_N)
                valid = mask_m[:, None] & mask_n[None, :]
                if CAUSAL:
                    valid = valid & (offs_m[:, None] >= offs_n[None, :])
                p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
        tl.store(_tile(DK, b, skb, kvh, skh, start + n0, skt, offs_c, offs_d), (dk * scale).to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(_tile(DV, b, svb, kvh, svh, start + n0, svt, offs_c, offs_d), dv.to(DV.dtype.element_ty),
                 mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, CU,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, slb, slh, T, H, scale,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr, PREC: tl.constexpr):
        """dQ of one query block of one head (dq shares q's strides)."""
        pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
        b, h = pid_bh // H, pid_bh % H
        start, seqlen = _seq_bounds(CU, b, T, VARLEN)
        m0 = pid_m * BLOCK_M
        if m0 >= seqlen:
            return
        kvh = h // GROUP
        offs_r = tl.arange(0, BLOCK_M)
        offs_m = m0 + offs_r
        offs_c = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < seqlen
        q_mask = _rows_mask(mask_m, offs_d, D, BLOCK_D)
        q = tl.load(_tile(Q, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), mask=q_mask, other=0.0)
        do = tl.load(_tile(DO, b, sdb, h, sdh, start + m0, sdt, offs_r, offs_d), mask=q_mask, other=0.0)
        lse = tl.load(LSE + b.to(tl.int64) * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + b.to(tl.int64) * slb + h * slh + start + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        qk_scale = scale * 1.4426950408889634
        hi = tl.minimum(m0 + BLOCK_M, seqlen) if CAUSAL else seqlen
        for n0 in range(0, hi, BLOCK_N):
            offs_n = n0 + offs_c
            mask_n = offs_n < seqlen
            kv_mask = _rows_mask(mask_n, offs_d, D, BLOCK_D)
            k = tl.load(_tile(K, b, skb, kvh, skh, start + n0, skt, offs_c, offs_d), mask=kv_mask, other=0.0)
            v = tl.load(_tile(V, b, svb, kvh, svh, start + n0, svt, offs_c, offs_d), mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            valid = mask_m[:, None] & mask_n[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(valid, tl.exp2(qk - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(_tile(DQ, b, sqb, h, sqh, start + m0, sqt, offs_r, offs_d), (dq * scale).to(DQ.dtype.element_ty),
                 mask=q_mask)


def _strides3(x, varlen):
    """(batch, token, head) strides; a packed [N, H, D] tensor has batch stride 0."""
    return (0,) + tuple(x.stride()[:2]) if varlen else tuple(x.stride()[:3])


def _blocks(D, interpret):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel. On CUDA: the largest tiles that compile for sm_90
    without register spills (bench/compile_check.py prints registers, spills and shared memory per choice)."""
    if interpret:                                # the interpreter: small tiles exercise the multi-block paths
        return dict(fwd=(32, 32, 4, 1), dkdv=(32, 32, 4, 1), dq=(32, 32, 4, 1))
    if D <= 64:
        return dict(fwd=(128, 64, 8, 3), dkdv=(64, 64, 8, 2), dq=(128, 64, 8, 3))
    return dict(fwd=(128, 64, 8, 3), dkdv=(128, 32, 8, 2), dq=(64, 64, 8, 2))


def _geometry(q, k, cu_seqlens, max_seqlen):
    varlen = cu_seqlens is not None
    if varlen:
        nseq, T = cu_seqlens.numel() - 1, int(max_seqlen) if max_seqlen is not None else \
            int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        H, Hkv, D = q.shape[1], k.shape[1], q.shape[2]
    else:
        nseq, T, H, D = q.shape[0], q.shape[1], q.shape[2], q.shape[3]
        Hkv = k.shape[2]
        if k.shape[1] != T:
            raise ValueError("Triton attention: queries and keys must have the same length (use attn_mask otherwise)")
    if H % Hkv:
        raise ValueError(f"attention: {H} query heads is not a multiple of {Hkv} key/value heads")
    return varlen, nseq, T, H, Hkv, D


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, cu_seqlens, max_seqlen):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        varlen, nseq, T, H, Hkv, D = _geometry(q, k, cu_seqlens, max_seqlen)
        o = torch.empty_like(q)
        ntok = q.shape[0] if varlen else T
        lse = torch.empty((1 if varlen else nseq), H, ntok, device=q.device, dtype=torch.float32)
        cu = cu_seqlens.int() if varlen else torch.zeros(1, dtype=torch.int32, device=q.device)
        interpret = q.device.type == "cpu"
        BM, BN, warps, stages = _blocks(D, interpret)["fwd"]
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        _attn_fwd[(triton.cdiv(T, BM), nseq * H)](
            q, k, v, o, lse, cu, *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen),
            *_strides3(o, varlen), lse.stride(0) if not varlen else 0, lse.stride(1), T, H, D ** -0.5,
            GROUP=H // Hkv, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=BM, BLOCK_N=BN, CAUSAL=causal,
            VARLEN=varlen, PREC=prec, num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.meta = (causal, varlen, nseq, T, H, Hkv, D)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        causal, varlen, nseq, T, H, Hkv, D = ctx.meta
        do = do if do.stride(-1) == 1 else do.contiguous()
        blocks = _blocks(D, q.device.type == "cpu")
        BD = max(16, triton.next_power_of_2(D))
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        sl = (lse.stride(0) if not varlen else 0, lse.stride(1))
        delta = torch.empty_like(lse)
        BM = blocks["dq"][0]
        _attn_bwd_delta[(triton.cdiv(T, BM), nseq * H)](
            o, do, delta, *_strides3(o, varlen), *_strides3(do, varlen), *sl, T, H, D=D, BLOCK_D=BD, BLOCK_M=BM,
            VARLEN=varlen, CU=cu)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        common = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(do, varlen), *sl)
        kw = dict(GROUP=H // Hkv, D=D, BLOCK_D=BD, CAUSAL=causal, VARLEN=varlen, PREC=prec)
        BM, BN, warps, stages = blocks["dkdv"]
        _attn_bwd_dkdv[(triton.cdiv(T, BN), nseq * Hkv)](q, k, v, do, lse, delta, dk, dv, cu, *common, T, Hkv,
                                                         D ** -0.5, BLOCK_M=BM, BLOCK_N=BN, num_warps=warps,
                                                         num_stages=stages, **kw)
        BM, BN, warps, stages = blocks["dq"]
        _attn_bwd_dq[(triton.cdiv(T, BM), nseq * H)](q, k, v, do, lse, delta, dq, cu, *common, T, H, D ** -0.5,
                                                     BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages, **kw)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, causal=True, cu_seqlens=None, max_seqlen=None):
    return TritonAttention.apply(q, k, v, causal, cu_seqlens, max_seqlen)
