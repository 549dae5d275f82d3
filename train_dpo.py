"""Stage 3b (paper section 5.2): DPO of the SFT model on its own graded samples, against the frozen SFT model.

    python train_dpo.py --model runs/sft/final --pairs runs/dpo_data/pairs.jsonl --image-root runs/syn \
        --out runs/dpo --beta 0.1 --lr 5e-6 --batch-size 8 --global-batch 8
    # the paper's recipe on 8 GPUs: lr 5e-7, beta 0.1, global batch 32, responses cut to 90 words, vision tower and
    # projector frozen; the reference precomputed, so that training holds one model
    torchrun --nproc_per_node 8 train_dpo.py --model runs/8b/sft/final --pairs runs/8b/dpo_data/pairs.jsonl \
        --image-root images --out runs/8b/dpo --fsdp --batch-size 1 --global-batch 32 --lr 5e-7 --precompute-ref \
        --grad-checkpointing --save-every 500

Loss: -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]), log-probs summed over the response
tokens, the mean over the global batch's pairs. The released pairs load as released. Checkpoints, --resume,
SIGTERM, the non-finite stop and DDP / FSDP2 work as in train_sft.py; --audit-pairs N writes the token-reward page.
Guide: docs/dpo.md.
"""

import json
import os
import time
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.cli import ArgumentParser, cli, number, progress
from common.dist import Dist, print0
from common.manifest import check_files, check_model_dir, check_out_dir, file_id, model_id
from common.metrics import Metrics, Skips, Timer
from common.schedule import lr_factor, set_lr
from data.collate import PairDataset, collate_pairs, per_sequence, truncate_words
from data.formats import load_pairs
from model import LlavaNext, Processor
from training.checkpoint import claim_run, grad_sync, link_final, load_for_training, save
from training.guard import Guard
from training.audit import audit
from training.loop import (add_run_flags, autocast, clip_grad, loader, pair_logps, precision, rank_schedule,
                           read_step, resume_optimizer, seed_all, step_plan)
from training.memory import check_fits, gpu_bytes


def parse_args(argv=None):
    ap = ArgumentParser(__doc__)
    pos, nonneg = number(int, lo=1), number(int, lo=0)
    # data
    ap.add_argument("--model", required=True, help="the SFT model: the policy's start and the frozen reference")
    ap.add_argument("--pairs", nargs="+", required=True, help="DPO pairs JSONL (dpo_data format)")
    ap.add_argument("--dev-pairs", nargs="+", default=None, help="held-out pairs for dev metrics")
    ap.add_argument("--image-root", default=".", help="image paths in the pairs are relative to this")
    ap.add_argument("--out", required=True, help="output directory: checkpoints, metrics.jsonl, rewards.png")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another run in --out (only files a training run wrote)")
    ap.add_argument("--truncate-words", type=number(float, lo=0), default=90,
                    help="responses longer than K space-separated words are cut to K (paper: 90); 0 < K <= 1: that "
                         "share of the words, at least 90; 0: no cut")
    ap.add_argument("--max-len", type=number(int, lo=2), default=6144, help="tokens per row, image tokens included")
    ap.add_argument("--template", choices=["llava", "hf"], default="llava", help="chat template (model/processor.py)")
    ap.add_argument("--pack", choices=["auto", "on", "off"], default="auto",
                    help="pack the rows into one varlen sequence (auto: on CUDA)")
    ap.add_argument("--workers", type=nonneg, default=2, help="DataLoader workers")
    # DPO
    ap.add_argument("--beta", type=number(float, above=0), default=0.1, help="DPO's KL weight (paper: 0.1)")
    ap.add_argument("--label-smoothing", type=number(float, lo=0, hi=0.49), default=0.0,
                    help="conservative DPO's label noise")
    ap.add_argument("--sft-weight", type=number(float, lo=0), default=0.0,
                    help="weight of an NLL term on the chosen (RPO)")
    ap.add_argument("--precompute-ref", action="store_true",
                    help="run the reference once over the pairs and keep its log-probs, then drop it")
    # optimisation
    ap.add_argument("--max-steps", type=pos, default=None, help="optimizer steps (default: --epochs over the pairs)")
    ap.add_argument("--epochs", type=number(float, above=0), default=1.0, help="passes over the pairs (paper: 1)")
    ap.add_argument("--batch-size", type=pos, default=1, help="pairs per micro-batch per process")
    ap.add_argument("--global-batch", type=pos, default=32,
                    help="pairs per optimizer step, which sets --grad-accum (paper: 32)")
    ap.add_argument("--grad-accum", type=pos, default=None, help="overrides --global-batch")
    ap.add_argument("--lr", type=number(float, above=0), default=5e-7, help="learning rate (paper: 5e-7)")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower (frozen by default)")
    ap.add_argument("--train-projector", action="store_true", help="train the projector (frozen by default)")
    ap.add_argument("--weight-decay", type=number(float, lo=0), default=0.0, help="AdamW decoupled weight decay")
    ap.add_argument("--warmup-ratio", type=number(float, lo=0, hi=1), default=0.03,
                    help="share of the steps with a linear warm-up (paper: 0.03)")
    ap.add_argument("--min-lr-ratio", type=number(float, lo=0, hi=1), default=0.0, help="cosine floor")
    add_run_flags(ap, "pair")
    ap.add_argument("--eval-every", type=nonneg, default=0, help="dev metrics every K steps (and at the end)")
    ap.add_argument("--log-every", type=pos, default=1, help="log every K steps")
    ap.add_argument("--audit-pairs", type=nonneg, default=0,
                    help="OUT/token_rewards.html: the implicit reward of every token of N pairs (the dev pairs if "
                         "given), and where the most negative token of each rejected chain lies")
    return ap.parse_args(argv)


def dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.0):
    """Per-pair sigmoid DPO loss and implicit rewards. pc/pr: policy log-probs of chosen / rejected responses,
    rc/rr: the reference's. Label smoothing eps: -(1 - eps) log s(z) - eps log s(-z) (conservative DPO)."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    z = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, chosen, rejected


# the sums a step's metrics are made of, divided by the step's pairs at its end (named, not addressed by position)
SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
        "logps/rejected")


def main(argv=None):
    args = parse_args(argv)
    # ---------------------------------------------------------------- init: every check before the first write
    check_model_dir(args.model)
    check_files(args.pairs, "--pairs")
    check_files(args.dev_pairs, "--dev-pairs")
    check_out_dir(args.out)
    d = Dist(args.dist_timeout)
    seed_all(args.seed)
    compute, save_dtype, pack = precision(args, d)
    check_fits(configure(LlavaNext.empty(args.model), args), d.distributed and args.fsdp, d.world, gpu_bytes(d.device),
               live_reference=not args.precompute_ref)

    # ---------------------------------------------------------------- data
    processor = Processor.from_pretrained(args.model)
    pairs, same = drop_identical(load_pairs(args.pairs), args.truncate_words)
    dev, dev_same = drop_identical(load_pairs(args.dev_pairs) if args.dev_pairs else [], args.truncate_words)
    if same or dev_same:
        print0(f"dropped {same} pairs{f' and {dev_same} dev pairs' if dev_same else ''} whose chosen equals the "
               f"rejected once cut to --truncate-words {args.truncate_words} (a zero gradient at loss ln 2)")
    dataset = PairDataset(pairs, processor, args.image_root, args.truncate_words, args.template, args.max_len)
    dev_set = PairDataset(dev, processor, args.image_root, args.truncate_words, args.template, args.max_len)
    micro, world = args.batch_size, d.world
    accum = args.grad_accum or max(1, args.global_batch // (micro * world))
    global_size, per_epoch, total = step_plan(len(pairs), micro, world, accum, args.max_steps, args.epochs, "--pairs")
    if args.grad_accum is None and global_size != args.global_batch:
        print0(f"warning: --global-batch {args.global_batch} is not a multiple of {micro} pairs x {world} processes: "
               f"each step takes {global_size} pairs")
    resume = claim_run(args, d, run_fields(args, global_size, total, compute))
    lengths = [len(p["chosen"]) + len(p["rejected"]) + len(p["question"]) for p, _ in pairs]
    print0(f"{len(pairs)} pairs | global batch {global_size} = {micro} per micro-batch x {world} processes x "
           f"{accum} accumulation | {total} steps | beta {args.beta} | truncate {args.truncate_words} words | "
           f"reference {'precomputed' if args.precompute_ref else 'live'}")
    print0("config: " + json.dumps(vars(args)))

    # ---------------------------------------------------------------- models, optimizer
    model, policy = load_for_training(resume or args.model, args, d, compute, partial(configure, args=args),
                                      weights=resume is None)
    collate = partial(collate_pairs, pack=pack, pad_id=0 if processor.image_token_id else 1)
    reference, ref_table = load_reference(args, d, compute, [dataset, dev_set], collate)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"name": "llm", "params": params, "lr": args.lr}], lr=args.lr,
                                  weight_decay=args.weight_decay, fused=d.device.type == "cuda" or None)
    start = resume_optimizer(resume, policy, optimizer, {"llm": args.lr})

    # ---------------------------------------------------------------- this rank's batches
    schedule = rank_schedule(lengths, micro, world, accum, d.rank, args.seed, per_epoch, start, total)
    batches = loader(dataset, schedule, collate, args.workers, d.device)

    # ---------------------------------------------------------------- loop
    metrics = Metrics(os.path.join(args.out, "metrics.jsonl"), d, resume_step=start)
    skips, guard, timer, t0 = Skips(d), Guard(total, args.save_every, resume), Timer(), time.time()
    if same and d.main:                                 # counted once (every rank dropped the same pairs)
        skips.counts["chosen equals rejected (dropped at load)"] = same
    bar = tqdm(total=total, initial=start, desc="dpo", unit="step", disable=not d.main, dynamic_ncols=True)
    policy.train()
    for step in range(start, total):
        progress["at"] = f"step {step + 1} of {total}"
        micro_batches = [next(batches) for _ in range(accum)]
        skips.add_batches(micro_batches)
        for mb in micro_batches:
            add_reference(mb, ref_table, d)

        # the loss is the mean over the global batch's pairs (the SFT term over its chosen tokens): counted on all ranks
        n_pairs, n_skipped, chosen_tokens = d.all_sum([
            sum(mb["n"] for mb in micro_batches), sum(len(mb["skipped"]) for mb in micro_batches),
            sum(mb.get("chosen_supervised", 0) for mb in micro_batches)]).tolist()

        # forward and backward of each micro-batch (chosen and rejected rows in one forward); DDP reduces once
        sums = torch.zeros(len(SUMS), dtype=torch.float64, device=d.device)
        for k, mb in enumerate(micro_batches):
            with grad_sync(policy, k == accum - 1):
                sums += train_micro_batch(policy, reference, mb, d, compute, args, n_pairs, chosen_tokens, world)

        # the step's one read from the GPU: the metric sums, the gradient norm, any rank's SIGTERM
        gnorm = clip_grad(model, args.clip)
        totals, gnorm, stop = read_step(d, sums, gnorm, guard)
        step_metrics = {name: v / max(n_pairs, 1.0) for name, v in zip(SUMS, totals)}
        if n_pairs > 0:
            guard.check_finite(step + 1, step_metrics["loss"], gnorm)       # a non-finite step is never applied

        # the update
        set_lr(optimizer, lr_factor(step, total, args.warmup_ratio, args.min_lr_ratio))
        if n_pairs > 0:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # log (and the dev pairs every --eval-every steps), checkpoint (on schedule, or SIGTERM: then stop)
        bar.update(1)
        lr = optimizer.param_groups[0]["lr"]
        row = {"step": step + 1, **step_metrics, "lr": lr, "gnorm": gnorm, "pairs_s": n_pairs / timer.lap(),
               "time": time.time() - t0}
        if n_skipped:
            row["skipped"] = int(n_skipped)
        if n_pairs == 0:                   # nothing trained: no loss to log (a 0 would read as a perfect step)
            row = {"step": step + 1, "skipped": int(n_skipped), "skip_reasons": step_skip_reasons(micro_batches, d),
                   "lr": lr, "time": row["time"]}
        if dev and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total:
            row.update(evaluate_pairs(policy, reference, ref_table, dev_set, collate, args, d, compute))
        if (step + 1) % args.log_every == 0 or step + 1 == total or n_pairs == 0:
            metrics.log(row)
            if d.main:
                bar.write(step_line(row, total))
        guard.after_step(step + 1, stop, lambda step=step + 1: save(args, d, model, policy, optimizer, processor,
                                                                    step, save_dtype))
    bar.close()
    guard.close()

    # ---------------------------------------------------------------- save, dev, audit, summary
    final = resume
    if start < total:
        final = save(args, d, model, policy, optimizer, processor, total, save_dtype, final=True)
    dev_metrics = evaluate_pairs(policy, reference, ref_table, dev_set, collate, args, d, compute) if dev else {}
    if dev_metrics:
        metrics.log({"step": total, **dev_metrics})
    metrics.close()
    skipped = skips.total()
    if args.audit_pairs:
        if reference is None:                        # the precomputed path dropped it: load it for the audit only
            reference = load_for_training(args.model, args, d, compute, frozen=True)[0]
        audit(policy, reference, dev_set if dev else dataset, collate, args, d, compute, processor)
    if d.main:
        link = link_final(args.out, final)
        png = metrics.plot(os.path.join(args.out, "rewards.png"), keys=("loss", "rewards/accuracy",
                                                                       "rewards/margin"), title="DPO")
        print(f"done: {total - start} steps in {time.time() - t0:.0f}s; model {link}"
              + (f"; dev {json.dumps({k: round(v, 4) for k, v in dev_metrics.items()})}" if dev_metrics else "")
              + (f"; {png}" if png else ""))
        if skipped:
            print("pairs not trained on: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()))
    d.close()
    return 0


# ------------------------------------------------------------------------------------------------ helpers

def drop_identical(pairs, k):
    """(pairs, how many were dropped): a pair whose chosen and rejected read the same once cut to k words has
    identical token rows, hence loss ln 2 and a zero gradient whatever the model does; it would only shrink the
    batch's mean gradient."""
    keep = [(p, w) for p, w in pairs if truncate_words(p["chosen"], k) != truncate_words(p["rejected"], k)]
    return keep, len(pairs) - len(keep)


