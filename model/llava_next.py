"""LLaVA-NeXT (llava-v1.6): CLIP tower -> 2-layer MLP projector -> anyres packing -> Llama (modeling_llava_next.py).

Images are cut into crops (processor), every crop goes through CLIP, every patch feature through the projector;
then each image's crop features are stitched into one map, unpadded, given a newline vector per row, and placed
after the squashed base image's features. Those rows replace the image tokens of input_ids, in order.
"""

import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from model.anyres import grid_shape, num_crops, unpadded_shape
from model.clip import CLIPVisionTower, activation
from model.config import LlavaNextConfig
from model.generation import generate
from model.llama import Llama
from model.weights import TO_HUB, load_state_dict, rename, save_state_dict


class Projector(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        vision_dim = cfg.vision.hidden_size * len(cfg.feature_layers)    # list form concatenates layers
        bias = cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision_dim, cfg.text.hidden_size, bias=bias)
        self.act = activation(cfg.projector_hidden_act)
        self.linear_2 = nn.Linear(cfg.text.hidden_size, cfg.text.hidden_size, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaNext(nn.Module):
    def __init__(self, config: LlavaNextConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = Projector(config)
        self.image_newline = nn.Parameter(torch.empty(config.text.hidden_size))
        self.language_model = Llama(config.text)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        # where generation stops by default: generation_config.json's eos ids when the checkpoint has one
        eos = config.text.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])

    @property
    def output_weight(self):
        """The [V, C] unembedding matrix (the input embedding when the config ties them)."""
        if self.config.tie_word_embeddings:
            return self.language_model.embed_tokens.weight
        return self.lm_head.weight

    # ------------------------------------------------------------------------------------------------ images
    def encode_images(self, pixel_values, image_sizes):
        """pixel_values (n_images, P, 3, S, S) or the crops already concatenated (sum P_i, 3, S, S); image_sizes
        (n_images, 2) as (H, W). Returns one (n_tokens_i, C) feature tensor per image."""
        cfg = self.config
        sizes = [tuple(s) for s in torch.as_tensor(image_sizes).tolist()]
        crops = [num_crops(s, cfg.image_grid_pinpoints, cfg.vision.image_size) for s in sizes]
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(sizes):
                raise ValueError(f"pixel_values holds {pixel_values.shape[0]} images but image_sizes {len(sizes)}")
            for i, (n, s) in enumerate(zip(crops, sizes)):
                if pixel_values.shape[1] < n:
                    raise ValueError(f"image {i} of size {s} needs {n} crops but pixel_values has "
                                     f"{pixel_values.shape[1]} per image")
            pixel_values = torch.cat([pv[:n] for pv, n in zip(pixel_values, crops)])
        elif pixel_values.dim() != 4 or pixel_values.shape[0] != sum(crops):
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} does not hold the {sum(crops)} crops "
                             f"that image_sizes {sizes} need")
        feats = self.vision_tower(pixel_values, cfg.feature_layers, cfg.vision_feature_select_strategy)
        feats = self.multi_modal_projector(feats)                      # (sum P, g*g, C)
        return [self.pack(f, s) for f, s in zip(feats.split(crops), sizes)]

    def pack(self, feats, size):
        """Crop features (P, g*g, C) of one image -> (base g*g + h' * (w'+1), C)."""
        cfg, g = self.config, self.config.vision.grid
        if cfg.vision_feature_select_strategy != "default":
            raise NotImplementedError("vision_feature_select_strategy='full' keeps the CLS token, which does not fit "
                                      "the anyres crop grid (transformers' LlavaNext fails on it too)")
        rows, cols = grid_shape(size, cfg.image_grid_pinpoints, cfg.vision.image_size)
        base, grid = feats[0], feats[1:]
        C = grid.shape[-1]
        grid = grid.view(rows, cols, g, g, C).permute(4, 0, 2, 1, 3)  # (C, rows, g, cols, g)
        grid = grid.reshape(C, rows * g, cols * g)                    # one feature map over the whole padded image
        top, bottom, left, right = unpadded_shape(size, rows * g, cols * g)
        grid = grid[:, top:bottom, left:right]                        # cut the resize padding away
        newline = self.image_newline[:, None, None].expand(C, grid.shape[1], 1).to(grid.dtype)
        grid = torch.cat([grid, newline], dim=-1)                     # (C, h', w'+1): a newline ends every row
        # the base (whole-image) features come first: the model sees the overview, then the detail
        return torch.cat([base, grid.flatten(1).t()], dim=0)

    def embed(self, input_ids, pixel_values=None, image_sizes=None, image_features=None, image_repeat=1):
        """Token embeddings with image features scattered into the image-token slots, in order. image_repeat=k: the
        batch is k blocks that share the images (DPO's chosen and rejected rows): each image is encoded once."""
        is_image = input_ids == self.config.image_token_index
        # the image token may lie outside the vocabulary (original LLaVA checkpoints): its rows are replaced anyway
        x = self.language_model.embed_tokens(input_ids.masked_fill(is_image, 0))
        if image_features is None and pixel_values is not None and len(pixel_values) > 0:
            image_features = self.encode_images(pixel_values, image_sizes)
        if image_features and image_repeat > 1:
            image_features = list(image_features) * image_repeat
        n_feats = sum(f.shape[0] for f in image_features) if image_features else 0
        how = "; expand each <image> to Processor.num_image_tokens(H, W) tokens, in the order of the images"
        if input_ids.device.type == "cpu":
            n_tokens = int(is_image.sum())
            if n_tokens != n_feats:
                raise ValueError(f"input_ids hold {n_tokens} image tokens (id {self.config.image_token_index}) but "
                                 f"the images give {n_feats} features{how}")
        elif input_ids.device.type == "cuda":                  # checked on the GPU: reading the count would sync
            torch._assert_async(is_image.sum() == n_feats, f"input_ids hold a number of image tokens (id "
                                f"{self.config.image_token_index}) other than the images' {n_feats} features{how}")
        if n_feats:
            feats = torch.cat(image_features).to(x.dtype)
            x = x.masked_scatter(is_image[..., None], feats)
        return x

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                cu_seqlens=None, max_seqlen=None, cache=None, image_features=None, inputs_embeds=None,
                return_hidden=False, targets=None, target_rows=None, keep_vision_in_graph=False, image_repeat=1):
        """input_ids (B, T) -> logits (B, T, V); or the final normed hidden states (B, T, C) with return_hidden; or,
        given targets (B, T) (the next token at each position, -100 where not trained), fp32 log p(target) per
        position (0 where ignored) through kernels.token_logprobs, so the [B, T, V] logits never exist. Training
        calls this inside the (DDP / FSDP-wrapped) forward, where an FSDP-sharded head is whole. target_rows: the
        flat indices (into B * T) of the trained positions, when the batch knows them (data/collate.py): then
        nothing in the forward waits on the GPU.

        attention_mask (B, T) marks real tokens; positions follow it, so left- and right-padded batches give each
        sample what it gets alone. cu_seqlens packs several samples in one row. A KV cache (generation) brings its
        own mask; position_ids must then be given. inputs_embeds replaces input_ids (already embedded tokens).
        keep_vision_in_graph: a batch without images still runs the vision tower on one blank crop at weight 0, so
        that every process runs the same modules in every forward: a sharded (FSDP) tower is gathered by all ranks
        together, and a trained one joins every gradient reduction (DDP and FSDP would wait for it otherwise).
        image_repeat: the rows form that many blocks sharing the images, which are encoded once (see embed).
        """
        x = inputs_embeds if inputs_embeds is not None else self.embed(input_ids, pixel_values, image_sizes,
                                                                        image_features, image_repeat)
        B, T = x.shape[:2]
        if position_ids is None:
            if cache is not None:
                raise ValueError("forward with a KV cache needs explicit position_ids")
            position_ids = positions(B, T, attention_mask, cu_seqlens, x.device)
        if attention_mask is not None and cu_seqlens is None and cache is None and attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids {(B, T)}")
        if keep_vision_in_graph and (pixel_values is None or len(pixel_values) == 0) and image_features is None:
            S = self.config.vision.image_size
            blank = torch.zeros(1, 3, S, S, device=x.device, dtype=x.dtype)
            f = self.multi_modal_projector(self.vision_tower(blank, self.config.feature_layers,
                                                             self.config.vision_feature_select_strategy))
            x = x + 0.0 * (f.sum() + self.image_newline.sum()).to(x.dtype)
        h = self.language_model(x, position_ids, attention_mask, cu_seqlens, max_seqlen, cache)
        if targets is None:
            return h if return_hidden else F.linear(h, self.output_weight)
        w = self.output_weight
        autocast = h.device.type != "meta" and torch.is_autocast_enabled(h.device.type)     # (meta: shape runs)
        dtype = torch.get_autocast_dtype(h.device.type) if autocast else h.dtype
        lp = kernels.token_logprobs(h.reshape(B * T, -1).to(dtype), w.to(dtype), targets.reshape(-1),
                                    rows=target_rows)
        return lp.view(B, T).clone()      # not a view: FSDP2 warns about views returned by a sharded module

    def set_grad_checkpointing(self, enabled=True):
        """Recompute each block's activations in the backward (both towers): memory for compute."""
        self.vision_tower.grad_checkpointing = enabled
        self.language_model.grad_checkpointing = enabled

    def generate(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, **kwargs):
        """Batched decoding with a KV cache; see model.generation.generate for the arguments."""
        return generate(self, input_ids, pixel_values, image_sizes, attention_mask, **kwargs)

    # ------------------------------------------------------------------------------------------------ weights
    @classmethod
    def from_config(cls, config, dtype=torch.float32, device="cpu", seed=0):
        """A randomly initialised model (tests, the tiny demo base)."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights(seed)
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face LLaVA-NeXT directory (any supported key layout; single or sharded safetensors).

        The model is built on the meta device and its parameters assigned from the files one tensor at a time, so
        peak memory stays near one copy of the weights.
        """
        model = cls.empty(path)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        state, _ = load_state_dict(path, expected, dtype, device, optional=model.optional_weights())
        model.load_state_dict(state, strict=True, assign=True)
        model.freeze_unused()
        return model

    @classmethod
    def empty(cls, path, dtype=None):
        """The model of a Hugging Face directory on the meta device: its config and generation settings, no weights.
        from_pretrained fills it; a sharded training run shards it first, then each process reads only its shards."""
        config_path = os.path.join(path, "config.json") if os.path.isdir(path) else None
        if config_path is None or not os.path.exists(config_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model directory)")
        config = LlavaNextConfig.from_json(config_path)
        with torch.device("meta"):
            model = cls(config)
        if dtype is not None:
            model.to(dtype)
        gen_config = os.path.join(path, "generation_config.json")
        if os.path.exists(gen_config):
            with open(gen_config) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                model.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        model.freeze_unused()
        return model

    def optional_weights(self):
        """Weights a checkpoint may lack: the head, when the config ties it to the embedding."""
        return {"lm_head.weight"} if self.config.tie_word_embeddings else set()

    def freeze_unused(self):
        """CLIP layers past the selected feature layer and post_layernorm never get gradients: mark them so, which
        keeps DDP from waiting on them and optimizers from holding state for them."""
        for p in self.vision_tower.unused_parameters(self.config.feature_layers):
            p.requires_grad_(False)

    def save_pretrained(self, path, max_shard_size="5GB", dtype=None, state_dict=None, write=True):
        """Write config.json and safetensors in the llava-hf Hub layout (what transformers and vLLM load).

        dtype: cast floating tensors on the way out (bf16 checkpoints from fp32 training), one tensor at a time.
        state_dict: our-named tensors to write instead of this module's own, or fetch callables with a `.meta`
        (shape, dtype) that make each tensor when it is due (see model.weights.save_state_dict: an FSDP run gathers
        one parameter at a time; every process calls this, only the one with write=True writes)."""
        state = state_dict if state_dict is not None else self.state_dict()

        def cast(v):
            shape, src = v.meta if callable(v) else (tuple(v.shape), v.dtype)
            out = dtype if dtype is not None and src.is_floating_point else src
            if out == src and not callable(v):
                return v

            def fetch():
                t = v() if callable(v) else v
                return t.to(out)
            fetch.meta = (shape, out)
            return fetch
        state = {rename(k, TO_HUB): cast(v) for k, v in state.items()}
        if write:
            os.makedirs(path, exist_ok=True)
        save_state_dict(state, path, max_shard_size, write=write)
        if not write:
            return
        self.save_config(path, next(d for d in (v.meta[1] if callable(v) else v.dtype for v in state.values())
                                    if d.is_floating_point))

    def save_config(self, path, dtype):
        """config.json (with the weights' dtype) and generation_config.json (the eos ids generation stops at)."""
        self.config.save_json(os.path.join(path, "config.json"), dtype=dtype)
        if self.eos_token_ids:
            with open(os.path.join(path, "generation_config.json"), "w") as f:
                json.dump({"bos_token_id": self.config.text.bos_token_id, "eos_token_id": self.eos_token_ids}, f)

    @torch.no_grad()
    def init_weights(self, seed=0):
        """Normal(0, 0.02) weights, zero biases, unit norms; the newline and CLS vectors at the embedding scale."""
        g = torch.Generator(device="cpu").manual_seed(seed)

        def normal_(t, std):
            t.copy_(torch.randn(t.shape, generator=g) * std)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                normal_(m.weight, 0.02)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif hasattr(m, "weight") and type(m).__name__ == "RMSNorm":
                m.weight.fill_(1.0)
        normal_(self.image_newline, self.config.text.hidden_size ** -0.5)
        normal_(self.vision_tower.embeddings.class_embedding, self.config.vision.hidden_size ** -0.5)
        self.freeze_unused()


def positions(B, T, attention_mask, cu_seqlens, device):
    """RoPE positions: restart per packed sequence; count only real tokens under a padding mask."""
    if cu_seqlens is not None:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths, output_size=T)     # (no sync: T is known)
        return (torch.arange(T, device=device) - starts)[None]
    if attention_mask is not None:
        mask = attention_mask.long()
        return torch.where(mask.bool(), mask.cumsum(-1) - 1, torch.arange(T, device=device)[None])
    return torch.arange(T, device=device)[None].expand(B, T)
