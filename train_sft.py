"""Stage 2 (paper §4): supervised fine-tuning of LLaVA-NeXT on CoT + direct rows.

    # one process (CPU, or one GPU)
    python train_sft.py --model runs/base --data runs/sft/cot.jsonl --image-root runs/syn --out runs/sft \\
        --max-steps 300 --batch-size 16 --lr 1e-3
    # 8 GPUs, the paper's recipe for llama3-llava-next-8b: FSDP2, bf16, packed sequences, 1 epoch, batch 4 x 8 = 32,
    # LLM lr 5e-6, vision tower 5e-7, cosine with 3% warm-up
    torchrun --nproc_per_node 8 train_sft.py --model llama3-llava-next-8b-hf --image-root image_data --out runs/sft \\
        --data sft_data/*/cot.none.jsonl sft_data/*/direct.none.jsonl --fsdp --batch-size 4 --lr 5e-6 \\
        --vision-lr 5e-7 --epochs 1 --warmup-ratio 0.03 --grad-checkpointing --save-every 2000
    # several nodes: the same command on each, with a rendezvous
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_sft.py ...
    # find bad rows and images before paying for GPUs
    python train_sft.py --model ... --data ... --image-root ... --out ... --check-data

Checkpoints (every --save-every steps and at the end) hold the sharded training state (weights, optimizer, RNG:
--resume continues bit for bit, on any number of processes) and, at the end and every --save-hf-every steps, the
Hugging Face weights that LlavaNext.from_pretrained and transformers load. OUT/final points at the last one.
"""

import json
import os
import sys
import time
from functools import partial

import torch
from tqdm import tqdm

from checkpoint import claim_run, grad_sync, link_final, load_for_training, load_state, save
from common import (ArgumentParser, Dist, Metrics, Skips, Timer, add_run_flags, autocast, check_model_dir,
                    check_out_dir, cli, clip, file_id, lr_factor, model_id, number, peak_flops, precision, print0,
                    progress, seed_all, set_lr)
from data.collate import (SFTDataset, Skip, balance, collate, estimate_length, global_batches, histogram, load_rows,
                          split_batch)
from data.formats import FormatError
from model import Processor


