"""Kernel benchmarks on one GPU: our Triton kernels against torch baselines measured in the same run.

    python bench/kernels_bench.py [--quick]

Attention (bf16): TFLOP/s forward and forward+backward, ours vs torch SDPA's flash backend, for Llama-3-8B's
causal GQA 32/8 heads of dim 128 at 16k tokens per batch (T = 1k, 4k, 8k), packed: 8 sequences of mixed lengths
(the baseline is torch's varlen flash attention when this torch has it, else SDPA-flash per sequence), and CLIP-L's
non-causal 16 heads of dim 64 at T = 577. FLOPs: 4 B H T^2 D forward (x0.5 causal), x3.5 for forward+backward
(the backward is 2.5x). SDPA gets K/V already expanded to every query head, outside the timing.
token_logprobs (bf16, d = 4096, V = 128256, every row supervised): forward+backward time and extra peak memory
(beyond inputs and their gradients) vs the naive path: bf16 logits, fp32 log_softmax, gather.
Goals (bench/gpu_check.py enforces them): attention >= 1.0x SDPA forward+backward at T >= 4k, padded and packed;
token_logprobs <= 1/20 of the naive extra memory and no slower.
"""

import argparse
import inspect
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from kernels.attention import attention_triton  # noqa: E402

VARLEN_LENGTHS = [2900, 1000, 4096, 333, 1500, 77, 3000, 3478]      # 8 sequences, 16,384 tokens
LLAMA_V = 128256


def bench(fn, reps=20):
    """Milliseconds per call: Triton's do_bench on CUDA, the median of a few calls on the CPU (--dry)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench
        return do_bench(fn, warmup=5, rep=reps * 10)
    fn()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def expand(x, G):
    """(..., Hkv, D) -> (..., Hkv * G, D): each KV head repeated for its G query heads."""
    return x.repeat_interleave(G, -2)


def sdpa(q, k, v, causal, flash=True):
    """torch SDPA on [B, T, H, D] with K/V heads already matching q's; flash backend on CUDA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if q.is_cuda and flash:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def varlen_baseline(cu, maxlen, causal):
    """(name, fn(q, k, v) on packed [N, H, D] with K/V expanded): torch's varlen flash attention where it exists
    with a signature we know, else SDPA-flash over each sequence in turn."""
    try:
        if not cu.is_cuda:
            raise ImportError("varlen_attn is CUDA-only")
        from torch.nn.attention.varlen import varlen_attn
        params = inspect.signature(varlen_attn).parameters
        if "is_causal" in params:
            extra = dict(is_causal=causal)
        elif "window_size" in params:
            extra = dict(window_size=(-1, 0) if causal else (-1, -1))
        else:
            raise ImportError("unknown varlen_attn signature")
        # a forward+backward on a toy batch first: a version whose kernel lacks a backward (or GQA) is skipped
        t = torch.randn(8, 2, 64, device=cu.device, dtype=torch.bfloat16, requires_grad=True)
        c8 = torch.tensor([0, 8], dtype=torch.int32, device=cu.device)
        varlen_attn(t, t, t, c8, c8, 8, 8, **extra).sum().backward()
        return "torch varlen_attn", lambda q, k, v: varlen_attn(q, k, v, cu, cu, maxlen, maxlen, **extra)
    except Exception:
        bounds = cu.tolist()

        def loop(q, k, v):
            return torch.cat([sdpa(q[None, a:b], k[None, a:b], v[None, a:b], causal)[0]
                              for a, b in zip(bounds, bounds[1:])])
        return "SDPA-flash per sequence", loop


