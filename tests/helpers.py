"""What the tests (and bench/fsdp_smoke.py) build their inputs from: tiny LLaVA-NeXT configs, transformers reference
models, synthetic images and batches, a tiny trained-from-nothing model directory with its data, and launchers.
Nothing here imports pytest: a benchmark on a GPU box uses it too."""

import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from model.anyres import num_image_tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
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

# llava-hf/llama3-llava-next-8b-hf config.json, as published with the checkpoint
LLAMA3_8B = {
    "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next", "ignore_index": -100,
    "image_token_index": 128256, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default", "use_image_newline_parameter": True, "tie_word_embeddings": False,
    "torch_dtype": "float16", "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "text_config": {"_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "architectures": ["LlamaForCausalLM"],
                    "model_type": "llama", "bos_token_id": 128000, "eos_token_id": 128009,
                    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "vocab_size": 128320},
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
}

def batch_for(model, seed=0):
    cfg = model.config

    def n_tokens(h, w):
        return num_image_tokens((h, w), cfg.image_grid_pinpoints, cfg.vision.image_size, cfg.vision.grid)

    ids, mask, images = mixed_batch(n_tokens, cfg.image_token_index, cfg.text.vocab_size, seed)
    out = hf_image_processor()(images, return_tensors="pt")
    return dict(input_ids=ids, attention_mask=mask, pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])

@torch.no_grad()
def hf_logits(hf, batch):
    return hf(**batch).logits

@torch.no_grad()
def our_logits(model, batch):
    return model(batch["input_ids"], batch["pixel_values"], batch["image_sizes"], batch["attention_mask"])

def to_original(key):
    """llava-hf Hub name -> original LLaVA-NeXT name (the inverse of transformers' conversion script)."""
    for pat, rep in [(r"^vision_tower\.vision_model\.", "model.vision_tower.vision_tower.vision_model."),
                     (r"^multi_modal_projector\.linear_1\.", "model.mm_projector.0."),
                     (r"^multi_modal_projector\.linear_2\.", "model.mm_projector.2."),
                     (r"^image_newline$", "model.image_newline"),
                     (r"^language_model\.model\.", "model."), (r"^language_model\.lm_head\.", "lm_head.")]:
        if re.match(pat, key):
            return re.sub(pat, rep, key)
    raise AssertionError(key)

def original_config(kind):
    """The llava_llama / llava_mistral config.json of the same tiny model (flat text config + mm_* fields)."""
    d = hf_config_dict(kind)
    text = dict(d["text_config"])
    layer = d["vision_feature_layer"]
    return {**text, "model_type": "llava_mistral" if text["model_type"] == "mistral" else "llava_llama",
            "architectures": ["LlavaLlamaForCausalLM"], "image_aspect_ratio": "anyres",
            "mm_patch_merge_type": "spatial_unpad", "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": layer, "mm_use_im_start_end": False,
            "mm_hidden_size": 32, "image_grid_pinpoints": PINPOINTS, "image_token_index": d["image_token_index"],
            "tie_word_embeddings": d["tie_word_embeddings"], "mm_vision_tower": "tiny-clip",
            "vision_config": d["vision_config"]}

def llama3_tokenizer_json(tokenizer_dir, extra=()):
    """The Llama-3 tokenizer.json text with the 128,256 Llama-3 ids only (the fixture's Llama-3.2 file also carries
    <|image|> = 128256, which llava-hf's tokenizer does not) plus the given added tokens."""
    t = json.load(open(os.path.join(tokenizer_dir, "tokenizer.json")))
    t["added_tokens"] = [a for a in t["added_tokens"] if a["id"] < 128256]
    for i, content in enumerate(extra):
        t["added_tokens"].append({"id": 128256 + i, "content": content, "single_word": False, "lstrip": False,
                                  "rstrip": False, "normalized": False, "special": True})
    return json.dumps(t)

def torchrun(argv, n=2, script="train_sft.py"):
    with socket.socket() as s:                      # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}",
           script, *argv]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out

def launch(script, argv, n):
    """The command line a user types: `torchrun --nproc_per_node N script ...` (n = 1: plain python)."""
    if n == 1:
        return [sys.executable, script, *argv]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}", script,
            *argv]


def sft_args(tiny, out, *extra):
    """train_sft.py's argv for a tiny model directory (helpers' build_tiny_model_dir) into `out`."""
    model, data, sft = tiny
    return ["--model", model, "--data", sft, "--image-root", data, "--out", str(out), "--workers", "0", *extra]
