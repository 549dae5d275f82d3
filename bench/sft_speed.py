"""SFT training throughput: our training step vs transformers' LlavaNext forward+backward+AdamW, same weights and
batch, measured alternately in one run.

    python bench/sft_speed.py [--reps 4]                 # CPU: ratio of tokens/s (goal >= 1.0)
    python bench/sft_speed.py --gpu [--steps 10]         # one GPU: a ~1B LLaVA-NeXT, bf16, packed: tok/s and MFU

CPU: the 61M-parameter config of bench/model_speed.py, 2 samples x 1,310 tokens (one 2x2-grid image each) with
the loss on the last 96 tokens of each, as in VLM SFT where image and prompt tokens are not trained. Ours: the
loss through kernels.token_logprobs (ignored rows dropped before the lm_head). transformers: forward(labels=...).
GPU: CLIP-L/336 + a 16-layer, 2048-wide Llama (1.2B parameters), 4 packed samples of 2,000 tokens (one image
each), FSDP-free single GPU, bf16 autocast, fused AdamW. MFU counts 6 x parameters x tokens (goal >= 40%).
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
from model import LlavaNext, LlavaNextConfig  # noqa: E402
from model.anyres import num_image_tokens  # noqa: E402


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


GPU_CONFIG = dict(
    model_type="llava_next", image_token_index=32000,
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    text_config=dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32064, max_position_embeddings=8192, rope_theta=500000.0))


def gpu(args):
    dev = torch.device("cuda")
    cfg = LlavaNextConfig.from_dict(GPU_CONFIG)
    model = LlavaNext.from_config(cfg, device=dev)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    g = torch.Generator().manual_seed(0)
    size = (672, 672)                                                # a 2x2 grid: 5 crops, 2,928 image tokens
    n_img = num_image_tokens(size, cfg.image_grid_pinpoints, 336, 24)
    seqs, lens = [], []
    for _ in range(4):
        text = torch.randint(0, 32000, (2000 - n_img if n_img < 2000 else 600,), generator=g)
        s = torch.cat([text[:20], torch.full((n_img,), 32000), text[20:]])
        seqs.append(s)
        lens.append(len(s))
    ids = torch.cat(seqs)[None].to(dev)
    targets = torch.where(ids == 32000, -100, ids.roll(-1, 1))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    targets[0, cu[1:].long() - 1] = -100                             # no target across a sample boundary
    px = torch.randn(4 * 5, 3, 336, 336, generator=g).to(dev)
    sizes = torch.tensor([size] * 4)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = model(ids, px, sizes, cu_seqlens=cu, max_seqlen=max(lens), targets=targets)
        (-lp.sum() / (targets != -100).sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    tok = ids.numel()
    from common import peak_flops
    peak = peak_flops(dev) or 989e12
    print(f"1-GPU SFT step, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {tok} packed tokens "
          f"(4 images): {dt * 1e3:.0f} ms, {tok / dt:,.0f} tok/s, MFU {100 * 6 * n_params * tok / dt / peak:.1f}% "
          f"(goal >= 40%), peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


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
