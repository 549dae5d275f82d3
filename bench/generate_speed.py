"""Generation speed, ours vs transformers' generate on the same weights (CPU).

    python bench/generate_speed.py [--threads 2]

1. DPO-style sampling: one image question (a 2x2 anyres grid: 5 crops, 1,312 image tokens), 32 samples x 64 new
   tokens at temperature 1. Ours: one prefill shared by the 32 samples. transformers:
   generate(num_return_sequences=32, do_sample=True), which expands the prompt (and the images) 32 times.
   Goal: >= 5x.
2. Greedy batch throughput: 8 prompts with images of different sizes, 32 new tokens each. Goal: >= 1.0x.
Both generate exactly the requested number of tokens (no eos), so the work is the same.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.model_speed import CONFIG, PINPOINTS  # noqa: E402
from model import LlavaNext  # noqa: E402
from model.anyres import num_crops, num_image_tokens  # noqa: E402
from model.generation import left_pad  # noqa: E402

IMAGE = 31999


def prompt(size, g, text=24):
    n_img = num_image_tokens(size, PINPOINTS, 224, 16)
    return (torch.randint(0, IMAGE, (6,), generator=g).tolist() + [IMAGE] * n_img +
            torch.randint(0, IMAGE, (text - 6,), generator=g).tolist())


def pixels(sizes, g):
    P = max(num_crops(s, PINPOINTS, 224) for s in sizes)
    return torch.randn(len(sizes), P, 3, 224, 224, generator=g), torch.tensor(sizes)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(LlavaNextConfig(**CONFIG)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlavaNext.from_pretrained(d).eval()
    g = torch.Generator().manual_seed(0)

    # ---- 1. 32 samples of one image question
    size = (400, 420)
    ids, mask = left_pad([prompt(size, g)], 0)
    px, sizes = pixels([size], g)

    def run_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes, do_sample=True,
                               temperature=1.0, top_k=0, num_return_sequences=32, max_new_tokens=64,
                               min_new_tokens=64, pad_token_id=0)

    def run_ours():
        return ours.generate(ids, px, sizes, mask, max_new_tokens=64, temperature=1.0, n=32, seed=0,
                             eos_token_id=[])

    run_ours()                                          # warm up
    t_ours, out = timed(run_ours)
    t_hf, ref = timed(run_hf)
    assert out.shape == (32, 64) and ref.shape[0] == 32 and ref.shape[1] - ids.shape[1] == 64
    print(f"32 samples x 64 tokens, 1 image ({ids.shape[1]} prompt tokens): transformers {t_hf:.2f}s | "
          f"ours {t_ours:.2f}s | {t_hf / t_ours:.1f}x (goal >= 5x)")

    # ---- 2. greedy batch of 8 prompts
    image_sizes = [(400, 420), (200, 430), (440, 210), (300, 300), (220, 220), (150, 440), (430, 160), (380, 400)]
    ids, mask = left_pad([prompt(s, g, text=16 + 4 * i) for i, s in enumerate(image_sizes)], 0)
    px, sizes = pixels(image_sizes, g)

    def greedy_hf():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, pixel_values=px, image_sizes=sizes, do_sample=False,
                               max_new_tokens=32, min_new_tokens=32, pad_token_id=0)

    def greedy_ours():
        return ours.generate(ids, px, sizes, mask, max_new_tokens=32, eos_token_id=[])

    greedy_ours()
    t_ours, out = timed(greedy_ours)
    t_hf, ref = timed(greedy_hf)
    same = torch.equal(out, ref[:, ids.shape[1]:])
    tokens = 8 * 32
    print(f"greedy, 8 prompts x 32 tokens ({ids.shape[1]} padded prompt tokens): transformers "
          f"{tokens / t_hf:.1f} tok/s | ours {tokens / t_ours:.1f} tok/s | {t_hf / t_ours:.2f}x (goal >= 1.0); "
          f"identical tokens: {same}")


if __name__ == "__main__":
    main()
