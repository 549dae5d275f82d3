"""Per-GPU memory of the training recipes at real scale, computed on the meta device (no GPU, no weights).

    python -m bench.memory                       # llama3-llava-next-8b, the README's SFT and DPO recipes, 8 GPUs
    python -m bench.memory --gpus 16 --model path/to/hf_dir --sft-batch 2 --text-tokens 300

What each row counts: training/memory.py.
"""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import LlavaNextConfig  # noqa: E402
from model.anyres import num_crops, num_image_tokens  # noqa: E402
from training.memory import LLAMA3_LLAVA_NEXT_8B, table  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Hugging Face model directory (default: llama3-llava-next-8b)")
    ap.add_argument("--gpus", type=int, default=8, help="processes the model is sharded over")
    ap.add_argument("--sft-batch", type=int, default=4, help="SFT samples per micro-batch (README recipe: 4)")
    ap.add_argument("--dpo-batch", type=int, default=1, help="DPO pairs per micro-batch (README recipe: 1)")
    ap.add_argument("--image", default="672x672", help="HxW of a typical image (sets the anyres crop count)")
    ap.add_argument("--text-tokens", type=int, default=250, help="text tokens per sample besides the image's")
    args = ap.parse_args(argv)
    if args.model:
        cfg = LlavaNextConfig.from_json(os.path.join(args.model, "config.json"))
    else:
        cfg = LlavaNextConfig.from_dict(LLAMA3_LLAVA_NEXT_8B)
    h, w = (int(x) for x in args.image.lower().split("x"))
    crops = num_crops((h, w), cfg.image_grid_pinpoints, cfg.vision.image_size)
    tokens = num_image_tokens((h, w), cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.grid,
                              cfg.vision_feature_select_strategy) + args.text_tokens
    text, _ = table(cfg, args.gpus, args.sft_batch, args.dpo_batch, tokens, crops)
    print(text)


if __name__ == "__main__":
    main()
