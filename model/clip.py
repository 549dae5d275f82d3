"""CLIP ViT vision tower, as LLaVA uses it (transformers' modeling_clip.py, CLIPVisionModel).

Pre-LN transformer over [CLS] + patch tokens, with learned absolute position embeddings and a LayerNorm
("pre_layrnorm", sic) before the first layer. LLaVA reads the hidden state of an inner layer (-2 by default: the
penultimate layer's output), so the layers after it and post_layernorm never touch its outputs and are not run.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACT = {"quick_gelu": quick_gelu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
       "relu": F.relu, "silu": F.silu}


def activation(name):
    if name not in ACT:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(ACT)}")
    return ACT[name]


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=False)
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.hidden_size)

    def forward(self, pixel_values):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))    # (N, C, g, g)
        x = x.flatten(2).transpose(1, 2)                                                # (N, g*g, C) row-major
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight              # (N, 1+g*g, C)


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        N, T, C = x.shape
        q, k, v = (p(x).view(N, T, self.n_head, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = kernels.attention(q, k, v, causal=False)                                    # (N, T, H, D)
        return self.out_proj(o.reshape(N, T, C))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)   # loaded and saved, unused
        self.grad_checkpointing = False

    def hidden_index(self, layer):
        """Index into the hidden-state list [embeddings, layer 0 out, ..., layer L-1 out] (Python-style negatives)."""
        return layer if layer >= 0 else self.cfg.num_hidden_layers + 1 + layer

    def forward(self, pixel_values, feature_layers=(-2,), strategy="default"):
        """pixel_values (N, 3, S, S) -> features (N, tokens, C * len(feature_layers)).

        hidden state 0 is the embeddings after pre_layrnorm and hidden state i the output of layer i-1, as in
        transformers' `hidden_states`; the list form of feature_layers concatenates several along channels.
        "default" drops the CLS token (LLaVA's "patch" features), "full" keeps it.
        """
        wanted = [self.hidden_index(i) for i in feature_layers]
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(wanted)]):
            if self.grad_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            states[i + 1] = x
        feats = torch.cat([states[i] for i in wanted], dim=-1)
        return feats[:, 1:] if strategy == "default" else feats

    def unused_parameters(self, feature_layers):
        """Parameters that never reach LLaVA's outputs: layers past the deepest selected one, and post_layernorm."""
        deepest = max(self.hidden_index(i) for i in feature_layers)
        for layer in self.encoder.layers[deepest:]:
            yield from layer.parameters()
        yield from self.post_layernorm.parameters()
