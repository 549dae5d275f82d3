"""SFT training throughput: our training step vs transformers' LlavaNext forward+backward+AdamW, same weights and
batch, measured alternately in one run.

    python bench/sft_speed.py [--reps 4]                 # CPU: ratio of tokens/s (goal >= 1.0)
    python bench/sft_speed.py --gpu [--steps 10]         # one GPU: a ~1B LLaVA-NeXT, bf16, packed: tok/s and MFU

CPU: the 61M-parameter config of bench/model_speed.py, 2 samples x 1,310 tokens (one 2x2-grid image each) with
the loss on the last 96 tokens of each, as in VLM SFT where image and prompt tokens are not trained. Ours: the
loss through kernels.token_logprobs (ignored rows dropped before the lm_head). transformers: forward(labels=...).
GPU: CLIP-L/336 + four Llama-3-8B-shaped layers (1.5B parameters), 4 packed samples of 3,528 tokens (one 2x2-grid
image each, loss on the text), single GPU, bf16 autocast, fused AdamW. MFU counts the model's useful FLOPs (see
step_bench) against the GPU's dense bf16 peak (goal >= 40%).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.model_speed import CONFIG, make_batch  # noqa: E402
from common.metrics import peak_flops  # noqa: E402
from model import LlavaNext, LlavaNextConfig  # noqa: E402
from model.anyres import num_crops, num_image_tokens  # noqa: E402


def cpu(args):
    from transformers import LlavaNextConfig as HFConfig, LlavaNextForConditionalGeneration
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(HFConfig(**CONFIG))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlavaNext.from_pretrained(d)
    hf.train(), ours.train()
    ids, px, sizes = make_batch(ours.config)
    labels = torch.full_like(ids, -100)
    labels[:, -96:] = ids[:, -96:]
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    opt_hf = torch.optim.AdamW([p for p in hf.parameters() if p.requires_grad], lr=1e-5)
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)

    def step_hf():
        hf(input_ids=ids, pixel_values=px, image_sizes=sizes, labels=labels).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    def step_ours():
        lp = ours(ids, px, sizes, targets=targets)
        (-lp.sum() / (targets != -100).sum()).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    step_hf(), step_ours()
    t_hf, t_ours = [], []
    for _ in range(args.reps):
        for fn, ts in ((step_hf, t_hf), (step_ours, t_ours)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    a, b = statistics.median(t_hf), statistics.median(t_ours)
    n = ids.numel()
    print(f"SFT step, {ids.shape[0]} x {ids.shape[1]} tokens ({(targets != -100).sum()} supervised), "
          f"{args.threads} threads: transformers {n / a:,.0f} tok/s | ours {n / b:,.0f} tok/s | {a / b:.2f}x "
          "(goal >= 1.0)")


# CLIP-L/336 and four Llama-3-8B-shaped layers (d 4096, MLP 14336, GQA 32/8, head dim 128): 1.0B parameters in the
# language model, 1.5B in all; big enough that every matmul runs at full speed, small enough for one GPU with AdamW
GPU_CONFIG = dict(
    model_type="llava_next", image_token_index=32000,
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=32064, max_position_embeddings=8192, rope_theta=500000.0))
# the same code path at toy size on the CPU (bench/gpu_check.py --dry)
TINY_CONFIG = dict(
    model_type="llava_next", image_token_index=500, image_grid_pinpoints=[[64, 64]],
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=32, patch_size=16),
    text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512))


def step_bench(config=GPU_CONFIG, samples=4, text=600, steps=10, device="cuda"):
    """Time a packed SFT step (bf16 autocast on CUDA, fused AdamW) and count its useful FLOPs.

    Each sample: 20 text tokens, one 2x2-grid image (5 crops), `text` - 20 more text tokens; loss on the text.
    FLOPs (x3 for forward+backward, 2 per multiply-add): the language model's matmuls on every token, the lm_head
    only on supervised rows (kernels.token_logprobs drops the rest), the vision tower on every patch, and causal
    attention within each sample (half of Q K^T and P V). Returns a dict of figures."""
    dev = torch.device(device)
    cfg = LlavaNextConfig.from_dict(config)
    model = LlavaNext.from_config(cfg, device=dev)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=dev.type == "cuda")
    g = torch.Generator().manual_seed(0)
    S, img = cfg.vision.image_size, cfg.image_token_index
    size = (2 * S, 2 * S)
    n_img = num_image_tokens(size, cfg.image_grid_pinpoints, S, cfg.vision.grid)
    crops = num_crops(size, cfg.image_grid_pinpoints, S)
    seqs = []
    for _ in range(samples):
        t = torch.randint(0, img, (text,), generator=g)
        seqs.append(torch.cat([t[:20], torch.full((n_img,), img), t[20:]]))
    lens = [len(x) for x in seqs]
    ids = torch.cat(seqs)[None].to(dev)
    targets = torch.where(ids == img, -100, ids.roll(-1, 1))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    targets[0, cu[1:].long() - 1] = -100                             # no target across a sample boundary
    px = torch.randn(samples * crops, 3, S, S, generator=g).to(dev)
    sizes = torch.tensor([size] * samples)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with ctx:
            lp = model(ids, px, sizes, cu_seqlens=cu, max_seqlen=max(lens), targets=targets)
        (-lp.sum() / (targets != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(2 if dev.type == "cuda" else 1):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t) / steps
    tc, vc = cfg.text, cfg.vision
    params = dict(model.named_parameters())
    n_head = tc.vocab_size * tc.hidden_size                         # the lm_head, tied to the embedding or not
    n_vision = sum(p.numel() for n, p in params.items() if n.startswith(("vision_tower", "multi_modal_projector")))
    n_text = sum(p.numel() for n, p in params.items() if n.startswith("language_model") and "embed_tokens" not in n)
    tokens, supervised = ids.numel(), int((targets != -100).sum())
    patches = samples * crops * (vc.grid ** 2 + 1)
    attn = 6 * tc.num_hidden_layers * tc.num_attention_heads * tc.head_dim * sum(x * x for x in lens) + \
        12 * vc.num_hidden_layers * vc.hidden_size * samples * crops * (vc.grid ** 2 + 1) ** 2
    flops = 6 * (n_text * tokens + n_head * supervised + n_vision * patches) + attn
    peak = peak_flops(dev)
    return dict(ms=dt * 1e3, tok_s=tokens / dt, tokens=tokens, supervised=supervised, params=sum(
        p.numel() for p in params.values()), text_params=n_text, tflops=flops / dt / 1e12,
        mfu=100 * flops / dt / peak if peak else None,
        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None)


def gpu(args):
    r = step_bench(steps=args.steps)
    print(f"1-GPU SFT step, {r['params'] / 1e9:.2f}B params ({r['text_params'] / 1e9:.2f}B in the language model "
          f"without embeddings), {r['tokens']} packed tokens (4 images, {r['supervised']} supervised): "
          f"{r['ms']:.0f} ms, {r['tok_s']:,.0f} tok/s, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu'] or 0:.1f}% "
          f"(goal >= 40%), peak memory {r['peak_gib']:.1f} GiB")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    gpu(args) if args.gpu else cpu(args)


if __name__ == "__main__":
    main()
