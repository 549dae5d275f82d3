"""Build the embedded default's base model: the tiny stand-in for a pretrained LLaVA-NeXT (`make base`).

    python -m demo.base [--out demo/base_model] [--samples 64000] [--seed 0]

The paper starts from a pretrained LLaVA-NeXT that can already read images; so does the demo. This script makes that
starting point from nothing, with the project's own stages: synthetic charts (64x64, 4 bars on the 16 px patch
grid, coloured by value) -> direct-answer rows, half captions ("A is 6, B is 0, C is 4, D is 8"), a quarter each
lookups and "which bar is largest" (distill.py --direct-only), plus 8k text-only rows that teach the order of the
numbers 0-9 ("6 > 4 ?" -> "6 > 4 yes"), the arithmetic a pretrained LLM brings -> a word-level tokenizer for the
task's text -> a randomly initialised 2.4M-parameter LLaVA-NeXT (CLIP 2 layers x 128 on 64 px crops, anyres over
one 64 px tile: 36 image tokens; Llama 4 layers x 192) -> train_sft.py, 4,000 steps of 16. Deterministic from
--seed (on a given machine and thread count). About 14 minutes on 2 idle CPU cores. The shipped model reads all
four values of a test chart exactly 100% of the time (300 test charts), the largest bar 99%; looking a value up
by the letter named in the question stays hard (23%), as it did in every tiny model of our CPU experiments. The
result is an HF directory committed with the project (bf16, under 5 MB).
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from data.prompts import COT_MC, COT_OPEN, DIRECT_MC, DIRECT_OPEN  # noqa: E402
from data.synthetic import FAMILIES, ask, make_chart, solve, teacher  # noqa: E402
from data.tokenizer import build_word_tokenizer  # noqa: E402
from model import ImageProcessor, LlavaNext, LlavaNextConfig, Processor  # noqa: E402

BASE_FAMILIES = ["caption", "caption", "lookup", "max_label"]    # half captions: four readings per sample


def number_rows(n, seed):
    """Text-only rows "6 > 4 ?" -> "6 > 4 yes": the order of the numbers 0-9, which any pretrained LLM brings and a
    randomly initialised one lacks (without it each comparison step of a chain has to be learned from scratch)."""
    rng = random.Random(f"numbers/{seed}")
    rows = []
    for i in range(n):
        a, b, op = rng.randint(0, 9), rng.randint(0, 9), rng.choice("<>")
        yes = "yes" if (a > b if op == ">" else a < b) else "no"
        rows.append({"id": f"numbers-{i:06d}", "conversations": [{"from": "human", "value": f"{a} {op} {b} ?"},
                                                                 {"from": "gpt", "value": f"{a} {op} {b} {yes}"}]})
    return rows
MODEL = dict(
    model_type="llava_next", image_grid_pinpoints=[[64, 64]], vision_feature_layer=-1,
    vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                       image_size=64, patch_size=16, projection_dim=64),
    text_config=dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                     num_key_value_heads=6, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0))


def run(cmd, env=None):
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env=env)


def corpus(seed):
    """Every text the demo's stages will write (all question families, CoT and direct), for the vocabulary."""
    rng = random.Random(seed)
    texts = [COT_OPEN, COT_MC, DIRECT_OPEN, DIRECT_MC, "### Answer:", "yes no", "< > ?"]
    for i in range(3000):
        chart = make_chart(rng, "tiny")                    # the vocabulary is the same at every tiny level
        fam = FAMILIES[i % len(FAMILIES)]
        if fam == "ratio" and sum(v != 0 for v in chart["values"]) < 2:
            continue
        q, params = ask(fam, chart, rng)
        rec = {"meta": {"chart": chart, "family": fam, "params": params}, "choices": None}
        texts += [q, teacher(rec, rng, error_rate=0.3), solve(fam, chart, params, chart["values"])[1]]
    return texts


def build_initial(path, seed):
    """Tokenizer + randomly initialised model + processor, as an HF directory."""
    os.makedirs(path, exist_ok=True)
    tok = build_word_tokenizer(corpus(seed), os.path.join(path, "tokenizer.json"), max_number=100)
    d = json.loads(json.dumps(MODEL))
    d["image_token_index"] = tok.token_to_id("<image>")
    d["text_config"].update(vocab_size=tok.get_vocab_size(), eos_token_id=tok.token_to_id("<|eot_id|>"),
                            bos_token_id=tok.token_to_id("<|begin_of_text|>"), pad_token_id=tok.token_to_id("<pad>"))
    cfg = LlavaNextConfig.from_dict(d)
    LlavaNext.from_config(cfg, seed=seed).save_pretrained(path)
    # no system prompt: every token counts at this size (real models keep LLaVA's, model/processor.py)
    Processor(cfg, ImageProcessor([[64, 64]], crop_size=64), system_prompt="").save_pretrained(path)
    print(f"initial model: {sum(1 for _ in tok.get_vocab())} words, {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "demo", "base_model"))
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "base"), help="scratch: data, checkpoints")
    ap.add_argument("--samples", type=int, default=64000, help="training samples (steps x batch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--vision-lr", type=float, default=None, help="default lr / 10 (lr itself blows the CLIP "
                                                                     "residual stream up at this size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--level", default="tiny", help="synthetic chart level (data/synthetic.py)")
    args = ap.parse_args()
    t0 = time.time()
    py = sys.executable
    data = os.path.join(args.work, "data")
    run([py, "-m", "data.synthetic", "--out", data, "--n", str(args.samples), "--seed", str(args.seed),
         "--level", args.level, "--families", *BASE_FAMILIES, "--holdout", "", "--n-test", "300"])
    rows = os.path.join(args.work, "direct.jsonl")
    if os.path.exists(rows):
        os.remove(rows)
    run([py, "distill.py", "--data", os.path.join(data, "train.jsonl"), "--image-root", data, "--out", rows,
         "--direct-only"])
    numbers = os.path.join(args.work, "numbers.jsonl")
    with open(numbers, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in number_rows(args.samples // 8, args.seed))
    init = os.path.join(args.work, "init")
    build_initial(init, args.seed)
    steps = args.samples // args.batch_size
    out = os.path.join(args.work, "sft")
    shutil.rmtree(out, ignore_errors=True)
    run([py, "train_sft.py", "--model", init, "--data", rows, numbers, "--image-root", data, "--out", out, "--max-steps",
         str(steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--vision-lr",
         str(args.vision_lr if args.vision_lr is not None else args.lr / 10),
         "--warmup-ratio", "0.05",
         "--workers", "1", "--seed", str(args.seed), "--save-dtype", "bfloat16", "--log-every", "50"])
    shutil.rmtree(args.out, ignore_errors=True)
    shutil.copytree(os.path.join(out, "final"), args.out,
                    ignore=shutil.ignore_patterns("trainer_state.*", "rng.pt", "state"))
    run([py, "evaluate.py", "--model", args.out, "--data", os.path.join(data, "test.jsonl"), "--image-root", data,
         "--mode", "direct", "--out", os.path.join(args.work, "eval"), "--max-new-tokens-direct", "24"])
    print(f"base model in {args.out} ({(time.time() - t0) / 60:.1f} minutes)")


if __name__ == "__main__":
    main()
