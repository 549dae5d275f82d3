"""Kernels: fused attention and fused log-prob gathering, each with a plain-torch path beside it.

Which implementation runs is decided at call time by the environment variable LLAVA_KERNELS:
  unset / "auto"  plain torch on the CPU. On CUDA, per shape class (head dim, causal, dtype, packed, a length
                  bucket, training or inference): the first call runs both paths on its real tensors, forward and
                  backward, and keeps Triton only where it compiled, ran and was at least as fast as torch's (SDPA
                  for attention, the chunked path for log-probs); the choice is printed and cached per GPU, torch,
                  Triton and kernel version (kernels/tuning.py). A Triton launch that fails later falls back to
                  torch with one loud line, and its class stays on torch: the run goes on.
  "ref"           always plain torch (attention: torch SDPA; token_logprobs: the chunked torch path)
  "triton"        always Triton, on any tensor, errors raised: under TRITON_INTERPRET=1 the real kernels run on CPU
                  tensors, which is how the tests (and anyone auditing them) exercise them without a GPU
Each op takes one dtype: under autocast its inputs are cast to the autocast dtype (as SDPA is), outside it mixed
dtypes are an error. The choice is announced once per op on stderr; a fallback is announced loudly. On CUDA each
Triton kernel also picks its tiles among a few configs by timing them on its first large call (kernels/tuning.py);
LLAVA_KERNELS_TUNE=0 takes the first config and the Triton path without timing either.
"""

import os
import sys

import torch

from kernels import tuning
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


def mode():
    choice = os.environ.get("LLAVA_KERNELS", "auto").lower()
    if choice not in ("auto", "ref", "triton"):
        raise ValueError(f"LLAVA_KERNELS={choice!r}: expected 'ref', 'triton' or 'auto'")
    return choice


def backend(x):
    """'triton' or 'ref' for an op on tensor x, from LLAVA_KERNELS and the tensor's device (before any timing:
    under auto a CUDA tensor is a Triton candidate, which the op then times against torch)."""
    choice = mode()
    want = choice if choice != "auto" else ("triton" if x.is_cuda else "ref")
    if want == "triton" and _triton is None:
        announce("WARNING: Triton is not installed: using the plain-torch paths (slower, more memory). "
                 "pip install triton")
        return "ref"
    if want == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("LLAVA_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)")
    return want


def one_dtype(*xs):
    """The tensors in one dtype: the autocast dtype when autocast is on for their device (the cast SDPA gets from
    autocast, which a custom kernel does not), else their own, which must then agree."""
    dev = xs[0].device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return tuple(x if x.dtype == dt else x.to(dt) for x in xs)
    if len({x.dtype for x in xs}) > 1:
        raise ValueError(f"kernels: inputs of mixed dtypes ({', '.join(str(x.dtype) for x in xs)}); cast them to one "
                         "dtype, or run under torch.autocast")
    return xs


def _timed(key, x, run_triton, run_torch, grads):
    """Under auto on CUDA: 'triton' or 'torch' for this shape class (tuning.prefer: both timed once, on detached
    clones of the real inputs, forward and backward when training). The timing graphs keep their own saved tensors
    (identity hooks on top of any checkpointing's), so a call inside torch.utils.checkpoint times cleanly too."""
    if os.environ.get("LLAVA_KERNELS_TUNE", "1") == "0":
        return "triton"

    def timed(run):
        def go():
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                ins = [t.detach().requires_grad_(g) for t, g in zip(x, grads)]
                out = run(*ins)
                if any(grads):
                    torch.autograd.grad(out, [t for t in ins if t.requires_grad], torch.ones_like(out))
        return go
    return tuning.prefer(key, timed(run_triton), timed(run_torch), device=x[0].device)


