"""Per-GPU memory of a training recipe, from the model's shapes alone (the meta device: no GPU, no weights).

What is counted, per GPU, under FSDP2 (train_sft.py / train_dpo.py --fsdp):
  parameters      fp32 master weights, 1/N each (the unused CLIP layer is replicated: it is not sharded)
  gradients       fp32, sharded, trained parameters only (reduce-scattered every micro-batch: never whole)
  AdamW           two fp32 moments, sharded, trained parameters only
  gathered        bf16 weights while they are in use: the root unit (embeddings, head, projector) for the whole
                  step, plus two blocks (the running one and the prefetched one)
  grad transient  the largest unit's unsharded gradients at its reduce-scatter (bf16, then fp32 for the reduction)
  activations     tensors saved for the backward, measured by running the real model on meta tensors with a
                  saved-tensor hook (the attention saving q, k, v, o and the logsumexp, as the flash kernel does;
                  the log-prob kernel its input rows), without and with --grad-checkpointing (then each block keeps
                  its input, and one block at a time is recomputed)
  reference       DPO: the frozen SFT model, bf16, sharded like the policy (0 with --precompute-ref while training)
Allocator fragmentation, NCCL buffers and the CUDA context (together typically 2-5 GiB) are not included.
`python -m bench.memory` prints the table; the trainers call check_fits() before they load a model.
"""

from contextlib import contextmanager

import torch

import kernels
from common.cli import UserError
from model import LlavaNext

# llava-hf/llama3-llava-next-8b-hf's config.json (class defaults filled in by LlavaNextConfig)
LLAMA3_LLAVA_NEXT_8B = {
    "model_type": "llava_next", "image_token_index": 128256, "projector_hidden_act": "gelu",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "tie_word_embeddings": False,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "num_key_value_heads": 8, "intermediate_size": 14336, "max_position_embeddings": 8192,
                    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "vocab_size": 128320},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768},
}
GiB = 2 ** 30


