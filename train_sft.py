"""Stage 2 (paper section 4): supervised fine-tuning of LLaVA-NeXT on CoT + direct rows.

    # one process (CPU, or one GPU); --check-data first reads every row and image and reports what it would skip
    python train_sft.py --model demo/base_model --data runs/sft_data/cot.jsonl --image-root runs/syn --out runs/sft \
        --max-steps 300 --batch-size 16 --lr 1e-3 --freeze-vision
    # 8 GPUs, the paper's recipe (FSDP2, bf16, packed, 1 epoch, global batch 32, LLM lr 5e-6, vision tower 5e-7)
    torchrun --nproc_per_node 8 train_sft.py --model llama3-llava-next-8b-hf --image-root image_data \
        --out runs/8b/sft --data sft_data/*/*.jsonl --fsdp --batch-size 4 --lr 5e-6 --vision-lr 5e-7 --epochs 1 \
        --grad-checkpointing --save-every 500

Checkpoints hold the sharded training state (--resume continues bit for bit, on any number of processes) and, at the
end and every --save-hf-every steps, the Hugging Face weights; OUT/final points at the last. SIGTERM: the step ends,
a checkpoint is written, exit 143; a non-finite loss stops the run before its step. Guides: docs/sft.md, and
docs/real-scale.md for the paper's whole mixture and several nodes.
"""

import json
import os
import sys
import time
from functools import partial

import torch
from tqdm import tqdm

from common.cli import ArgumentParser, cli, number, progress
from common.dist import Dist, print0
from common.manifest import check_files, check_model_dir, check_out_dir, file_id, model_id
from common.metrics import Metrics, Skips, Timer, peak_flops
from common.schedule import lr_factor, set_lr
from data.collate import SFTDataset, Skip, collate, estimate_length, histogram, load_rows, per_sequence
from data.tokenizer import unknown_words
from model import LlavaNext, Processor
from training.checkpoint import claim_run, grad_sync, link_final, load_for_training, save
from training.guard import Guard
from training.loop import (add_run_flags, autocast, clip_grad, loader, precision, rank_schedule, read_step,
                           resume_optimizer, seed_all, step_plan, to_device)
