"""Per-token log-probabilities fused with the output projection: logp[i] = (h_i . w_{y_i}) - logsumexp_v(h_i . w_v).

SFT's loss is the mean of -logp over supervised rows and DPO sums logp per response, so both share this op, and
neither ever holds the [N, V] logits (V = 128,320 for llama3-llava-next: 16k rows would be 8 GB in fp32).

  token_logprobs_ref   the spec: logits, log_softmax in fp32, gather (the "naive path" the benchmarks compare to)
  chunked path         plain torch, V in chunks with an online logsumexp; recompute in the backward (CPU default)
  Triton path          forward: one kernel, programs over (row block, V split), the lm_head matmul tiled over V and
                       d with an online logsumexp; per row only (max, sum, target logit) per split leave the chip.
                       The number of splits fills whole waves of the blocks the GPU can hold at once, computed from
                       the compiled kernel's registers and shared memory (kernels/tuning.py).
                       backward: per V chunk a kernel recomputes the logits tile and writes dlogits = g (onehot - p)
                       in the input dtype (p and the -1 term in fp32), then two GEMMs give dh (accumulated over chunks
                       in fp32) and that chunk's dW (one GEMM over all rows, fp32 accumulators).
The public function drops rows whose label is ignore_index before any matmul: in VLM batches most rows are image or
prompt tokens.
"""

import torch

from kernels import tuning

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def token_logprobs_ref(hidden, weight, labels, ignore_index=-100):
    """log p(label) per row, fp32, 0 where label == ignore_index. Materialises the logits: the spec only."""
    keep = labels != ignore_index
    logits = hidden @ weight.T
    logits = logits if logits.dtype == torch.float64 else logits.float()      # fp64 stays fp64: the test oracle
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[:, None])[:, 0]
    return torch.where(keep, lp, torch.zeros_like(lp))


def _chunk(M, V, elem_bytes, budget=64 << 20):
    """Vocabulary chunk width so that one [M, chunk] buffer stays near `budget` bytes."""
    c = budget // max(1, M * elem_bytes)
    return int(min(V, max(256, c)))


class ChunkedLogProbs(torch.autograd.Function):
    """Plain torch, bounded memory: [M, chunk] fp32 at a time, forward and backward (rows already compacted)."""

    @staticmethod
    def forward(ctx, h, w, y):
        M, V = h.shape[0], w.shape[0]
        C = _chunk(M, V, 4)
        hf = h.float()
        m = torch.full((M,), float("-inf"), device=h.device)
        s = torch.zeros(M, device=h.device)
        for c0 in range(0, V, C):
            logits = hf @ w[c0:c0 + C].float().T                                   # (M, C) fp32
            m_new = torch.maximum(m, logits.max(-1).values)
            s = s * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(-1)
            m = m_new
        lse = m + torch.log(s)
        target = (hf * w[y].float()).sum(-1)
        ctx.save_for_backward(h, w, y, lse)
        return target - lse

    @staticmethod
    def backward(ctx, g):
        h, w, y, lse = ctx.saved_tensors
        M, V = h.shape[0], w.shape[0]
        C = _chunk(M, V, 4)
        hf, g = h.float(), g.float()
        dh = torch.zeros_like(hf)
        dw = torch.empty_like(w)
        for c0 in range(0, V, C):
            wc = w[c0:c0 + C].float()
            dl = -torch.exp(hf @ wc.T - lse[:, None]) * g[:, None]                  # d logp / d logits = onehot - p
            hit = (y >= c0) & (y < c0 + wc.shape[0])
            # + g at each row's label inside this chunk: a scatter, not a boolean index (that would sync on a GPU)
            dl.scatter_add_(1, (y - c0).clamp(0, wc.shape[0] - 1)[:, None], torch.where(hit, g, 0.0)[:, None])
            dh += dl @ wc
            dw[c0:c0 + C] = (dl.T @ hf).to(w.dtype)
        return dh.to(h.dtype), dw, None


