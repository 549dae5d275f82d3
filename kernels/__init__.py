"""Kernels: fused attention and fused log-prob gathering, each with a plain-torch path beside it.

Which implementation runs is decided at call time by the environment variable LLAVA_KERNELS:
  unset / "auto"  Triton on CUDA tensors, plain torch elsewhere
  "ref"           always plain torch (attention: torch SDPA; token_logprobs: the chunked torch path)
  "triton"        always Triton, on any tensor: under TRITON_INTERPRET=1 the real kernels run on CPU tensors,
                  which is how the tests (and anyone auditing them) exercise them without a GPU
The choice is announced once per op on stderr; a fallback (Triton missing, a head dim it does not support) is
announced loudly. On CUDA each kernel picks its tiles among a few configs by timing them on its first large call
(kernels/tuning.py; cached in ~/.cache/llava-reasoner/kernel-tune.json); LLAVA_KERNELS_TUNE=0 takes the first
config without timing.
"""

import os
import sys

import torch

from kernels.attention import attention_ref, attention_triton
from kernels.attention import triton as _triton
from kernels.logprobs import ChunkedLogProbs, TritonLogProbs, token_logprobs_ref

__all__ = ["attention", "token_logprobs", "attention_ref", "token_logprobs_ref", "backend"]

_announced = set()


def announce(msg):
    """Print a message once per process, on stderr (under torchrun by rank 0 only: every rank makes the same choice)."""
    if msg not in _announced:
        _announced.add(msg)
        if os.environ.get("RANK", "0") == "0":
            print(f"[kernels] {msg}", file=sys.stderr)


def backend(x):
    """'triton' or 'ref' for an op on tensor x, from LLAVA_KERNELS and the tensor's device."""
    choice = os.environ.get("LLAVA_KERNELS", "auto").lower()
    if choice not in ("auto", "ref", "triton"):
        raise ValueError(f"LLAVA_KERNELS={choice!r}: expected 'ref', 'triton' or 'auto'")
    want = choice if choice != "auto" else ("triton" if x.is_cuda else "ref")
    if want == "triton" and _triton is None:
        announce("WARNING: Triton is not installed: using the plain-torch paths (slower, more memory). "
                 "pip install triton")
        return "ref"
    if want == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("LLAVA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return want


def attention(q, k, v, causal=True, cu_seqlens=None, max_seqlen=None, attn_mask=None):
    """Scaled dot-product attention, softmax(q k^T / sqrt(D)) v, with grouped-query heads.

    Padded: q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq % Hkv == 0. Varlen (packed): q [N, Hq, D], k/v [N, Hkv, D]
    and cu_seqlens int32 [nseq + 1] (sequence i is rows cu[i]:cu[i+1]; no attention across sequences).
    attn_mask (bool, True = attend; padding and KV caches) always takes the torch path.
    """
    if attn_mask is None and backend(q) == "triton":
        D = q.shape[-1]
        if 16 <= D <= 128 and q.dtype in (torch.float16, torch.bfloat16, torch.float32):
            announce(f"attention: Triton kernels ({q.device.type})")
            return attention_triton(q, k, v, causal, cu_seqlens, max_seqlen)
        announce(f"WARNING: attention: head dim {D} / {q.dtype} is outside the Triton kernel's range (16..128, "
                 "fp16/bf16/fp32): using torch SDPA")
    elif attn_mask is None:
        announce(f"attention: torch SDPA ({q.device.type})")
    return attention_ref(q, k, v, causal=causal, cu_seqlens=cu_seqlens, attn_mask=attn_mask)


def token_logprobs(hidden, weight, labels, ignore_index=-100):
    """log p(label) per row, fused with the [V, d] output projection; the [N, V] logits never exist.

    hidden [N, d], weight [V, d], labels [N] -> fp32 [N], 0 where label == ignore_index. Differentiable in hidden
    and weight for any per-row upstream gradient. Ignored rows are dropped before any matmul.
    """
    N, V = hidden.shape[0], weight.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"token_logprobs: labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    keep = labels != ignore_index
    idx = keep.nonzero()[:, 0]
    out = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    if idx.numel() == 0:
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            # zero gradients, but both tensors stay in the graph (a DDP rank with nothing to learn must still sync)
            out = out + 0.0 * (hidden.sum() + weight.sum()).float()
        return out
    y = labels.index_select(0, idx)
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= V:
        raise ValueError(f"token_logprobs: labels must lie in [0, {V}) or equal ignore_index {ignore_index}; "
                         f"found {lo if lo < 0 else hi}")
    h = hidden if idx.numel() == N else hidden.index_select(0, idx)
    if backend(hidden) == "triton":
        announce(f"token_logprobs: Triton kernels ({hidden.device.type})")
        lp = TritonLogProbs.apply(h, weight, y)
    else:
        announce(f"token_logprobs: chunked torch path ({hidden.device.type})")
        lp = ChunkedLogProbs.apply(h, weight, y)
    return lp if idx.numel() == N else out.index_copy(0, idx, lp)