def parse_args(argv=None):
    ap = ArgumentParser(__doc__)
    pos, nonneg = number(int, lo=1), number(int, lo=0)
    # data
    ap.add_argument("--model", required=True, help="Hugging Face LLaVA-NeXT directory to start from")
    ap.add_argument("--data", nargs="+", required=True, help="SFT JSONL files (ShareGPT-4o-Reasoning format)")
    ap.add_argument("--ratios", nargs="+", type=number(float, above=0), default=None,
                    help="per-file sampling ratio: < 1 a seeded share, > 1 repeats (default 1 each)")
    ap.add_argument("--image-root", default=".", help="image paths in the rows are relative to this")
    ap.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, loss.png")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another run in --out (only files a training run wrote)")
    ap.add_argument("--max-len", type=number(int, lo=2), default=6144,
                    help="tokens per sample, image tokens included (paper: 6144)")
    ap.add_argument("--overlong", choices=["truncate", "skip"], default="truncate",
                    help="longer samples: cut in their text (never inside image tokens), or skip; counted either way")
    ap.add_argument("--template", choices=["llava", "hf"], default="llava", help="chat template (model/processor.py)")
    ap.add_argument("--pack", choices=["auto", "on", "off"], default="auto",
                    help="pack samples into one varlen sequence (auto: on CUDA; the CPU uses padded batches)")
    ap.add_argument("--no-group-by-length", action="store_true", help="plain shuffled batches")
    ap.add_argument("--workers", type=nonneg, default=2, help="DataLoader workers (image decoding, anyres)")
    ap.add_argument("--strict", action="store_true", help="bad rows / images are errors (default: counted, skipped)")
    ap.add_argument("--check-data", action="store_true", help="validate every row and image, report, exit")
    # optimisation
    ap.add_argument("--max-steps", type=pos, default=None, help="optimizer steps (default: --epochs over the data)")
    ap.add_argument("--epochs", type=number(float, above=0), default=1.0, help="passes over the data (paper: 1)")
    ap.add_argument("--batch-size", type=pos, default=4, help="samples per micro-batch per process (paper: 4 x 8)")
    ap.add_argument("--grad-accum", type=pos, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=number(float, above=0), default=5e-6, help="LLM learning rate (paper: 5e-6)")
    ap.add_argument("--vision-lr", type=number(float, above=0), default=None,
                    help="vision tower lr (paper: 5e-7; default: --lr / 10)")
    ap.add_argument("--projector-lr", type=number(float, above=0), default=None,
                    help="projector + image newline lr (default: --lr)")
    ap.add_argument("--freeze-vision", action="store_true", help="do not train the vision tower")
    ap.add_argument("--freeze-projector", action="store_true", help="do not train the projector and image newline")
    ap.add_argument("--weight-decay", type=number(float, lo=0), default=0.0, help="AdamW decoupled weight decay")
    ap.add_argument("--warmup-ratio", type=number(float, lo=0, hi=1), default=0.03,
                    help="share of the steps with a linear warm-up (paper: 0.03)")
    ap.add_argument("--min-lr-ratio", type=number(float, lo=0, hi=1), default=0.0,
                    help="cosine floor, as a share of each group's lr")
    add_run_flags(ap, "data")
    ap.add_argument("--log-every", type=pos, default=1, help="log every K steps")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init
    check_model_dir(args.model)
    d = Dist(args.dist_timeout)
    seed_all(args.seed)
    cuda = d.device.type == "cuda"
    compute, save_dtype, pack = precision(args, d)

    # ---------------------------------------------------------------- data
    processor = Processor.from_pretrained(args.model)
    try:
        rows = load_rows(args.data, args.ratios, args.seed)
    except (FormatError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    dataset = SFTDataset(rows, processor, args.image_root, args.max_len, args.overlong, args.template, args.strict)
    if args.check_data:
        return check_data(dataset, args)
    warn_unknown_words(rows, processor, d)
    micro, world, accum = args.batch_size, d.world, args.grad_accum
    global_size = micro * world * accum
    per_epoch = len(rows) // global_size
    if per_epoch == 0:
        raise SystemExit(f"error: {len(rows)} rows make no global batch of {global_size}")
    total = args.max_steps or max(1, int(args.epochs * per_epoch))
    check_out_dir(args.out)
    resume = claim_run(args, d, {
        "stage": "sft", "model": model_id(args.model), "data": [file_id(f) for f in args.data],
        "global_batch": global_size, "steps": total, "compute": str(compute), "pack": pack, "flags": {
            k: getattr(args, k) for k in ("ratios", "max_len", "overlong", "template", "no_group_by_length", "lr",
                                          "vision_lr", "projector_lr", "freeze_vision", "freeze_projector",
                                          "weight_decay", "warmup_ratio", "min_lr_ratio", "clip", "seed")}})
    lengths = cached_lengths(rows, processor, args, d)
    print0(f"{len(rows)} rows | global batch {global_size} = {micro} per micro-batch x {world} processes x {accum} "
           f"accumulation | {per_epoch} steps per epoch | {total} steps | {'packed' if pack else 'padded'} batches")
    print0("config: " + json.dumps(vars(args)))

    # ---------------------------------------------------------------- model

    def configure(model):
        if args.freeze_vision:
            model.vision_tower.requires_grad_(False)
        if args.freeze_projector:
            model.multi_modal_projector.requires_grad_(False)
            model.image_newline.requires_grad_(False)
        model.freeze_unused()
        model.set_grad_checkpointing(args.grad_checkpointing)

    model, wrapped = load_for_training(resume or args.model, args, d, compute, configure, weights=resume is None)
    groups = param_groups(model, args)            # after sharding: FSDP2 replaces the parameters with shards

    # ---------------------------------------------------------------- optimizer
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=cuda or None)
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    start = 0
    if resume:
        start = load_state(resume, wrapped, optimizer)["step"]
        for g in optimizer.param_groups:
            g["base_lr"] = next(x for x in groups if x["name"] == g["name"])["lr"]
        print0(f"resumed from {resume} at step {start} (saved by {world} process(es) or another count: resharded)")

    # ---------------------------------------------------------------- data order for this rank
    schedule, splits = [], []
    for step in range(start, total):
        batch = global_batches(lengths, global_size, args.seed, step // per_epoch)[step % per_epoch]
        split = split_batch(batch, lengths, micro, world, accum, not args.no_group_by_length)
        schedule += [s[d.rank] for s in split]
        splits += split if len(splits) < 200 else []
    if world > 1:
        print0(f"ranks balanced by tokens: mean / max per micro-batch {balance(splits, lengths):.3f}")
    pad_id = 0 if processor.image_token_id != 0 else 1
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=schedule, num_workers=args.workers,
                                         collate_fn=partial(collate, pack=pack, pad_id=pad_id),
                                         persistent_workers=args.workers > 0)
    batches = iter(loader)

    # ---------------------------------------------------------------- loop
    metrics = Metrics(os.path.join(args.out, "metrics.jsonl"), d, resume_step=start)
    skips, truncated, tokens_total, timer, t0 = Skips(d), 0, 0, Timer(), time.time()
    flops_per_token = 6 * sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    peak = peak_flops(d.device)
    bar = tqdm(total=total, initial=start, desc="sft", unit="step", disable=not d.main, dynamic_ncols=True)
    wrapped.train()
    loss = float("nan")
    progress["then"] = f"rerun with --resume to continue from {os.path.basename(resume)}" if resume else \
        "no checkpoint written yet (--save-every): a rerun with --resume starts over"
    for step in range(start, total):
        progress["at"] = f"step {step + 1} of {total}"
        micro_list = [next(batches) for _ in range(accum)]
        supervised = d.all_sum(sum(m.get("supervised", 0) for m in micro_list)).item()
        nll = 0.0
        for k, mb in enumerate(micro_list):
            skips.add(mb["skipped"])
            truncated += mb["truncated"]
            with grad_sync(wrapped, k == accum - 1), autocast(d, compute):
                lp = forward(wrapped, mb, d)
                # normalised by the supervised tokens of the whole global batch; x world undoes the gradient averaging
                (-lp.sum() / max(supervised, 1.0) * world).backward()
            nll += -float(lp.detach().sum())
            tokens_total += mb.get("tokens", 0)
        gnorm = clip(model, args.clip)
        set_lr(optimizer, lr_factor(step, total, args.warmup_ratio, args.min_lr_ratio))
        if supervised > 0:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = d.all_sum(nll).item() / supervised if supervised else float("nan")
        dt = timer.lap()
        tok = d.all_sum(sum(m.get("tokens", 0) for m in micro_list)).item()
        bar.update(1)
        if supervised == 0:                        # every sample of the step was skipped: no loss to report
            n_skipped = int(d.all_sum(sum(len(m["skipped"]) for m in micro_list)).item())
            metrics.log({"step": step + 1, "skipped": n_skipped, "lr": optimizer.param_groups[0]["lr"]})
            bar.write(f"step {step + 1}/{total} | no sample trained: all {n_skipped} skipped (see the warnings) | "
                      f"lr {optimizer.param_groups[0]['lr']:.1e}") if d.main else None
        elif (step + 1) % args.log_every == 0 or step + 1 == total:
            row = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "gnorm": gnorm,
                   "tok_s": tok / dt, "supervised_tokens": supervised, "time": time.time() - t0}
            mem = ""
            if cuda:
                row["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                mem = f" | mem {row['mem_gib']:.1f}GiB"
                if peak:
                    row["mfu"] = flops_per_token * tok / dt / (peak * world)
                    mem += f" | mfu {100 * row['mfu']:.1f}%"
            metrics.log(row)
            bar.write(f"step {step + 1}/{total} | loss {loss:.4f} | lr {row['lr']:.1e} | gnorm {gnorm:.2f} | "
                      f"tok/s {tok / dt:,.0f}{mem}") if d.main else None
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < total:
            save(args, d, model, wrapped, optimizer, processor, step + 1, save_dtype)
    bar.close()

    # ---------------------------------------------------------------- save, summary
    final = save(args, d, model, wrapped, optimizer, processor, total, save_dtype, final=True) if start < total \
        else resume
    metrics.close()
    skipped = skips.total()
    skipped["truncated to --max-len (kept)"] = int(d.all_sum(truncated).item())
    if d.main:
        link = link_final(args.out, final)
        png = metrics.plot(os.path.join(args.out, "loss.png"), title="SFT loss")
        elapsed = time.time() - t0
        print(f"done: {total - start} steps in {elapsed:.0f}s, final loss {loss:.4f}, {tokens_total:,} tokens on "
              f"rank 0; model {link}{'; ' + png if png else ''}")
        if any(skipped.values()):
            print("samples not trained on (or cut): " + ", ".join(f"{k}: {v}" for k, v in skipped.items() if v))
    d.close()
    return 0


# ------------------------------------------------------------------------------------------------ helpers

def forward(wrapped, mb, d):
    """Per-token log-probs of one micro-batch through the wrapped model's own forward (DDP's rule)."""
    if mb["n"] == 0:         # every sample of this micro-batch was skipped: still take part in the collectives
        ids = torch.zeros(1, 1, dtype=torch.long, device=d.device)
        return wrapped(ids, targets=torch.full_like(ids, -100), keep_vision_in_graph=True)
    to = {k: v.to(d.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
    return wrapped(to["input_ids"], to.get("pixel_values"), to.get("image_sizes"), to.get("attention_mask"),
                   cu_seqlens=to.get("cu_seqlens"), max_seqlen=to.get("max_seqlen"), targets=to["targets"],
                   keep_vision_in_graph=True)


def param_groups(model, args):
    """Per-module learning rates (paper: LLM 5e-6, vision tower 5e-7, projector as the LLM)."""
    vision_lr = args.vision_lr if args.vision_lr is not None else args.lr / 10
    projector_lr = args.projector_lr if args.projector_lr is not None else args.lr
    groups = {"llm": [], "vision": [], "projector": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "vision" if name.startswith("vision_tower.") else \
            "projector" if name.startswith(("multi_modal_projector.", "image_newline")) else "llm"
        groups[key].append(p)
    lrs = {"llm": args.lr, "vision": vision_lr, "projector": projector_lr}
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


def cached_lengths(rows, processor, args, d):
    """Length estimates for grouping and balancing (each needs an image header): every rank scans its share, the
    shares are gathered, and the result is cached beside the checkpoints for reruns."""
    path = os.path.join(args.out, "lengths.json")
    key = [[os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)] for f in args.data] + [
        args.ratios, args.seed, len(rows)]
    cached = json.load(open(path)) if os.path.exists(path) else {}
    if d.all_sum(cached.get("key") != json.loads(json.dumps(key))).item() == 0:      # every rank agrees: a hit
        return cached["lengths"]
    mine = {i: estimate_length(rows[i][0], processor, args.image_root) for i in tqdm(
        range(d.rank, len(rows), d.world), desc="lengths", disable=not d.main or len(rows) < 5000)}
    if d.distributed:
        parts = [None] * d.world
        torch.distributed.all_gather_object(parts, mine)
        mine = {k: v for p in parts for k, v in p.items()}
    lengths = [mine[i] for i in range(len(rows))]
    if d.main:
        with open(path + ".tmp", "w") as f:
            json.dump({"key": key, "lengths": lengths}, f)
        os.replace(path + ".tmp", path)
    return lengths


UNKNOWN_WARN = 0.01         # warn when more than this share of the words become <unk>


def unknown_word_report(rows, processor, sample=None):
    """(share, line) on how many of the rows' words a word-level tokenizer turns into <unk> (a word outside its
    vocabulary, which the model can neither read nor write), over all rows or `sample` rows spread evenly; None for
    a tokenizer without an unknown token (byte-level BPE such as Llama-3's)."""
    from data.tokenizer import unknown_words
    if processor.tokenizer is None or not rows:
        return None
    picked = rows if not sample or len(rows) <= sample else rows[::len(rows) // sample][:sample]
    found = unknown_words(processor.tokenizer, [t["value"] for row, _ in picked for t in row["conversations"]])
    if found is None or not found[1]:
        return None
    bad, n, examples = found
    line = (f"unknown words: {100 * bad / n:.2f}% of {n:,} words in {len(picked):,} rows are not in the tokenizer's "
            f"vocabulary and become <unk>" + (f" (e.g. {', '.join(examples)})" if examples else ""))
    if bad / n > UNKNOWN_WARN:
        line = (f"warning: {line}: the model can neither read nor write them; use a tokenizer built on this data "
                "(data/tokenizer.py build_word_tokenizer) or data its vocabulary covers")
    return bad / n, line


def warn_unknown_words(rows, processor, d, sample=1000):
    """Once at the start of training: the unknown-word warning over a sample of the rows (rank 0)."""
    report = unknown_word_report(rows, processor, sample) if d.main else None
    if report and report[0] > UNKNOWN_WARN:
        print(report[1], file=sys.stderr, flush=True)


def check_data(dataset, args):
    """Load every row and image as training would; print counts, reasons, a length histogram and the share of
    unknown words (a word-level tokenizer)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.workers,
                                         collate_fn=lambda x: x)
    reasons, lengths, supervised, truncated = {}, [], 0, 0
    first = {}
    for item in tqdm(loader, total=len(dataset), desc="check-data", unit="row"):
        if isinstance(item, Skip):
            reasons[item.reason] = reasons.get(item.reason, 0) + 1
            first.setdefault(item.reason, item.where)
            continue
        lengths.append(len(item["input_ids"]))
        supervised += int((item["targets"] != -100).sum())
        truncated += bool(item["truncated"])
    n = len(dataset)
    print(f"{n} rows: {len(lengths)} usable, {n - len(lengths)} skipped, {truncated} truncated to --max-len "
          f"{args.max_len}; {sum(lengths):,} tokens, {supervised:,} supervised")
    for r, c in sorted(reasons.items(), key=lambda x: -x[1]):
        print(f"  skipped {c:6d}: {r} (first: {first[r]})")
    if lengths:
        print(f"lengths: min {min(lengths)}, mean {sum(lengths) / len(lengths):.0f}, max {max(lengths)}")
        print(histogram(lengths))
    report = unknown_word_report(dataset.rows, dataset.proc)
    if report:
        print(report[1])
    return 0 if not reasons else 1


if __name__ == "__main__":
    cli(main)
