"""Generation speed and memory: ours vs transformers' generate, and ours before vs after the in-place KV cache.

    python bench/generate_speed.py [--threads 2] [--part ratio greedy memory]     # CPU, about 7 minutes
    python bench/generate_speed.py --gpu            # one GPU: an 8B-shaped 4-layer model, sampling tokens/s

ratio: DPO-style sampling of one image question (a 2x2 anyres grid: 5 crops, 1,312 image tokens), 32 samples x 64
   new tokens at temperature 1. Ours: one prefill shared by the 32 samples. transformers:
   generate(num_return_sequences=32, do_sample=True), which expands the prompt (and the images) 32 times. On the
   61M-parameter model of bench/model_speed.py and on a 20M one (4 narrow layers), where per-step overhead shows;
   the implementation before is timed too. Goal: >= 5x on both.
greedy: 8 prompts with images of different sizes, 32 new tokens each, tokens/s and identical tokens. Goal >= 1.0x.
memory: BEFORE (model/generation.py at commit BEFORE, read from git: the cache copied whenever a prompt finished,
   einsum decode attention with fp32 scores) and after, each in a fresh process, 32 samples x 256 new tokens on a
   7.6M-parameter model whose KV cache outweighs the rest (8 layers x 4 key/value heads, 4k vocabulary): RSS growth
   during the prompt pass and during decoding (sampled every millisecond), against the cache's own size, and
   tokens/s. (a) one prompt of 3,072 tokens, no stop; (b) 4 prompts of ~1k tokens whose samples stop at random
   steps (2% of the ids stop a sample), so whole prompts leave the batch one after another; both sides use the new
   sampler there, so they draw the same tokens and prompts finish at the same steps.
--gpu: 8 text prompts of ~3k tokens x 32 samples x 256 tokens, bf16, an 8B-shaped Llama (4096 wide, GQA 32/8,
   128k vocabulary) cut to 4 layers: decode tokens/s and peak memory over the weights, after and before.
Runs generate exactly the requested number of tokens unless stop ids are given, so the work is the same.
"""

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.model_speed import CONFIG, PINPOINTS  # noqa: E402
from model import LlavaNext, LlavaNextConfig  # noqa: E402
from model.anyres import num_crops, num_image_tokens  # noqa: E402
from model.generation import generate, left_pad, sample_next  # noqa: E402

IMAGE = 31999
BEFORE = "131569c"          # the last commit with the copying KV cache
# 20M parameters: the vision tower and vocabulary of CONFIG around a 4-layer, 256-wide Llama
SMALL = dict(CONFIG, vision_config=dict(CONFIG["vision_config"], hidden_size=64, intermediate_size=256,
                                        num_hidden_layers=2, num_attention_heads=2),
             text_config=dict(CONFIG["text_config"], hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2))
# before / after: a model whose KV cache outweighs everything else (8 layers x 4 key/value heads, a 4k vocabulary),
# so that peak memory shows what the cache does
MEMORY = dict(SMALL, model_type="llava_next",
              text_config=dict(SMALL["text_config"], num_hidden_layers=8, num_key_value_heads=4, intermediate_size=512,
                               vocab_size=4096))
GPU_CONFIG = dict(
    model_type="llava_next", image_token_index=128256, image_grid_pinpoints=[[336, 672], [672, 336], [672, 672]],
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
    text_config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192, rope_theta=500000.0))


