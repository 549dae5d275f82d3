"""DPO step throughput on one GPU: pairs/s with a live reference and with precomputed reference log-probs.

    python bench/dpo_speed.py [--steps 10]            # bench/sft_speed.py's GPU config, bf16, packed
    python bench/dpo_speed.py --smoke                 # a tiny config on the CPU: checks the code path only

A step: 2 pairs, chosen and rejected ~2,000 tokens each (a 1x2-grid image: 1,176 image tokens, then text), the 4
rows packed into one varlen sequence, the image encoded once per pair (image_repeat=2); policy forward+backward and
fused AdamW; the live variant adds the frozen reference's forward.
"""

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.sft_speed import GPU_CONFIG  # noqa: E402
from data.collate import per_sequence  # noqa: E402
from model import LlavaNext, LlavaNextConfig  # noqa: E402
from model.anyres import num_crops, num_image_tokens  # noqa: E402
from train_dpo import dpo_loss  # noqa: E402

SMOKE = dict(model_type="llava_next", image_token_index=500, image_grid_pinpoints=[[64, 128], [128, 64]],
             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=64, patch_size=16),
             text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, vocab_size=512))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device("cpu" if args.smoke else "cuda")
    cfg = LlavaNextConfig.from_dict(SMOKE if args.smoke else GPU_CONFIG)
    policy = LlavaNext.from_config(cfg, device=dev).train()
    policy.vision_tower.requires_grad_(False), policy.multi_modal_projector.requires_grad_(False)
    policy.image_newline.requires_grad_(False)
    reference = LlavaNext.from_config(cfg, device=dev).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, fused=not args.smoke)
    S, img = cfg.vision.image_size, cfg.image_token_index
    size = (S, 2 * S)
    n_img = num_image_tokens(size, cfg.image_grid_pinpoints, S, cfg.vision.grid)
    text = 64 if args.smoke else 2000 - n_img
    g = torch.Generator().manual_seed(0)
    rows, lens = [], []
    for _ in range(4):                                       # chosen 1, chosen 2, rejected 1, rejected 2
        t = torch.randint(0, img, (text,), generator=g)
        rows.append(torch.cat([t[:16], torch.full((n_img,), img), t[16:]]))
        lens.append(len(rows[-1]))
    ids = torch.cat(rows)[None].to(dev)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    targets = ids.roll(-1, 1).clone()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):      # train on the response half of each row only
        targets[0, a:a + (b - a) // 2] = -100
        targets[0, b - 1] = -100
    px = torch.randn(2 * num_crops(size, cfg.image_grid_pinpoints, S), 3, S, S, generator=g).to(dev)
    sizes = torch.tensor([size] * 2)
    batch = {"cu_seqlens": cu}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if not args.smoke else torch.autocast("cpu", enabled=False)

    def logps(model):
        lp = model(ids, px, sizes, cu_seqlens=cu, max_seqlen=max(lens), targets=targets, image_repeat=2)
        seq = per_sequence(lp, batch)
        return seq[:2], seq[2:]

    ref_c, ref_r = (x.detach() for x in logps(reference))

    def step(live):
        with ctx:
            if live:
                with torch.no_grad():
                    rc, rr = logps(reference)
            else:
                rc, rr = ref_c, ref_r
            pc, pr = logps(policy)
            dpo_loss(pc, pr, rc, rr, 0.1)[0].mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    pairs_s = {}
    for live in (True, False):
        step(live)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(args.steps):
            step(live)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / args.steps
        print(f"DPO step, 2 pairs x 2 x {lens[0]} tokens, {sum(p.numel() for p in policy.parameters()) / 1e9:.2f}B "
              f"params, {'live' if live else 'precomputed'} reference: {dt * 1e3:.0f} ms, {2 / dt:.2f} pairs/s")
        pairs_s["live" if live else "precomputed"] = 2 / dt
    return pairs_s


if __name__ == "__main__":
    main()
