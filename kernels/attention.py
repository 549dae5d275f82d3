"""Attention: O = softmax(Q K^T / sqrt(D) + mask) V, per head, grouped-query (query head h reads KV head h // G).

attention_ref is the spec (torch's scaled_dot_product_attention). The Triton kernels (kernels/attention_kernels.py)
are FlashAttention-2:
  forward   one program per (block of queries, sequence, q head); K/V stream through in key blocks with an online
            softmax in base 2; only the per-row logsumexp (fp32) is saved.
  backward  Delta = rowsum(dO * O); one program per (128-key block, sequence, KV head) keeps K, V on chip and
            streams Q, dO of the G query heads of its group (no K/V copies for GQA) to build dK, dV, and either
            adds dQ into an fp32 buffer with atomics ("fused", 5 matmuls per block pair) or leaves dQ to a
            query-major kernel ("split", 7 matmuls, bitwise deterministic: the only choice under
            torch.use_deterministic_algorithms). P is recomputed from the saved logsumexp.
Layouts: padded [B, T, H, D], or packed varlen [N, H, D] with cu_seqlens int32 [nseq + 1] (flash-attn's
convention: sequence i is rows cu[i]:cu[i+1]). Any length, head dims 16..128, fp16/bf16/fp32 with fp32 accumulation.
Tiles: a few configs per (head dim, causal, dtype, packed); on CUDA the first call of at least 1k tokens times them
and keeps the fastest (kernels/tuning.py); the interpreter runs one small config.
"""

import torch
import torch.nn.functional as F

from kernels import tuning

try:
    import triton
    from kernels.attention_kernels import _attn_bwd_delta, _attn_bwd_dkdv, _attn_bwd_dq, _attn_fwd
except ImportError:                      # the reference still works; kernels.backend() reports the fallback
    triton = None


def attention_ref(q, k, v, causal=True, cu_seqlens=None, attn_mask=None, max_seqlen=None):
    """Plain-torch attention. Layouts as in kernels.attention: [B, T, H, D], or packed [N, H, D] with cu_seqlens."""
    if cu_seqlens is not None:
        return _packed_ref(q, k, v, causal, cu_seqlens, max_seqlen)
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


def _packed_ref(q, k, v, causal, cu_seqlens, max_seqlen=None):
    """Packed sequences through ONE SDPA call, with no host sync: each sequence is gathered into a row of a padded
    (nseq, max_seqlen) batch (the slots past its end repeat its last token), attended with the causal mask, and
    gathered back. Causal attention never lets a real query see the slots after it, so the padding needs no mask;
    non-causal attention gets a key mask. All indexes are built on the device from cu_seqlens; only max_seqlen (a
    host int the collate knows) sets the shape."""
    cu = cu_seqlens.long()
    nseq = cu.numel() - 1
    if nseq == 0:
        return torch.empty_like(q)
    T = int(max_seqlen) if max_seqlen is not None else int((cu[1:] - cu[:-1]).max())    # (a sync, when not given)
    N = q.shape[0]
    lengths = cu[1:] - cu[:-1]                                                      # (nseq,)
    t = torch.arange(T, device=q.device)
    src = cu[:-1, None] + torch.minimum(t[None, :], (lengths - 1).clamp(min=0)[:, None])   # (nseq, T) token index
    src = src.clamp(max=max(N - 1, 0)).reshape(-1)
    padded = [x.index_select(0, src).view(nseq, T, *x.shape[1:]) for x in (q, k, v)]  # (nseq, T, H, D)
    mask = None
    if not causal:
        mask = (t[None, :] < lengths[:, None])[:, None, None, :]                   # (nseq, 1, 1, T): real keys
    o = attention_ref(*padded, causal=causal, attn_mask=mask)                       # (nseq, T, Hq, D)
    seq = torch.searchsorted(cu[1:], torch.arange(N, device=q.device), right=True)  # (N,) sequence of each token
    slot = seq * T + torch.arange(N, device=q.device) - cu[:-1].index_select(0, seq)
    return o.reshape(nseq * T, *o.shape[2:]).index_select(0, slot)                  # (N, Hq, D)