def configure(model, args):
    """What trains (before sharding): the language model; the tower and projector only when asked (paper: frozen)."""
    model.vision_tower.requires_grad_(args.train_vision)
    model.multi_modal_projector.requires_grad_(args.train_projector)
    model.image_newline.requires_grad_(args.train_projector)
    model.freeze_unused()
    model.set_grad_checkpointing(args.grad_checkpointing)
    return model


def run_fields(args, global_size, total, compute):
    """What this run's outputs depend on (OUT/manifest.json): a rerun resumes only when they match."""
    flags = ("truncate_words", "max_len", "template", "beta", "label_smoothing", "sft_weight", "lr", "train_vision",
             "train_projector", "weight_decay", "warmup_ratio", "min_lr_ratio", "clip", "seed")
    return {"stage": "dpo", "model": model_id(args.model), "pairs": [file_id(f) for f in args.pairs],
            "dev_pairs": [file_id(f) for f in args.dev_pairs or []], "global_batch": global_size, "steps": total,
            "compute": str(compute), "flags": {k: getattr(args, k) for k in flags}}


def train_micro_batch(policy, reference, mb, d, compute, args, n_pairs, chosen_tokens, world):
    """Forward and backward of one micro-batch of pairs; returns its sums of the SUMS metrics (detached, float64 on
    the device: read once per step). The loss is the mean over the global batch's n_pairs; --sft-weight adds the
    NLL of the chosen answers over the global batch's chosen tokens."""
    with autocast(d, compute):
        pc, pr, lp_chosen = policy_logps(policy, mb, d)
        rc, rr = ref_logps(reference, mb, d, pc)
        losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, args.beta, args.label_smoothing)
        loss = losses.sum() / max(n_pairs, 1.0)
        if args.sft_weight:
            loss = loss + args.sft_weight * (-lp_chosen) / max(chosen_tokens, 1.0)
    (loss * world).backward()
    with torch.no_grad():
        return torch.stack([losses.sum(), r_c.sum(), r_r.sum(), (r_c > r_r).float().sum(), (r_c - r_r).sum(),
                            pc.sum(), pr.sum()]).double()