class FlashLike(torch.autograd.Function):
    """Attention as the flash kernel stores it for the backward: q, k, v, o and an fp32 logsumexp per query row."""

    @staticmethod
    def forward(ctx, q, k, v):
        o = torch.empty_like(q)
        lse = q.new_empty(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedLogProbs(torch.autograd.Function):
    """token_logprobs as the fused kernel stores it: the hidden rows, the labels and an fp32 logsumexp."""

    @staticmethod
    def forward(ctx, h, w, y):
        lse = h.new_empty(h.shape[0], dtype=torch.float32)
        ctx.save_for_backward(h, w, y, lse)
        return lse.clone()

    @staticmethod
    def backward(ctx, g):
        h, w, _, _ = ctx.saved_tensors
        return torch.empty_like(h), torch.empty_like(w), None


@contextmanager
def saved_bytes(exclude):
    """Count the bytes of every distinct storage saved for the backward (parameters excluded: FSDP re-gathers
    them in the backward). Yields a dict whose "total" grows as the forward runs."""
    seen, held, out = set(), [], {"total": 0}

    def pack(t):
        s = t.untyped_storage()
        key = s._cdata
        if key not in seen and key not in exclude:
            seen.add(key)
            out["total"] += s.nbytes()
        held.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def measure(cfg, tokens, crops, train_vision):
    """(activation bytes without checkpointing, with checkpointing) for ONE sample of `tokens` tokens whose image
    gives `crops` CLIP crops, in bf16, on the meta device."""
    with torch.device("meta"):
        model = LlavaNext(cfg).to(torch.bfloat16)
    model.freeze_unused()
    model.vision_tower.requires_grad_(train_vision)
    model.multi_modal_projector.requires_grad_(train_vision)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    real_attention, real_logprobs = kernels.attention, kernels.token_logprobs
    kernels.attention = lambda q, k, v, causal=True, **_: FlashLike.apply(q, k, v)
    kernels.token_logprobs = lambda h, w, y, ignore_index=-100: FusedLogProbs.apply(h, w, y)
    per_layer, inputs = [], []

    def pre(module, args):
        module._start = counter["total"]
        inputs.append(args[0].numel() * args[0].element_size())

    def post(module, args, out):
        per_layer.append(counter["total"] - module._start)

    hooks = [layer.register_forward_pre_hook(pre) for layer in model.language_model.layers]
    hooks += [layer.register_forward_hook(post) for layer in model.language_model.layers]
    S = cfg.vision.image_size
    try:
        with saved_bytes(params) as counter:
            pixels = torch.empty(crops, 3, S, S, device="meta", dtype=torch.bfloat16)
            feats = model.vision_tower(pixels, cfg.feature_layers, cfg.vision_feature_select_strategy)
            vision = model.multi_modal_projector(feats)
            vision_bytes = counter["total"]
            x = torch.empty(1, tokens, cfg.text.hidden_size, device="meta", dtype=torch.bfloat16,
                            requires_grad=True) + 0 * vision.sum()
            targets = torch.empty(1, tokens, dtype=torch.long, device="meta")
            model(inputs_embeds=x, targets=targets, position_ids=torch.zeros(1, tokens, dtype=torch.long,
                                                                            device="meta"))
    finally:
        kernels.attention, kernels.token_logprobs = real_attention, real_logprobs
        for h in hooks:
            h.remove()
    total = counter["total"]
    # checkpointing each CLIP and decoder block: a block keeps only its input; one is recomputed at a time
    clip_layers = max(model.vision_tower.hidden_index(i) for i in cfg.feature_layers)
    clip_input = crops * (cfg.vision.grid ** 2 + 1) * cfg.vision.hidden_size * 2
    vision_ckpt = min(vision_bytes, clip_layers * clip_input + vision_bytes / max(clip_layers, 1))
    ckpt = total - vision_bytes - sum(per_layer) + sum(inputs) + max(per_layer) + vision_ckpt
    return total, ckpt


def table(cfg, gpus, sft_samples, dpo_pairs, tokens, crops):
    with torch.device("meta"):
        model = LlavaNext(cfg)
    n = {k: sum(p.numel() for p in v) for k, v in {
        "all": model.parameters(),
        "unused": model.vision_tower.unused_parameters(cfg.feature_layers),
        "vision": model.vision_tower.parameters(),
        "projector": list(model.multi_modal_projector.parameters()) + [model.image_newline],
        "root": [p for name, p in model.named_parameters() if ".layers." not in name],
        "block": model.language_model.layers[0].parameters()}.items()}
    n["sharded"] = n["all"] - n["unused"]
    trained = {"sft": n["sharded"], "dpo": n["sharded"] - (n["vision"] - n["unused"]) - n["projector"]}
    acts = {"sft": [sft_samples * a for a in measure(cfg, tokens, crops, train_vision=True)],
            "dpo": [2 * dpo_pairs * a for a in measure(cfg, tokens, crops, train_vision=False)]}
    cols = [("SFT", "sft", False), ("DPO, live reference", "dpo", True), ("DPO, --precompute-ref", "dpo", False)]
    rows = []
    for _, kind, live in cols:
        r = {
            "parameters (fp32, sharded)": 4 * n["sharded"] / gpus + 4 * n["unused"],
            "gradients (fp32, sharded)": 4 * trained[kind] / gpus,
            "AdamW moments (fp32, sharded)": 8 * trained[kind] / gpus,
            "gathered bf16 weights (root + 2 blocks)": 2 * (n["root"] - n["unused"]) + 2 * 2 * n["block"],
            "gradient transient (largest unit, bf16 + fp32)": 6 * (n["root"] - n["unused"] - (
                n["vision"] - n["unused"] + n["projector"] if kind == "dpo" else 0)),
            "reference model (bf16, sharded)": 2 * n["sharded"] / gpus + 2 * n["unused"] if live else 0.0,
            "activations, no checkpointing": acts[kind][0],
            "activations, --grad-checkpointing": acts[kind][1],
        }
        fixed = sum(v for k, v in r.items() if not k.startswith("activations"))
        r["total, no checkpointing"] = fixed + r["activations, no checkpointing"]
        r["total, --grad-checkpointing"] = fixed + r["activations, --grad-checkpointing"]
        rows.append(r)
    head = (f"{n['all'] / 1e9:.2f}B parameters ({n['unused'] / 1e6:.0f}M in the unused CLIP layer), {gpus} GPUs; "
            f"SFT micro-batch {sft_samples} samples, DPO micro-batch {dpo_pairs} pair(s) = {2 * dpo_pairs} rows, "
            f"~{tokens:,} tokens per sample ({crops} crops)")
    lines = [head, "", "| GiB per GPU | " + " | ".join(c for c, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key in rows[0]:
        bold = key.startswith("total")
        cells = [f"{r[key] / GiB:.1f}" for r in rows]
        lines.append(f"| {'**' + key + '**' if bold else key} | "
                     + " | ".join(f"**{c}**" if bold else c for c in cells) + " |")
    return "\n".join(lines), rows


def whole_model_bytes(model, live_reference=False):
    """What every GPU holds without FSDP (one process, or DDP: each rank a whole replica), before any activation:
    fp32 weights, fp32 gradients and two fp32 AdamW moments of the trained parameters, and a live DPO reference in
    bf16. `model`: on the meta device, its trained parameters marked (requires_grad) as the run marks them."""
    n_all = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * n_all + (4 + 8) * n_trained + (2 * n_all if live_reference else 0)


def gpu_bytes(device):
    """Total memory of a CUDA device (None off CUDA)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_fits(model, fsdp, world, memory, live_reference=False):
    """Stop before loading when a run without --fsdp cannot hold its model on one GPU (`memory`: the GPU's bytes,
    None off CUDA): one line naming --fsdp and the estimate."""
    if memory is None or fsdp:
        return
    need = whole_model_bytes(model, live_reference)
    if need <= memory:
        return
    how = f"add --fsdp to shard them over the {world} processes" if world > 1 else \
        "run under torchrun with --fsdp, which shards them over the GPUs"
    raise UserError(f"without --fsdp every GPU holds the whole model: {need / GiB:.0f} GiB of fp32 weights, gradients "
                    f"and AdamW moments{' and the bf16 reference' if live_reference else ''} before any activation "
                    f"(python -m bench.memory counts them), more than this GPU's {memory / GiB:.0f} GiB: {how}")
