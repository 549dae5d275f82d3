"""Forward and forward+backward time of our LlavaNext vs transformers' on the same weights and batch (CPU).

    python bench/model_speed.py [--reps 5] [--threads 2]

Prints the median time of each and the ratio transformers / ours (> 1: we are faster). Goal: >= 1.0. The two
models alternate within each repetition, so machine noise hits both alike.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import LlavaNext  # noqa: E402
from model.anyres import num_image_tokens  # noqa: E402

PINPOINTS = [[224, 448], [448, 224], [448, 448]]
CONFIG = dict(
    vision_config=dict(model_type="clip_vision_model", hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=6, image_size=224, patch_size=14, projection_dim=256),
    text_config=dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                     num_attention_heads=8, num_key_value_heads=2, vocab_size=32000, rms_norm_eps=1e-5,
                     rope_theta=500000.0, max_position_embeddings=4096),
    image_grid_pinpoints=PINPOINTS, image_token_index=31999, vision_feature_layer=-2)


def make_batch(cfg, n=2, text=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = (400, 420)                                     # a 2x2 grid: 5 crops per image
    n_img = num_image_tokens(size, PINPOINTS, 224, 16)
    rows = [torch.cat([torch.randint(0, 31999, (8,), generator=g), torch.full((n_img,), 31999),
                       torch.randint(0, 31999, (text - 8,), generator=g)]) for _ in range(n)]
    ids = torch.stack(rows)
    pixel_values = torch.randn(n, 5, 3, 224, 224, generator=g)
    return ids, pixel_values, torch.tensor([size] * n)


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(LlavaNextConfig(**CONFIG))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlavaNext.from_pretrained(d)
    ids, px, sizes = make_batch(ours.config)
    print(f"batch: {ids.shape[0]} x {ids.shape[1]} tokens, {px.shape[0]} images x {px.shape[1]} crops; "
          f"{sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters; {args.threads} threads")

    def fwd(model, is_hf):
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=px, image_sizes=sizes) if is_hf else model(ids, px, sizes)
        return out.logits if is_hf else out

    def fwd_bwd(model, is_hf):
        model.train()
        logits = model(input_ids=ids, pixel_values=px, image_sizes=sizes).logits if is_hf else model(ids, px, sizes)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    diff = (fwd(hf, True) - fwd(ours, False)).abs().max().item()
    print(f"max |logit difference| {diff:.2e}")
    results = {}
    for name, fn in [("forward", fwd), ("forward+backward", fwd_bwd)]:
        fn(hf, True), fn(ours, False)                     # warm up
        t_hf, t_ours = [], []
        for _ in range(args.reps):
            t_hf.append(timed(lambda: fn(hf, True)))
            t_ours.append(timed(lambda: fn(ours, False)))
        a, b = statistics.median(t_hf), statistics.median(t_ours)
        results[name] = a / b
        print(f"{name:17s} transformers {a * 1e3:8.1f} ms | ours {b * 1e3:8.1f} ms | ratio {a / b:.3f}x (goal >= 1.0)")
    return results


if __name__ == "__main__":
    main()