from training.memory import check_fits, gpu_bytes


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
    ap.add_argument("--loss-mean", choices=["token", "sample"], default="token",
                    help="token: the mean NLL over the global batch's supervised tokens (the paper's); sample: each "
                         "sample's mean over its own tokens, then the mean over samples (a 2-token direct answer then "
                         "weighs as much as a 40-token rationale)")
    add_run_flags(ap, "data")
    ap.add_argument("--log-every", type=pos, default=1, help="log every K steps")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init: every check before the first write
    check_model_dir(args.model)
    check_files(args.data, "--data")
    check_out_dir(args.out)
    d = Dist(args.dist_timeout)
    seed_all(args.seed)
    compute, save_dtype, pack = precision(args, d)
    check_fits(configure(LlavaNext.empty(args.model), args), d.distributed and args.fsdp, d.world, gpu_bytes(d.device))

    # ---------------------------------------------------------------- data
    processor = Processor.from_pretrained(args.model)
    rows = load_rows(args.data, args.ratios, args.seed)
    dataset = SFTDataset(rows, processor, args.image_root, args.max_len, args.overlong, args.template, args.strict)
    if args.check_data:
        return check_data(dataset, args)
    warn_unknown_words(rows, processor, d)
    micro, world, accum = args.batch_size, d.world, args.grad_accum
    global_size, per_epoch, total = step_plan(len(rows), micro, world, accum, args.max_steps, args.epochs, "--data")
    resume = claim_run(args, d, run_fields(args, global_size, total, compute, pack))
    lengths = cached_lengths(rows, processor, args, d)
    print0(f"{len(rows)} rows | global batch {global_size} = {micro} per micro-batch x {world} processes x {accum} "
           f"accumulation | {per_epoch} steps per epoch | {total} steps | {'packed' if pack else 'padded'} batches "
           f"| loss: mean over {'supervised tokens' if args.loss_mean == 'token' else 'samples'}")
    print0("config: " + json.dumps(vars(args)))

    # ---------------------------------------------------------------- model, optimizer
    model, wrapped = load_for_training(resume or args.model, args, d, compute, partial(configure, args=args),
                                       weights=resume is None)
    groups = param_groups(model, args)            # after sharding: FSDP2 replaces the parameters with shards
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay,
                                  fused=d.device.type == "cuda" or None)
    start = resume_optimizer(resume, wrapped, optimizer, {g["name"]: g["lr"] for g in groups})

    # ---------------------------------------------------------------- this rank's batches
    schedule = rank_schedule(lengths, micro, world, accum, d.rank, args.seed, per_epoch, start, total,
                             group_by_length=not args.no_group_by_length)
    pad_id = 0 if processor.image_token_id != 0 else 1
    batches = loader(dataset, schedule, partial(collate, pack=pack, pad_id=pad_id), args.workers, d.device)

    # ---------------------------------------------------------------- loop
    metrics = Metrics(os.path.join(args.out, "metrics.jsonl"), d, resume_step=start)
    skips, guard, timer, t0 = Skips(d), Guard(total, args.save_every, resume), Timer(), time.time()
    speed = Speed(model, d)
    loss = float("nan")
    bar = tqdm(total=total, initial=start, desc="sft", unit="step", disable=not d.main, dynamic_ncols=True)
    wrapped.train()
    for step in range(start, total):
        progress["at"] = f"step {step + 1} of {total}"
        micro_batches = [next(batches) for _ in range(accum)]
        skips.add_batches(micro_batches)

        # the loss is a mean over the whole global batch: count its supervised tokens (or samples) on all ranks
        count = "supervised" if args.loss_mean == "token" else "n"
        denominator, tokens = d.all_sum([sum(mb.get(count, 0) for mb in micro_batches),
                                         sum(mb.get("tokens", 0) for mb in micro_batches)]).tolist()

        # forward and backward of each micro-batch; DDP reduces the gradients once, after the last one
        loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
        for k, mb in enumerate(micro_batches):
            with grad_sync(wrapped, k == accum - 1):
                loss_sum += train_micro_batch(wrapped, mb, d, compute, args.loss_mean, denominator, world)

        # the step's one read from the GPU: the loss, the gradient norm, any rank's SIGTERM
        gnorm = clip_grad(model, args.clip)
        (loss,), gnorm, stop = read_step(d, loss_sum[None], gnorm, guard)
        trained = denominator > 0
        if trained:
            guard.check_finite(step + 1, loss, gnorm)      # a non-finite step is never applied

        # the update
        set_lr(optimizer, lr_factor(step, total, args.warmup_ratio, args.min_lr_ratio))
        if trained:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log, checkpoint (on schedule, or SIGTERM: then stop)
        bar.update(1)
        if not trained:                                # every sample of the step was skipped: no loss to report
            loss = float("nan")
            n_skipped = int(d.all_sum(sum(len(mb["skipped"]) for mb in micro_batches)).item())
            metrics.log({"step": step + 1, "skipped": n_skipped, "lr": optimizer.param_groups[0]["lr"]})
            if d.main:
                bar.write(f"step {step + 1}/{total} | no sample trained: all {n_skipped} skipped (see the warnings)")
        elif (step + 1) % args.log_every == 0 or step + 1 == total:
            row = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"], "gnorm": gnorm,
                   "time": time.time() - t0, **speed.of(tokens, timer.lap())}
            if args.loss_mean == "token":
                row["supervised_tokens"] = denominator
            metrics.log(row)
            if d.main:
                bar.write(step_line(row, total))
        guard.after_step(step + 1, stop, lambda step=step + 1: save(args, d, model, wrapped, optimizer, processor,
                                                                    step, save_dtype))
    bar.close()
    guard.close()

    # ---------------------------------------------------------------- save, summary
    final = resume
    if start < total:
        final = save(args, d, model, wrapped, optimizer, processor, total, save_dtype, final=True)
    metrics.close()
    skipped = skips.total()
    if d.main:
        link = link_final(args.out, final)
        png = metrics.plot(os.path.join(args.out, "loss.png"), title="SFT loss")
        print(f"done: {total - start} steps in {time.time() - t0:.0f}s, final loss {loss:.4f}; model {link}"
              + (f"; {png}" if png else ""))
        if any(skipped.values()):
            print("samples not trained on (or cut): " + ", ".join(f"{k}: {v}" for k, v in skipped.items() if v))
    d.close()
    return 0