@functools.cache
def generation_before():
    """model/generation.py as of commit BEFORE, as a module, or None when git or the commit is not at hand."""
    try:
        src = subprocess.run(["git", "show", f"{BEFORE}:model/generation.py"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = os.path.join(tempfile.mkdtemp(), "generation_before.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("generation_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def pair(config):
    """transformers' model and ours with the same random weights."""
    from transformers import LlavaNextConfig as HFConfig, LlavaNextForConditionalGeneration
    torch.manual_seed(0)
    hf = LlavaNextForConditionalGeneration(HFConfig(**config)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = LlavaNext.from_pretrained(d).eval()
    return hf, ours


# ------------------------------------------------------------------------------------------------ vs transformers

def ratio(name, config):
    hf, ours = pair(config)
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    g = torch.Generator().manual_seed(0)
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
    before, was = generation_before(), ""
    if before is not None:                              # the implementation before the in-place KV cache
        t_before, _ = timed(lambda: before.generate(ours, ids, px, sizes, mask, max_new_tokens=64, temperature=1.0,
                                                    n=32, seed=0, eos_token_id=[]))
        was = f" (before: {t_before:.2f}s, {t_hf / t_before:.1f}x)"
    print(f"{name} ({params:.0f}M params): 32 samples x 64 tokens, 1 image ({ids.shape[1]} prompt tokens): "
          f"transformers {t_hf:.2f}s | ours {t_ours:.2f}s | {t_hf / t_ours:.1f}x (goal >= 5x){was}", flush=True)


def greedy():
    hf, ours = pair(CONFIG)
    g = torch.Generator().manual_seed(1)
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
          f"identical tokens: {same}", flush=True)


# ------------------------------------------------------------------------------------------------ before / after

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sampling_run(which, prompts, threads):
    """One measurement in this (fresh) process: RSS growth during one generate call, its prompt pass and its decode
    steps apart (a thread samples RSS every millisecond), and tokens/s."""
    torch.set_num_threads(threads)
    module = generation_before() if which == "before" else None
    if module is not None and prompts > 1:              # the same draws as after: prompts finish at the same steps
        module.sample_next = sample_next
    gen = module.generate if module is not None else generate
    model = LlavaNext.from_config(LlavaNextConfig.from_dict(MEMORY), seed=0).eval()
    cfg = model.config.text
    g = torch.Generator().manual_seed(0)
    S = 3072 if prompts == 1 else 1024
    ids, mask = left_pad([torch.randint(1, cfg.vocab_size, (S - 40 * i,), generator=g).tolist()
                          for i in range(prompts)], 0)
    n, new = 32, 256
    stop = list(range(1, cfg.vocab_size // 50)) if prompts > 1 else []     # ~2% of the ids stop a sample
    gen(model, ids[:, -64:], attention_mask=mask[:, -64:], max_new_tokens=4, temperature=1.0, n=2, seed=0)  # warm up
    calls, peak, running = [0], {"prompt": 0, "decode": 0}, [True]
    model.language_model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def watch():
        while running[0]:
            phase = "prompt" if calls[0] <= 1 else "decode"
            peak[phase] = max(peak[phase], rss())
            time.sleep(0.001)

    base = rss()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    dt, out = timed(lambda: gen(model, ids, attention_mask=mask, max_new_tokens=new, temperature=1.0, n=n,
                                seed=list(range(prompts)), eos_token_id=stop, pad_token_id=0))
    running[0] = False
    watcher.join()
    cache = 2 * cfg.num_hidden_layers * prompts * cfg.num_key_value_heads * cfg.head_dim * (S + n * new) * 4
    hit = torch.isin(out, torch.tensor(stop, dtype=torch.long))
    length = torch.where(hit.any(1), hit.float().argmax(1) + 1, out.shape[1])
    return {"prompt": peak["prompt"] - base, "decode": peak["decode"] - base, "cache": cache, "seconds": dt,
            "tokens": int(length.sum()), "done_at": sorted(length.view(prompts, n).max(1).values.tolist()), "S": S}


def memory(threads):
    if generation_before() is None:
        print(f"memory: skipped, commit {BEFORE} (the implementation before) is not in this checkout's git history")
        return
    # every freed tensor goes back to the OS at once, so RSS follows the live tensors (glibc's default keeps some)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for prompts, what in ((1, "1 prompt of 3,072 tokens, no stop"),
                          (4, "4 prompts of ~1k tokens whose samples stop at random steps; same draws before/after")):
        res = {}
        for which in ("before", "after"):                   # a fresh process each
            cmd = [sys.executable, os.path.abspath(__file__), "--child", which, "--prompts", str(prompts),
                   "--threads", str(threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            res[which] = json.loads(out.strip().splitlines()[-1])
        b, a = res["before"], res["after"]
        mib = 2 ** 20
        print(f"memory, {what}, 32 x 256 new tokens; prompts done at steps {a['done_at']} (before {b['done_at']}):\n"
              f"  KV cache {a['cache'] / mib:.0f} MiB | RSS growth, prompt pass: before {b['prompt'] / mib:.0f} MiB, "
              f"after {a['prompt'] / mib:.0f} MiB | decode: before {b['decode'] / mib:.0f} MiB "
              f"({b['decode'] / b['cache']:.2f}x the cache), after {a['decode'] / mib:.0f} MiB "
              f"({a['decode'] / a['cache']:.2f}x)\n"
              f"  {a['tokens']} tokens: before {b['tokens'] / b['seconds']:.0f} tok/s, after "
              f"{a['tokens'] / a['seconds']:.0f} tok/s ({b['seconds'] / a['seconds']:.2f}x)", flush=True)


# ------------------------------------------------------------------------------------------------ GPU

def gpu(smoke=False):
    """Sampling tokens/s of an 8B-shaped few-layer model on one GPU (smoke: a tiny shape on the CPU)."""
    dev = torch.device("cpu" if smoke else "cuda")
    d = json.loads(json.dumps(GPU_CONFIG))
    B, S, n, new = (2, 96, 4, 8) if smoke else (8, 3000, 32, 256)
    if smoke:
        d["text_config"].update(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=1000)
        d["vision_config"].update(hidden_size=32, intermediate_size=64, num_attention_heads=2)
        d["image_token_index"] = 999
    cfg = LlavaNextConfig.from_dict(d)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device("meta"):
        model = LlavaNext(cfg)
    model.to_empty(device=dev)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model = model.to(dtype).eval()
    weights = torch.cuda.memory_allocated() if not smoke else 0
    g = torch.Generator().manual_seed(0)
    ids, mask = left_pad([torch.randint(0, cfg.image_token_index, (S - 17 * i,), generator=g).tolist()
                          for i in range(B)], 0)
    ids, mask = ids.to(dev), mask.to(dev)
    L, Hkv, D = cfg.text.num_hidden_layers, cfg.text.num_key_value_heads, cfg.text.head_dim
    cache = 2 * L * B * Hkv * D * (S + n * new) * torch.finfo(dtype).bits // 8
    print(f"{'[smoke, CPU] ' if smoke else ''}{torch.cuda.get_device_name() if not smoke else ''} "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params ({L} layers of an 8B Llama), {B} prompts "
          f"x {S} tokens, {n} samples x {new} tokens, {str(dtype)[6:]}; KV cache {cache / 2**30:.2f} GiB", flush=True)
    before = generation_before()
    results = {}
    for which, gen in (("after", generate), ("before", before.generate if before else None)):
        if gen is None:
            print(f"  before: skipped (commit {BEFORE} not in this checkout's git history)")
            continue

        def run(k):
            out = gen(model, ids, attention_mask=mask, max_new_tokens=k, temperature=1.0, n=n,
                      seed=list(range(B)), eos_token_id=[])
            if not smoke:
                torch.cuda.synchronize()
            return out

        run(2)                                                             # warm up
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
        t_prefill, _ = timed(lambda: run(1))
        t_all, out = timed(lambda: run(new))
        assert out.shape == (B * n, new)
        peak = torch.cuda.max_memory_allocated() - weights if not smoke else 0
        tok_s = B * n * (new - 1) / (t_all - t_prefill)
        results[which] = tok_s
        results[f"{which}_peak_gib"] = peak / 2**30
        print(f"  {which}: prefill + 1 token {t_prefill:.2f}s | all {t_all:.2f}s | decode {tok_s:,.0f} tok/s "
              f"({1e3 * (t_all - t_prefill) / (new - 1):.1f} ms a step) | peak memory over the weights "
              f"{peak / 2**30:.2f} GiB", flush=True)
    if "before" in results:
        print(f"  decode after / before: {results['after'] / results['before']:.2f}x")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", nargs="+", choices=["ratio", "greedy", "memory"], default=["ratio", "greedy", "memory"])
    ap.add_argument("--gpu", action="store_true", help="the 8B-shaped sampling measurement on one GPU")
    ap.add_argument("--smoke", action="store_true", help="with --gpu: a tiny shape on the CPU (checks the script)")
    ap.add_argument("--child", choices=["before", "after"], help=argparse.SUPPRESS)
    ap.add_argument("--prompts", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(sampling_run(args.child, args.prompts, args.threads)))
        return
    if args.gpu:
        gpu(args.smoke)
        return
    torch.set_num_threads(args.threads)
    if "ratio" in args.part:
        ratio("61M model", CONFIG)
        ratio("small model", SMALL)
    if "greedy" in args.part:
        greedy()
    if "memory" in args.part:
        memory(args.threads)


if __name__ == "__main__":
    main()