def attention(q, k, v, causal=True, cu_seqlens=None, max_seqlen=None, attn_mask=None):
    """Scaled dot-product attention, softmax(q k^T / sqrt(D)) v, with grouped-query heads.

    Padded: q [B, T, Hq, D], k/v [B, T, Hkv, D] with Hq % Hkv == 0. Varlen (packed): q [N, Hq, D], k/v [N, Hkv, D]
    and cu_seqlens int32 [nseq + 1] (sequence i is rows cu[i]:cu[i+1]; no attention across sequences), max_seqlen
    the longest sequence (a host int: without it the torch path reads it from the GPU). attn_mask (bool, True =
    attend; padding and KV caches) always takes the torch path.
    """
    q, k, v = one_dtype(q, k, v)

    def torch_path(q, k, v):
        return attention_ref(q, k, v, causal=causal, cu_seqlens=cu_seqlens, attn_mask=attn_mask,
                             max_seqlen=max_seqlen)

    if attn_mask is not None or backend(q) == "ref":
        announce(f"attention: torch SDPA ({q.device.type})")
        return torch_path(q, k, v)
    D = q.shape[-1]
    if not (16 <= D <= 128 and q.dtype in (torch.float16, torch.bfloat16, torch.float32)):
        announce(f"WARNING: attention: head dim {D} / {q.dtype} is outside the Triton kernel's range (16..128, "
                 "fp16/bf16/fp32): using torch SDPA")
        return torch_path(q, k, v)

    if mode() == "triton":
        announce(f"attention: Triton kernels ({q.device.type})")
        return attention_triton(q, k, v, causal, cu_seqlens, max_seqlen)
    if cu_seqlens is None:
        length = q.shape[1]
    else:
        length = max_seqlen if max_seqlen is not None else q.shape[0]
    train = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    key = ("attention", D, bool(causal), str(q.dtype)[6:], cu_seqlens is not None, tuning.bucket(length),
           "train" if train else "infer")

    def triton_path(q, k, v, fallback=None):
        return attention_triton(q, k, v, causal, cu_seqlens, max_seqlen, fallback)

    if _timed(key, (q, k, v), triton_path, torch_path, [x.requires_grad and train for x in (q, k, v)]) == "triton":
        announce(f"attention: Triton kernels ({q.device.type}; timed against SDPA per shape class)")
        try:
            return triton_path(q, k, v, fallback=key)        # its backward falls back to torch by itself
        except Exception as e:                                 # noqa: BLE001 - a failed compile or launch
            tuning.demote(key, e, q.device)
    return torch_path(q, k, v)


def token_logprobs(hidden, weight, labels, ignore_index=-100, rows=None):
    """log p(label) per row, fused with the [V, d] output projection; the [N, V] logits never exist.

    hidden [N, d], weight [V, d], labels [N] -> fp32 [N], 0 where label == ignore_index. Differentiable in hidden
    and weight for any per-row upstream gradient. Ignored rows are dropped before any matmul. rows: the indices of
    the rows whose label is not ignore_index, when the caller knows them on the host already (a collated batch):
    then nothing here waits on the GPU (finding them, and checking the labels' range, would).
    """
    hidden, weight = one_dtype(hidden, weight)
    N, V = hidden.shape[0], weight.shape[0]
    if labels.shape != (N,):
        raise ValueError(f"token_logprobs: labels {tuple(labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if rows is None:
        rows = (labels != ignore_index).nonzero()[:, 0]            # a device-to-host sync on a GPU
    out = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    if rows.numel() == 0:
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            # zero gradients, but both tensors stay in the graph (a DDP rank with nothing to learn must still sync)
            out = out + 0.0 * (hidden.sum() + weight.sum()).float()
        return out
    y = labels.index_select(0, rows)
    if y.device.type == "cpu":                                  # the range check costs a sync elsewhere: CPU only
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= V:
            raise ValueError(f"token_logprobs: labels must lie in [0, {V}) or equal ignore_index {ignore_index}; "
                             f"found {lo if lo < 0 else hi}")
    h = hidden if rows.numel() == N else hidden.index_select(0, rows)
    lp = _logprobs(h, weight, y)
    return lp if rows.numel() == N else out.index_copy(0, rows, lp)


def _logprobs(h, w, y):
    """The fused log-probs of compacted rows through the path LLAVA_KERNELS picks (timed under auto on CUDA)."""
    if backend(h) == "ref":
        announce(f"token_logprobs: chunked torch path ({h.device.type})")
        return ChunkedLogProbs.apply(h, w, y)
    if mode() == "triton":
        announce(f"token_logprobs: Triton kernels ({h.device.type})")
        return TritonLogProbs.apply(h, w, y)
    train = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad)
    key = ("token_logprobs", h.shape[1], tuning.bucket(w.shape[0]), str(h.dtype)[6:], tuning.bucket(h.shape[0]),
           "train" if train else "infer")
    path = _timed(key, (h, w), lambda h, w: TritonLogProbs.apply(h, w, y), lambda h, w: ChunkedLogProbs.apply(h, w, y),
                  [h.requires_grad and train, w.requires_grad and train])
    if path == "triton":
        announce(f"token_logprobs: Triton kernels ({h.device.type}; timed against the chunked path per shape class)")
        try:
            return TritonLogProbs.apply(h, w, y, key)          # its backward falls back to torch by itself
        except Exception as e:                                 # noqa: BLE001 - a failed compile or launch
            tuning.demote(key, e, h.device)
    return ChunkedLogProbs.apply(h, w, y)