# ------------------------------------------------------------------------------------------------ configs
# fwd: (BLOCK_M, BLOCK_N, warps, stages). bwd: (dQ strategy, BLOCK_N keys, BLOCK_M queries, warps, stages) of the
# dK/dV kernel, then (BLOCK_M, BLOCK_N, warps, stages) of the dQ kernel for "split". The first entry is the
# default (small calls); bench/compile_check.py compiles every entry for sm_90: no mma.sync, no spill in a loop.
INTERPRET = dict(fwd=[(32, 32, 4, 1)], bwd=[("fused", 32, 32, 4, 1, 0, 0, 0, 0)],
                 bwd_deterministic=[("split", 32, 16, 4, 1, 16, 32, 4, 1)])
CUDA = {
    64: dict(fwd=[(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)],
             bwd=[("fused", 128, 64, 8, 2, 0, 0, 0, 0), ("fused", 128, 32, 8, 3, 0, 0, 0, 0),
                  ("split", 128, 64, 8, 2, 128, 64, 8, 2)]),
    128: dict(fwd=[(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
              bwd=[("fused", 128, 32, 8, 2, 0, 0, 0, 0), ("fused", 128, 16, 8, 3, 0, 0, 0, 0),
                   ("split", 128, 32, 8, 2, 128, 64, 8, 2)]),
}
# fp32 runs its matmuls on the FMA units with operands in registers: small tiles, or they spill (tests, parity runs)
CUDA_FP32 = dict(fwd=[(32, 16, 8, 2)], bwd=[("fused", 32, 16, 8, 2, 0, 0, 0, 0), ("split", 32, 16, 8, 2, 32, 16, 8, 2)])
TUNE_MIN_T = 1024                        # shorter calls take the default config: timing them would be noise


def configs(kind, D, interpret=False, deterministic=False, fp32=False):
    """The candidate configs of kind 'fwd' or 'bwd' for head dim D."""
    if interpret:
        return INTERPRET["bwd_deterministic" if kind == "bwd" and deterministic else kind]
    cands = CUDA_FP32[kind] if fp32 else CUDA[64 if D <= 64 else 128][kind]
    if kind == "bwd" and deterministic:
        cands = [c for c in cands if c[0] == "split"]
    return cands


def _strides3(x, varlen):
    """(batch, token, head) strides; a packed [N, H, D] tensor has batch stride 0."""
    return (0,) + tuple(x.stride()[:2]) if varlen else tuple(x.stride()[:3])


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


def _key(kind, q, causal, varlen, T):
    """A tuning key: the op, head dim, causal, dtype, packed, and the length bucket (tiles that win at 1k tokens
    need not win at 24k)."""
    return (kind, q.shape[-1], bool(causal), str(q.dtype).replace("torch.", ""), bool(varlen), tuning.bucket(T))


class TritonAttention(torch.autograd.Function):
    """fallback: a shape-class key (kernels.attention under LLAVA_KERNELS=auto): a backward whose launch fails then
    demotes the class to torch and takes its gradients from attention_ref instead of killing the run."""

    @staticmethod
    def forward(ctx, q, k, v, causal, cu_seqlens, max_seqlen, fallback=None):
        q, k, v = (x.contiguous() for x in (q, k, v))             # the kernels share strides within q/o and k/v
        varlen, nseq, T, H, Hkv, D = _geometry(q, k, cu_seqlens, max_seqlen)
        o = torch.empty_like(q)
        ntok = q.shape[0] if varlen else T
        lse = torch.empty((1 if varlen else nseq), H, ntok, device=q.device, dtype=torch.float32)
        cu = cu_seqlens.int() if varlen else torch.zeros(1, dtype=torch.int32, device=q.device)
        interpret = q.device.type == "cpu"
        strides = (*_strides3(q, varlen), *_strides3(k, varlen), lse.stride(0) if not varlen else 0, lse.stride(1))
        prec = "ieee" if q.dtype == torch.float32 else "tf32"

        BD = max(16, triton.next_power_of_2(D))

        def run(cfg):
            BM, BN, warps, stages = cfg
            _attn_fwd[(triton.cdiv(T, BM), nseq * H)](
                q, k, v, o, lse, cu, *strides, T, H, H // Hkv, D ** -0.5, D=D, BLOCK_D=BD, BLOCK_M=BM, BLOCK_N=BN,
                CAUSAL=causal, VARLEN=varlen, PREC=prec, num_warps=warps, num_stages=stages)

        fp32 = q.dtype == torch.float32
        run(tuning.pick(_key("attn_fwd", q, causal, varlen, T), configs("fwd", D, interpret, fp32=fp32), run,
                        tuning.tuning_enabled(q, T >= TUNE_MIN_T)))
        ctx.save_for_backward(q, k, v, o, lse, cu)
        ctx.meta = (causal, varlen, nseq, T, H, Hkv, D)
        ctx.fallback, ctx.cu_seqlens, ctx.max_seqlen = fallback, cu_seqlens, max_seqlen
        return o

    @staticmethod
    def backward(ctx, do):
        return tuning.guarded(ctx.fallback, do.device, lambda: TritonAttention._backward(ctx, do),
                              lambda: TritonAttention._torch_backward(ctx, do))

    @staticmethod
    def _torch_backward(ctx, do):
        """The gradients through attention_ref, recomputed from the saved inputs."""
        q, k, v = ctx.saved_tensors[:3]
        with torch.enable_grad():
            q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
            o = attention_ref(q, k, v, ctx.meta[0], ctx.cu_seqlens, max_seqlen=ctx.max_seqlen)
            dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
        return dq, dk, dv, None, None, None, None

    @staticmethod
    def _backward(ctx, do):
        q, k, v, o, lse, cu = ctx.saved_tensors
        causal, varlen, nseq, T, H, Hkv, D = ctx.meta
        do = do.contiguous()
        interpret = q.device.type == "cpu"
        BD = max(16, triton.next_power_of_2(D))
        prec = "ieee" if q.dtype == torch.float32 else "tf32"
        sl = (lse.stride(0) if not varlen else 0, lse.stride(1))
        delta = torch.empty_like(lse)
        sq, sk = _strides3(q, varlen), _strides3(k, varlen)
        _attn_bwd_delta[(triton.cdiv(T, 64), nseq * H)](o, do, delta, cu, *sq, *sl, T, H, D=D, BLOCK_D=BD, BLOCK_M=64,
                                                        VARLEN=varlen)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kw = dict(D=D, BLOCK_D=BD, CAUSAL=causal, VARLEN=varlen, PREC=prec)

        def run(cfg):
            strategy, BN, BM, warps, stages, BM2, BN2, warps2, stages2 = cfg
            fused = strategy == "fused"
            acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if fused else dq
            _attn_bwd_dkdv[(triton.cdiv(T, BN), nseq * Hkv)](
                q, k, v, do, lse, delta, dk, dv, acc, cu, *sq, *sk, *sl,
                T, Hkv, H // Hkv, D ** -0.5, BLOCK_M=BM, BLOCK_N=BN, FUSED_DQ=fused, num_warps=warps,
                num_stages=stages, **kw)
            if fused:
                dq.copy_(acc)
            else:
                _attn_bwd_dq[(triton.cdiv(T, BM2), nseq * H)](
                    q, k, v, do, lse, delta, dq, cu, *sq, *sk, *sl, T, H, H // Hkv, D ** -0.5,
                    BLOCK_M=BM2, BLOCK_N=BN2, num_warps=warps2, num_stages=stages2, **kw)

        deterministic = torch.are_deterministic_algorithms_enabled()
        key = _key("attn_bwd_det" if deterministic else "attn_bwd", q, causal, varlen, T)
        run(tuning.pick(key, configs("bwd", D, interpret, deterministic, q.dtype == torch.float32), run,
                        tuning.tuning_enabled(q, T >= TUNE_MIN_T)))
        return dq, dk, dv, None, None, None, None


def attention_triton(q, k, v, causal=True, cu_seqlens=None, max_seqlen=None, fallback=None):
    return TritonAttention.apply(q, k, v, causal, cu_seqlens, max_seqlen, fallback)
