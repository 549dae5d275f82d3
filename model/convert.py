"""Convert any supported LLaVA-NeXT checkpoint to the llava-hf layout (what transformers, vLLM and SGLang load).

    python -m model.convert IN_DIR OUT_DIR [--dtype bfloat16] [--max-shard-size 5GB] [--no-verify]

IN_DIR may be in the llava-hf Hub layout, what transformers 5 writes, transformers' in-memory names, or the
original LLaVA-NeXT layout (llava_llama / llava_mistral config, model.mm_projector..., as Open-LLaVA-NeXT and the
LLaVA-Reasoner releases ship). Original checkpoints have no <image> token in their vocabulary; the converter adds
<image> and <pad> as the llava-hf conversion did (embedding rows padded to a multiple of 64, new rows set to the
mean row). Afterwards the output is reloaded and its logits on a probe prompt compared with the input's.
"""

import os
import time

import torch

from common.cli import ArgumentParser, UserError, cli
from common.manifest import check_model_dir
from model.llava_next import LlavaNext
from model.processor import IMAGE, Processor
from model.weights import DTYPES, checkpoint_files, read_header


def stored_dtype(path):
    """The dtype most of the checkpoint's floating tensors are stored in."""
    counts = {}
    for file in set(checkpoint_files(path).values()):
        for info in read_header(file)[0].values():
            dt = DTYPES.get(info["dtype"])
            if dt is not None and dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def add_image_tokens(model, processor):
    """Give an original-format model and tokenizer the llava-hf <image> (= old vocab size) and <pad> tokens."""
    cfg = model.config
    tok = processor.tokenizer
    if tok is not None and tok.token_to_id("<pad>") is None:
        from tokenizers import AddedToken
        tok.add_special_tokens([AddedToken("<pad>", special=True, normalized=False)])
    image_id = tok.token_to_id(IMAGE) if tok is not None else cfg.image_token_index
    if image_id != cfg.image_token_index:
        raise ValueError(f"the tokenizer gives <image> id {image_id} but the config says {cfg.image_token_index}")
    need = max(cfg.image_token_index + 2, tok.get_vocab_size() if tok is not None else 0)
    if need <= cfg.text.vocab_size:
        return
    new_vocab = (need + 63) // 64 * 64
    with torch.no_grad():
        for name in ("language_model.embed_tokens.weight",) + (() if cfg.tie_word_embeddings else ("lm_head.weight",)):
            module_name, _ = name.rsplit(".", 1)
            module = model.get_submodule(module_name)
            old = module.weight
            extra = old.mean(0, keepdim=True).expand(new_vocab - old.shape[0], -1)
            module.weight = torch.nn.Parameter(torch.cat([old, extra]), requires_grad=old.requires_grad)
    print(f"vocabulary {cfg.text.vocab_size} -> {new_vocab} rows (<image> = {image_id})")
    cfg.text.vocab_size = new_vocab


@torch.no_grad()
def probe_logits(model, processor):
    """Logits of a short text prompt (the image path is covered by the tests); the image token is left out."""
    ids = list(range(1, 17))
    if processor.tokenizer is not None:
        ids = processor.encode("<|begin_of_text|>The image shows a radar chart")[0]
    ids = torch.tensor([ids])
    return model(ids).float()


def main():
    ap = ArgumentParser(__doc__)
    ap.add_argument("src", help="input model directory (any supported layout)")
    ap.add_argument("dst", help="output directory (llava-hf layout); must be new or empty")
    ap.add_argument("--dtype", default=None, help="output dtype (default: the dtype the input is stored in)")
    ap.add_argument("--max-shard-size", default="5GB", help="shard the safetensors above this size")
    ap.add_argument("--no-verify", action="store_true", help="skip reloading the output and comparing logits")
    args = ap.parse_args()
    check_model_dir(args.src, "src")
    if os.path.isdir(args.dst) and os.listdir(args.dst):
        raise UserError(f"{args.dst} is not empty; nothing was changed: give a new or empty output directory")

    t0 = time.time()
    dtype = getattr(torch, args.dtype) if args.dtype else stored_dtype(args.src)
    model = LlavaNext.from_pretrained(args.src, dtype=dtype)
    processor = Processor.from_pretrained(args.src)
    add_image_tokens(model, processor)
    reference = None if args.no_verify else probe_logits(model, processor)
    model.save_pretrained(args.dst, max_shard_size=args.max_shard_size)
    processor.config = model.config
    processor.save_pretrained(args.dst)
    if processor.tokenizer is not None:
        processor.tokenizer.save(os.path.join(args.dst, "tokenizer.json"))
    n = sum(p.numel() for p in model.parameters())
    del model
    print(f"wrote {args.dst}: {n / 1e9:.3f}B parameters, {dtype}, {time.time() - t0:.1f}s")
    if reference is not None:
        reloaded = LlavaNext.from_pretrained(args.dst, dtype=dtype)
        diff = (probe_logits(reloaded, processor) - reference).abs().max().item()
        print(f"verify: reloaded output, max |logit difference| on a probe prompt = {diff:.3g}")
        if diff > 0:
            raise SystemExit("verify failed: the converted checkpoint does not reproduce the input's logits")


if __name__ == "__main__":
    cli(main)