def attention_bench(B, T, H, Hkv, D, causal, lengths=None, device="cuda", dtype=torch.bfloat16):
    """TFLOP/s of SDPA and ours, forward and forward+backward. lengths: packed sequences instead of B x T."""
    g = torch.Generator(device).manual_seed(0)
    shape = (sum(lengths),) if lengths else (B, T)
    q, k, v = (torch.randn(*shape, h, D, device=device, dtype=dtype, generator=g).requires_grad_()
               for h in (H, Hkv, Hkv))
    do = torch.randn_like(q)
    G = H // Hkv
    qs, ks, vs = q.detach().clone(), expand(k.detach(), G), expand(v.detach(), G)
    for x in (qs, ks, vs):
        x.requires_grad_()
    if lengths:
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        base_name, base = varlen_baseline(cu, max(lengths), causal)
        flops = sum(4 * H * n * n * D for n in lengths) * (0.5 if causal else 1.0)

        def ours():
            return attention_triton(q, k, v, causal, cu, max(lengths))
    else:
        base_name = "SDPA-flash"
        flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)

        def base(q, k, v):
            return sdpa(q, k, v, causal)

        def ours():
            return attention_triton(q, k, v, causal)

    out = dict(baseline=base_name)
    for label, fn in (("base", lambda: base(qs, ks, vs)), ("ours", ours)):
        with torch.no_grad():
            t_f = bench(fn)

        def step():
            fn().backward(do)

        t_fb = bench(step)
        out[label] = (flops / t_f / 1e9, 3.5 * flops / t_fb / 1e9)
    return out


def naive_logprobs(h, w, y):
    logits = h @ w.T                                                      # bf16 [N, V]
    return torch.log_softmax(logits.float(), -1).gather(-1, y[:, None])[:, 0]


def logprobs_bench(N, d=4096, V=LLAMA_V, device="cuda", dtype=torch.bfloat16):
    """Forward+backward ms and extra peak memory (bytes; None off CUDA) of the naive path and ours."""
    g = torch.Generator(device).manual_seed(0)
    h = (torch.randn(N, d, device=device, dtype=dtype, generator=g) * 0.5).requires_grad_()
    w = (torch.randn(V, d, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device=device, generator=g)
    gout = torch.randn(N, device=device, generator=g)
    cuda = h.is_cuda
    res = {}
    def ours(h, w, y):
        return kernels.token_logprobs(h, w, y)

    for label, fn in (("naive", naive_logprobs), ("ours", ours)):
        def step():
            h.grad = w.grad = None
            fn(h, w, y).backward(gout)

        step()
        extra = None
        if cuda:
            torch.cuda.synchronize()
            h.grad = w.grad = None
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            grads = h.grad.numel() * h.grad.element_size() + w.grad.numel() * w.grad.element_size()
            extra = torch.cuda.max_memory_allocated() - base - grads
        res[label] = (bench(step, reps=5), extra)
    res["tflops"] = 2 * N * d * V * 4 / res["ours"][0] / 1e9                # fwd GEMM, recompute, 2 bwd GEMMs
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="T = 4k, packed, and N = 4096 only")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__}\n")
    print("attention, bf16, TFLOP/s")
    print("| shape | baseline | base fwd | ours fwd | ratio | base fwd+bwd | ours fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    shapes = [("causal GQA 32/8 d128 T=1k x16", 16, 1024, 32, 8, 128, True, None),
              ("causal GQA 32/8 d128 T=4k x4", 4, 4096, 32, 8, 128, True, None),
              ("causal GQA 32/8 d128 T=8k x2", 2, 8192, 32, 8, 128, True, None),
              ("causal GQA 32/8 d128 packed 8 seqs", 1, 0, 32, 8, 128, True, VARLEN_LENGTHS),
              ("CLIP non-causal 16 heads d64 T=577 x28", 28, 577, 16, 16, 64, False, None)]
    for name, *shape in (shapes[1:4] if args.quick else shapes):
        r = attention_bench(*shape)
        (bf, bfb), (of, ofb) = r["base"], r["ours"]
        print(f"| {name} | {r['baseline']} | {bf:.0f} | {of:.0f} | {of / bf:.2f}x | {bfb:.0f} | {ofb:.0f} | "
              f"{ofb / bfb:.2f}x |", flush=True)
    print(f"\ntoken_logprobs, bf16, d=4096, V={LLAMA_V}, forward+backward")
    print("| rows | naive ms | ours ms | speed | naive extra GiB | ours extra GiB | memory | ours TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for N in ([4096] if args.quick else [4096, 16384]):
        r = logprobs_bench(N)
        (tn, mn), (to, mo) = r["naive"], r["ours"]
        print(f"| N={N} | {tn:.1f} | {to:.1f} | {tn / to:.2f}x | {mn / 2**30:.2f} | {mo / 2**30:.2f} | "
              f"1/{mn / max(mo, 1):.0f} | {r['tflops']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
