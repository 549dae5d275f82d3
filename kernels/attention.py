"""Attention: O = softmax(Q K^T / sqrt(D) + mask) V, per head, grouped-query (query head h reads KV head h // G).

The reference below is the spec: torch's scaled_dot_product_attention, one call per packed sequence for varlen.
"""

import torch
import torch.nn.functional as F


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