def load_reference(args, d, compute, datasets, collate):
    """(the frozen reference model, or None; the table of its log-probs, or None). With --precompute-ref the table
    (cached beside the checkpoints, or computed once over every pair, each rank a share) replaces the model while
    training; else the frozen SFT model, in the compute dtype and sharded like the policy."""
    table = cached_reference_table(args, d) if args.precompute_ref else None
    if table is not None:
        return None, table
    reference = load_for_training(args.model, args, d, compute, frozen=True)[0]
    if not args.precompute_ref:
        return reference, None
    table = reference_table(reference, datasets, collate, args, d, compute)
    del reference
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    return None, table


def add_reference(mb, table, d):
    """The precomputed reference log-probs of a batch's pairs, as mb["ref"] (2, B) on the host (pinned on CUDA, so
    the copy to the GPU does not wait); nothing without a table."""
    if table is None or mb["n"] == 0:
        return
    ref = torch.tensor([[table[i][0] for i in mb["ids"]], [table[i][1] for i in mb["ids"]]])
    mb["ref"] = ref.pin_memory() if d.device.type == "cuda" else ref


def step_skip_reasons(micro_list, d):
    """{reason: count} of this step's skipped pairs over all ranks (every rank calls it at the same step)."""
    mine = {}
    for m in micro_list:
        for reason, _ in m["skipped"]:
            mine[reason] = mine.get(reason, 0) + 1
    out = {}
    for p in d.gather_objects(mine):
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def step_line(row, total):
    """The one-line log of a step; a step whose pairs were all skipped says so, and why, instead of a loss."""
    if "loss" not in row:
        why = ", ".join(f"{k}: {v}" for k, v in row["skip_reasons"].items())
        return (f"step {row['step']}/{total} | no pair trained: all {row['skipped']} skipped ({why}) | "
                f"lr {row['lr']:.1e}")
    return (f"step {row['step']}/{total} | loss {row['loss']:.4f} | acc {row['rewards/accuracy']:.2f} | margin "
            f"{row['rewards/margin']:.3f} | chosen {row['rewards/chosen']:+.3f} | rejected "
            f"{row['rewards/rejected']:+.3f} | lr {row['lr']:.1e} | pairs/s {row['pairs_s']:.1f}"
            + (f" | skipped {row['skipped']}" if row.get("skipped") else ""))


