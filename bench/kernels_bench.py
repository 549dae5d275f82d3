"""Kernel benchmarks on one GPU: our Triton kernels against torch baselines measured in the same run.

    python bench/kernels_bench.py [--quick]

Attention (bf16): TFLOP/s forward and forward+backward, ours vs torch SDPA's flash backend, for Llama-3-8B's
causal GQA 32/8 heads of dim 128 at 16k tokens per batch (T = 1k, 4k, 8k), and CLIP-L's non-causal 16 heads of
dim 64 at T = 577. FLOPs: 4 B H T^2 D forward (x0.5 causal), x3.5 for forward+backward (the backward is 2.5x).
token_logprobs (bf16, d = 4096, V = 128320, N = 4096 and 16384, every row supervised): forward+backward time and
extra peak memory (beyond inputs and their gradients) vs the naive path: bf16 logits, fp32 log_softmax, gather.
Goals: attention >= 1.0x SDPA forward+backward at T >= 4k; token_logprobs <= 1/20 of the naive extra memory and
no slower.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("LLAVA_KERNELS", "triton")
import kernels  # noqa: E402
from kernels.attention import attention_triton  # noqa: E402


def bench(fn, reps=20):
    from triton.testing import do_bench
    return do_bench(fn, warmup=5, rep=reps * 10)          # ms


def attention_row(name, B, T, H, Hkv, D, causal):
    dt = torch.bfloat16
    q = torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=True)
    k = torch.randn(B, T, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
    v = torch.randn(B, T, Hkv, D, device="cuda", dtype=dt, requires_grad=True)
    do = torch.randn_like(q)
    # the baseline gets K/V expanded to every query head up front (outside the timing), as SDPA-flash wants
    qs = q.detach().transpose(1, 2).contiguous().requires_grad_()
    ks = k.detach().repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous().requires_grad_()
    vs = v.detach().repeat_interleave(H // Hkv, 2).transpose(1, 2).contiguous().requires_grad_()
    dos = do.transpose(1, 2).contiguous()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)

    def ours():
        return attention_triton(q, k, v, causal)

    flops = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    out = {}
    for label, fn, grad in (("sdpa", sdpa, dos), ("ours", ours, do)):
        with torch.no_grad():
            t_f = bench(fn)
        o = fn()

        def step():
            fn().backward(grad)

        t_fb = bench(step)
        del o
        out[label] = (flops / t_f / 1e9, 3.5 * flops / t_fb / 1e9)
    (sf, sfb), (of, ofb) = out["sdpa"], out["ours"]
    print(f"| {name} | {sf:.0f} | {of:.0f} | {of / sf:.2f}x | {sfb:.0f} | {ofb:.0f} | {ofb / sfb:.2f}x |")


def naive_logprobs(h, w, y):
    logits = h @ w.T                                                      # bf16 [N, V]
    return torch.log_softmax(logits.float(), -1).gather(-1, y[:, None])[:, 0]


def logprobs_row(N, d=4096, V=128320):
    dt = torch.bfloat16
    h = (torch.randn(N, d, device="cuda", dtype=dt) * 0.5).requires_grad_()
    w = (torch.randn(V, d, device="cuda", dtype=dt) * 0.02).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    res = {}
    for label, fn in (("naive", naive_logprobs), ("ours", kernels.token_logprobs)):
        def step():
            h.grad = w.grad = None
            fn(h, w, y).backward(g)

        step()
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
    (tn, mn), (to, mo) = res["naive"], res["ours"]
    flops = 2 * N * d * V * 4                                            # fwd GEMM + recompute + 2 backward GEMMs
    print(f"| N={N} | {tn:.1f} | {to:.1f} | {tn / to:.2f}x | {mn / 2**30:.2f} | {mo / 2**30:.2f} | 1/{mn / max(mo, 1):.0f} "
          f"| {flops / to / 1e9:.0f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one attention shape and N=4096 only")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__}\n")
    print("attention, bf16, TFLOP/s")
    print("| shape | SDPA fwd | ours fwd | ratio | SDPA fwd+bwd | ours fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    shapes = [("causal GQA 32/8 d128 T=1k x16", 16, 1024, 32, 8, 128, True),
              ("causal GQA 32/8 d128 T=4k x4", 4, 4096, 32, 8, 128, True),
              ("causal GQA 32/8 d128 T=8k x2", 2, 8192, 32, 8, 128, True),
              ("CLIP non-causal 16 heads d64 T=577 x28", 28, 577, 16, 16, 64, False)]
    for s in shapes[1:2] if args.quick else shapes:
        attention_row(*s)
    print("\ntoken_logprobs, bf16, d=4096, V=128320, forward+backward")
    print("| rows | naive ms | ours ms | speed | naive extra GiB | ours extra GiB | memory | ours TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for N in ([4096] if args.quick else [4096, 16384]):
        logprobs_row(N)


if __name__ == "__main__":
    main()