if triton is not None:
    @triton.jit
    def _logits_tile(H, W, offs_m, offs_v, mask_m, mask_v, d, shd, swv,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        """fp32 (BLOCK_M, BLOCK_V) tile of h @ W^T, accumulated over d in BLOCK_K steps."""
        acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        rows = offs_m.to(tl.int64)
        cols = offs_v.to(tl.int64)
        for k0 in range(0, d, BLOCK_K):
            kk = k0 + offs_k
            mask_k = kk < d
            h = tl.load(H + rows[:, None] * shd + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * swv + kk[None, :], mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            acc += tl.dot(h, tl.trans(w), input_precision=PREC)             # rows of W are contiguous: load, transpose
        return acc

    @triton.jit
    def _logprobs_fwd(H, W, Y,                  # h (M, d), W (V, d), labels int64 (M,)
                      PM, PS, PT,               # fp32 (n_splits, M): running max (base 2), sum, target logit
                      M, V, d, shd, swv, v_per_split,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        # row blocks vary fastest, so programs running together walk the same slice of W (it stays in L2)
        pid_m, pid_s = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        y = tl.load(Y + offs_m, mask=mask_m, other=-1)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_i = tl.zeros([BLOCK_M], tl.float32)
        t_i = tl.zeros([BLOCK_M], tl.float32)
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            mask_v = offs_v < v_hi
            logits = _logits_tile(H, W, offs_m, offs_v, mask_m, mask_v, d, shd, swv, BLOCK_M, BLOCK_V, BLOCK_K, PREC)
            t_i += tl.sum(tl.where(offs_v[None, :] == y[:, None], logits, 0.0), 1)
            x = tl.where(mask_v[None, :], logits * 1.4426950408889634, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, 1))
            s_i = s_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(x - m_new[:, None]), 1)
            m_i = m_new
        tl.store(PM + pid_s * M + offs_m, m_i, mask=mask_m)
        tl.store(PS + pid_s * M + offs_m, s_i, mask=mask_m)
        tl.store(PT + pid_s * M + offs_m, t_i, mask=mask_m)

    @triton.jit
    def _logprobs_dlogits(H, W, Y, LSE2, G,      # LSE2: fp32 logsumexp in base 2; G: fp32 upstream grad (M,)
                          DL,                    # out: (M, chunk) dlogits for vocabulary rows [c0, c0 + chunk)
                          M, V, d, shd, swv, c0, chunk, sdl,
                          BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
        pid_m, pid_v = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_v = c0 + offs_c
        mask_m = offs_m < M
        mask_v = (offs_c < chunk) & (offs_v < V)
        logits = _logits_tile(H, W, offs_m, offs_v, mask_m, mask_v, d, shd, swv, BLOCK_M, BLOCK_V, BLOCK_K, PREC)
        lse2 = tl.load(LSE2 + offs_m, mask=mask_m, other=0.0)
        g = tl.load(G + offs_m, mask=mask_m, other=0.0)
        y = tl.load(Y + offs_m, mask=mask_m, other=-1)
        p = tl.exp2(logits * 1.4426950408889634 - lse2[:, None])
        onehot = (offs_v[None, :] == y[:, None]).to(tl.float32)
        dl = g[:, None] * (onehot - p)           # the -1 of the true class is taken in fp32, before any rounding
        tl.store(DL + offs_m.to(tl.int64)[:, None] * sdl + offs_c[None, :], dl.to(DL.dtype.element_ty),
                 mask=mask_m[:, None] & mask_v[None, :])


# (BLOCK_M, BLOCK_V, BLOCK_K, warps, stages) per kernel; the first is the default (small calls). On CUDA the first
# call with at least 1k rows times them (kernels/tuning.py); bench/compile_check.py compiles each for sm_90.
INTERPRET = (32, 128, 32, 4, 1)                  # the interpreter: few, large tiles run fastest
CUDA = dict(fwd=[(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)],
            dlogits=[(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4)])
TUNE_MIN_ROWS = 1024
_slots = {}                                      # (config, dtype, device) -> resident blocks on the whole GPU


CUDA_FP32 = (32, 64, 32, 4, 2)                  # fp32 matmuls run on the FMA units: small tiles (tests, parity runs)


def configs(kind, interpret=False, fp32=False):
    return [INTERPRET] if interpret else [CUDA_FP32] if fp32 else CUDA[kind]


def _splits(h, w, y, cfg, V, row_blocks):
    """How many V ranges the forward splits into: on CUDA, enough programs to fill whole waves of the blocks the
    compiled kernel can keep resident (from its real registers and shared memory); 2 in the interpreter."""
    BM, BV, BK, warps, stages = cfg
    if not h.is_cuda:
        return 2
    key = (cfg, h.dtype, h.device.index)
    if key not in _slots:
        dummy = torch.empty(1, device=h.device, dtype=torch.float32)
        compiled = _logprobs_fwd.warmup(h, w, y, dummy, dummy, dummy, h.shape[0], V, h.shape[1], h.stride(0),
                                        w.stride(0), BV, BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK,
                                        PREC="ieee" if h.dtype == torch.float32 else "tf32", num_warps=warps,
                                        num_stages=stages, grid=(1,))
        _slots[key] = tuning.resident_blocks(compiled, h.device)
    return tuning.whole_waves(row_blocks, triton.cdiv(V, BV), _slots[key])


_MM_OUT_DTYPE = [True]                          # torch.mm(..., out_dtype=) works here (CUDA, torch >= 2.8)


def _mm_fp32(a, b):
    """a @ b as fp32: a 16-bit GEMM with its fp32 accumulator returned as is where torch has it, else rounded."""
    if a.is_cuda and a.dtype != torch.float32 and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return (a @ b).float()


def _key(kind, h, w):
    """A tuning key: the op, dtype, hidden size and the row and vocabulary buckets."""
    return (kind, str(h.dtype).replace("torch.", ""), h.shape[1], tuning.bucket(w.shape[0]), tuning.bucket(h.shape[0]))


class TritonLogProbs(torch.autograd.Function):
    """fallback: a shape-class key (kernels.token_logprobs under LLAVA_KERNELS=auto): a backward whose launch fails
    then demotes the class to torch and takes its gradients from the chunked path instead of killing the run."""

    @staticmethod
    def forward(ctx, h, w, y, fallback=None):
        h, w = h.contiguous(), w.contiguous()
        M, d = h.shape
        V = w.shape[0]
        prec = "ieee" if h.dtype == torch.float32 else "tf32"

        def run(cfg):
            BM, BV, BK, warps, stages = cfg
            row_blocks = triton.cdiv(M, BM)
            v_per_split = triton.cdiv(triton.cdiv(V, _splits(h, w, y, cfg, V, row_blocks)), BV) * BV
            splits = triton.cdiv(V, v_per_split)
            pm, ps, pt = (torch.empty(splits, M, device=h.device, dtype=torch.float32) for _ in range(3))
            _logprobs_fwd[(row_blocks, splits)](h, w, y, pm, ps, pt, M, V, d, h.stride(0), w.stride(0), v_per_split,
                                                BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, PREC=prec, num_warps=warps,
                                                num_stages=stages)
            return pm, ps, pt

        fp32 = h.dtype == torch.float32
        cfg = tuning.pick(_key("logprobs_fwd", h, w), configs("fwd", not h.is_cuda, fp32), run,
                          tuning.tuning_enabled(h, M >= TUNE_MIN_ROWS))
        pm, ps, pt = run(cfg)
        m = pm.max(0).values
        lse2 = m + torch.log2((ps * torch.exp2(pm - m)).sum(0))
        lse = lse2 * 0.6931471805599453
        ctx.save_for_backward(h, w, y, lse2)
        ctx.fallback = fallback
        return pt.sum(0) - lse

    @staticmethod
    def backward(ctx, g):
        return tuning.guarded(ctx.fallback, g.device, lambda: TritonLogProbs._backward(ctx, g),
                              lambda: TritonLogProbs._torch_backward(ctx, g))

    @staticmethod
    def _torch_backward(ctx, g):
        """The gradients through the chunked torch path, recomputed from the saved inputs."""
        h, w, y, _ = ctx.saved_tensors
        with torch.enable_grad():
            h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
            dh, dw = torch.autograd.grad(ChunkedLogProbs.apply(h, w, y), (h, w), g)
        return dh, dw, None, None

    @staticmethod
    def _backward(ctx, g):
        h, w, y, lse2 = ctx.saved_tensors
        M, d = h.shape
        V = w.shape[0]
        prec = "ieee" if h.dtype == torch.float32 else "tf32"
        g = g.float().contiguous()
        C = _chunk(M, V, h.element_size())
        C = triton.cdiv(C, 256) * 256
        dl = torch.empty(M, min(C, V), device=h.device, dtype=h.dtype)

        def dlogits(cfg, c0, n):
            BM, BV, BK, warps, stages = cfg
            _logprobs_dlogits[(triton.cdiv(M, BM), triton.cdiv(n, BV))](
                h, w, y, lse2, g, dl, M, V, d, h.stride(0), w.stride(0), c0, n, dl.stride(0),
                BLOCK_M=BM, BLOCK_V=BV, BLOCK_K=BK, PREC=prec, num_warps=warps, num_stages=stages)

        fp32 = h.dtype == torch.float32
        cfg = tuning.pick(_key("logprobs_dlogits", h, w), configs("dlogits", not h.is_cuda, fp32),
                          lambda cfg: dlogits(cfg, 0, min(C, V)), tuning.tuning_enabled(h, M >= TUNE_MIN_ROWS))
        dh = torch.zeros(M, d, device=h.device, dtype=torch.float32)
        dw = torch.empty_like(w)
        for c0 in range(0, V, C):
            n = min(C, V - c0)
            dlogits(cfg, c0, n)
            dlc = dl[:, :n]
            dh += _mm_fp32(dlc, w[c0:c0 + n])     # summed over chunks in fp32, each chunk's product unrounded
            dw[c0:c0 + n] = dlc.T @ h            # one GEMM over all rows: fp32 accumulators, one rounding
        return dh.to(h.dtype), dw, None, None