def policy_logps(policy, mb, d):
    """(chosen sums, rejected sums, summed log-prob of all chosen tokens) for one micro-batch."""
    if mb["n"] == 0:                                   # nothing here: still take part in the collectives
        ids = torch.zeros(1, 1, dtype=torch.long, device=d.device)
        lp = policy(ids, targets=torch.full_like(ids, -100), keep_vision_in_graph=True)
        z = lp.sum()
        return z[None][:0], z[None][:0], z
    to, lp = pair_logps(policy, mb, d)
    seq = per_sequence(lp, to)
    B = mb["n"]
    return seq[:B], seq[B:], seq[:B].sum()


def ref_logps(reference, mb, d, like):
    """(reference log p(chosen), log p(rejected)) of a micro-batch: precomputed (mb["ref"], add_reference) or from
    the frozen reference model. `like`: a tensor of the policy's, for the empty batch's shape and dtype."""
    if mb["n"] == 0:
        if "ref" not in mb and reference is not None:   # a sharded reference needs every rank in every forward
            with torch.no_grad():
                policy_logps(reference, mb, d)
        return like, like
    if "ref" in mb:
        ref = mb["ref"].to(like.device, dtype=like.dtype, non_blocking=True)
        return ref[0], ref[1]
    with torch.no_grad():
        to, lp = pair_logps(reference, mb, d)
        seq = per_sequence(lp, to)
    return seq[:mb["n"]], seq[mb["n"]:]


