"""Llama decoder (Llama-3; Mistral-7B without sliding window is the same network), as transformers' modeling_llama.py.

Pre-norm blocks of grouped-query attention with rotary position embeddings and a SwiGLU MLP; RMSNorm and RoPE's
angles are computed in fp32 and cast back, as transformers does, so bf16 runs match it bit for bit where the matmuls
do. Under autocast (fp32 master weights, bf16 compute) the residual stream stays fp32 while q, k and v come out of
the projections in bf16: RoPE's cos / sin are built in that compute dtype, so every attention call gets one dtype,
the same as a bf16 model's (and an FSDP run's, whose gathered weights are bf16).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)        # weight applied after the cast back, as in transformers


def rope_inv_freq(cfg, device=None):
    """Inverse frequencies 1 / theta^(2i/D), with Llama-3.1's "llama3" long-context rescaling when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "llama3":
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated smoothly
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos, sin (B, T, D) for integer positions (B, T); angles in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()     # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)                          # (B, T, D) half-split ("NeoX") layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def compute_dtype(x):
    """The dtype the projections of x produce: the autocast dtype when autocast is on for x's device, else x's."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x, cos, sin, attn_mask=None, cu_seqlens=None, max_seqlen=None, cache=None):
        """x (B, T, C), or packed (1, N, C) with cu_seqlens. A KV cache stores k, v and does the attention itself."""
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.head_dim), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        if cache is not None:
            o = cache.attend(self.layer_idx, q, k, v)
        elif cu_seqlens is not None:
            o = kernels.attention(q[0], k[0], v[0], causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[None]
        else:
            o = kernels.attention(q, k, v, causal=True, attn_mask=attn_mask)  # (B, T, Hq, D)
        return self.o_proj(o.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cu_seqlens=None, max_seqlen=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cu_seqlens, max_seqlen, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def causal_padding_mask(attention_mask, q_len):
    """Boolean (B, 1, T, S) mask for the last T of S positions: causal, and only keys where attention_mask is 1.

    A query row with no visible key (a left-pad position) may see itself, so the softmax never divides by zero;
    such rows are padding and their outputs are never used.
    """
    B, S = attention_mask.shape
    q_pos = torch.arange(S - q_len, S, device=attention_mask.device)
    k_pos = torch.arange(S, device=attention_mask.device)
    mask = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask.bool()[:, None, :]     # (B, T, S)
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & (k_pos[None, :] == q_pos[:, None])[None])
    return mask[:, None]                                                                     # (B, 1, T, S)


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._inv_freq = None       # fp32 RoPE frequencies, made on first use (not a buffer: .to(bf16) must not touch it)
        self.grad_checkpointing = False

    def inv_freq(self, device):
        if self._inv_freq is None or self._inv_freq.device != device:
            self._inv_freq = rope_inv_freq(self.cfg, device="cpu").to(device)   # same values whatever the device
        return self._inv_freq

    def forward(self, x, position_ids, attention_mask=None, cu_seqlens=None, max_seqlen=None, cache=None):
        """Input embeddings x (B, T, C) -> final normed hidden states (B, T, C).

        attention_mask (B, T) marks real tokens (None: all real, no mask is built). cu_seqlens: packed sequences in
        a (1, N, C) batch. cache: a KV cache (model/generation.py), which masks and attends by itself.
        """
        cos, sin = rope_cos_sin(self.inv_freq(x.device), position_ids, compute_dtype(x))
        attn_mask = None
        if cu_seqlens is None and cache is None and attention_mask is not None:
            attn_mask = causal_padding_mask(attention_mask, x.shape[1])
        for layer in self.layers:
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn_mask, cu_seqlens, max_seqlen, cache,
                                                      use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn_mask, cu_seqlens, max_seqlen, cache)
        return self.norm(x)