# ------------------------------------------------------------------------------------------------ helpers

class Speed:
    """Throughput of a step: tokens per second, and on CUDA the peak memory and the model FLOPs utilisation (6 FLOPs
    per parameter per token, the embedding excluded, against the GPU's dense bf16 peak)."""

    def __init__(self, model, d):
        self.d, self.peak = d, peak_flops(d.device)
        self.flops_per_token = 6 * sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)

    def of(self, tokens, seconds):
        out = {"tok_s": tokens / seconds}
        if self.d.device.type == "cuda":
            out["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if self.peak:
                out["mfu"] = self.flops_per_token * tokens / seconds / (self.peak * self.d.world)
        return out


def step_line(row, total):
    """The one-line log of a step."""
    line = (f"step {row['step']}/{total} | loss {row['loss']:.4f} | lr {row['lr']:.1e} | gnorm {row['gnorm']:.2f} | "
            f"tok/s {row['tok_s']:,.0f}")
    if "mem_gib" in row:
        line += f" | mem {row['mem_gib']:.1f}GiB"
    if "mfu" in row:
        line += f" | mfu {100 * row['mfu']:.1f}%"
    return line


def configure(model, args):
    """Which parts train (before sharding: FSDP2 needs to know), and activation checkpointing."""
    if args.freeze_vision:
        model.vision_tower.requires_grad_(False)
    if args.freeze_projector:
        model.multi_modal_projector.requires_grad_(False)
        model.image_newline.requires_grad_(False)
    model.freeze_unused()
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def run_fields(args, global_size, total, compute, pack):
    """What this run's outputs depend on (OUT/manifest.json): a rerun resumes only when they match."""
    flags = ("ratios", "max_len", "overlong", "template", "no_group_by_length", "lr", "vision_lr", "projector_lr",
             "freeze_vision", "freeze_projector", "weight_decay", "warmup_ratio", "min_lr_ratio", "clip", "seed")
    fields = {"stage": "sft", "model": model_id(args.model), "data": [file_id(f) for f in args.data],
              "global_batch": global_size, "steps": total, "compute": str(compute), "pack": pack,
              "flags": {k: getattr(args, k) for k in flags}}
    if args.loss_mean != "token":                  # (absent by default: the manifests of earlier runs still match)
        fields["flags"]["loss_mean"] = args.loss_mean
    return fields


def forward(wrapped, mb, d):
    """(per-token log-probs, the batch on the device) of one micro-batch through the wrapped model's own forward
    (DDP's rule: a loss computed on the unwrapped model never reduces its gradients)."""
    if mb["n"] == 0:         # every sample of this micro-batch was skipped: still take part in the collectives
        ids = torch.zeros(1, 1, dtype=torch.long, device=d.device)
        return wrapped(ids, targets=torch.full_like(ids, -100), keep_vision_in_graph=True), None
    to = to_device(mb, d.device)
    lp = wrapped(to["input_ids"], to.get("pixel_values"), to.get("image_sizes"), to.get("attention_mask"),
                 cu_seqlens=to.get("cu_seqlens"), max_seqlen=to.get("max_seqlen"), targets=to["targets"],
                 target_rows=to.get("target_rows"), keep_vision_in_graph=True)
    return lp, to


def train_micro_batch(wrapped, mb, d, compute, loss_mean, denominator, world):
    """Forward and backward of one micro-batch; returns its part of the step's loss (detached, on the device: read
    once per step with the others). token: -sum(log p) / the global batch's supervised tokens; sample: the sum of
    each sample's mean -log p / the global batch's samples."""
    with autocast(d, compute):
        lp, to = forward(wrapped, mb, d)
        if to is None or loss_mean == "token":
            nll = -lp.sum()
        else:
            tokens = per_sequence((to["targets"] != -100).float(), to)
            nll = -(per_sequence(lp, to) / tokens.clamp(min=1)).sum()
        loss = nll / max(denominator, 1.0)
    (loss * world).backward()
    return loss.detach()


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
    mine = {k: v for part in d.gather_objects(mine) for k, v in part.items()}
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