def reference_key(args):
    """What the reference log-probs depend on: the reference's weight files (not its path: a symlink may be
    re-pointed), the pair files, the truncation (the rule, named, and its limit) and the template; and how the table
    names its pairs (by file and line), so that a table of an older naming is never read."""
    return [model_id(args.model), "paper-cut", args.truncate_words, args.template, "pairs by file:line"] + [
        file_id(f) for f in args.pairs + (args.dev_pairs or [])]


def cached_reference_table(args, d):
    """The reference log-probs an earlier run with the same model, pairs and settings computed, or None (when any
    rank lacks them: all ranks must then compute together)."""
    path = os.path.join(args.out, "reference_logps.pt")
    cached = torch.load(path, weights_only=True) if os.path.exists(path) else {}
    hit = cached.get("key") == json.loads(json.dumps(reference_key(args)))
    if d.all_sum(not hit).item() > 0:
        return None
    print0(f"reference log-probs from {path}")
    return cached["table"]


def reference_table(reference, datasets, collate, args, d, compute):
    """{pair key (file:line): (ref log p(chosen), ref log p(rejected))} over every pair, computed once (each rank a share,
    gathered) and cached beside the checkpoints; a rerun with the same pairs and settings reuses it."""
    path = os.path.join(args.out, "reference_logps.pt")
    mine = {}
    for ds in datasets:
        for mb in tqdm(shares(ds, collate, args, d), desc="reference log-probs", disable=not d.main,
                       dynamic_ncols=True):
            with torch.no_grad(), autocast(d, compute):
                rc, rr = ref_logps(reference, mb, d, torch.zeros(0))
            for pid, c, r in zip(mb["ids"], rc.tolist(), rr.tolist()):
                mine[pid] = (c, r)
    table = {k: v for part in d.gather_objects(mine) for k, v in part.items()}     # each rank computed its share
    if d.main:
        torch.save({"key": reference_key(args), "table": table}, path + ".tmp")
        os.replace(path + ".tmp", path)
    d.barrier()
    return table


def shares(dataset, collate, args, d):
    """This rank's share of a dataset in batches, padded with empty batches so that every rank runs the same number
    of forwards (a sharded model needs all ranks in each one)."""
    idx = list(range(d.rank, len(dataset), d.world))
    batches = [idx[i:i + args.batch_size] for i in range(0, len(idx), args.batch_size)]
    steps = int(d.all_max(len(batches)).item())
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                              num_workers=args.workers))
    for _ in range(steps):
        yield next(loader, {"n": 0, "ids": [], "skipped": []})


DEV = ("dev/loss", "dev/accuracy", "dev/margin", "dev/rewards_chosen", "dev/rewards_rejected")


def evaluate_pairs(policy, reference, table, dataset, collate, args, d, compute):
    """Dev metrics with no gradient: loss, reward accuracy and margin, mean rewards (read once, at the end)."""
    policy.eval()
    sums, n = torch.zeros(len(DEV), dtype=torch.float64, device=d.device), 0
    for mb in shares(dataset, collate, args, d):
        add_reference(mb, table, d)
        with torch.no_grad(), autocast(d, compute):
            pc, pr, _ = policy_logps(policy, mb, d)
            rc, rr = ref_logps(reference, mb, d, pc)
            losses, r_c, r_r = dpo_loss(pc, pr, rc, rr, args.beta, args.label_smoothing)
        sums += torch.stack([losses.sum(), (r_c > r_r).float().sum(), (r_c - r_r).sum(), r_c.sum(),
                             r_r.sum()]).double()
        n += mb["n"]
    policy.train()
    *values, total = d.all_sum(torch.cat([sums, torch.full((1,), float(n), dtype=torch.float64,
                                                           device=d.device)])).tolist()
    return {name: v / max(total, 1.0) for name, v in zip(DEV, values)}


if __name__ == "__main__":
    cli(main)
