"""Stage 3a (paper §5.1): sample CoT answers from the SFT model, grade them, and build DPO pairs.

    python sample.py --model runs/sft/final --data runs/syn/train.jsonl --image-root runs/syn --n 32 \\
        --temperature 1.0 --out runs/dpo/pairs.jsonl
    torchrun --nproc_per_node 8 sample.py --model runs/sft/final --data chartqa_train.jsonl aokvqa_train.jsonl \\
        --image-root images --n 32 --out runs/dpo/pairs.jsonl

For each question: N CoT answers at temperature T from ONE shared prefill (model.generate(n=N)), each graded by its
extracted answer under the dataset's metric; questions whose sample accuracy lies in [--min-acc, --max-acc]
(paper: 0.25-0.85) give up to --pairs-per-question (correct, incorrect) pairs, drawn at random with a seed per
question. Out: PAIRS in the released dpo_data format ({"id", "image", "question", "chosen", "rejected"} + the
sampled accuracy), PAIRS.rft.jsonl (the chosen answers as SFT rows: the rejection-sampling baseline), and
PAIRS.questions.jsonl (one line per question: accuracy, kept or why not; for the synthetic task also how many
"correct" samples hold a wrong step). Resumable: a rerun skips questions already sampled. Under torchrun each rank
samples every world-th question into its own part files; rank 0 merges them in question order.
"""

import argparse
import json
import os
import random
import sys
import zlib

from tqdm import tqdm

from common import Dist, dtype_of, print0
from data.answers import grade
from data.formats import Appender, FormatError, load_qa, read_jsonl, repair_tail
from data.prompts import model_prompt
from model.generation import left_pad


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the SFT model (Hugging Face directory)")
    ap.add_argument("--data", nargs="+", required=True, help="QA record JSONL file(s)")
    ap.add_argument("--image-root", default=".")
    ap.add_argument("--out", required=True, help="pairs JSONL (dpo_data format)")
    ap.add_argument("--n", type=int, default=32, help="CoT samples per question")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--min-acc", type=float, default=0.25, help="keep questions with sample accuracy >= this")
    ap.add_argument("--max-acc", type=float, default=0.85, help="... and <= this")
    ap.add_argument("--pairs-per-question", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="first N records")
    ap.add_argument("--batch-size", type=int, default=8, help="questions per generate call (x n samples each)")
    ap.add_argument("--template", choices=["llava", "hf"], default="llava")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def question_seed(seed, qid):
    return zlib.crc32(f"{seed}/{qid}".encode())


def build_pairs(correct, incorrect, cap, rng):
    """Up to `cap` distinct (correct, incorrect) pairs at random: chosen and rejected drawn without repeats while
    both lists last, then combinations. Never two correct (or two incorrect) answers in a pair."""
    correct, incorrect = list(dict.fromkeys(correct)), list(dict.fromkeys(incorrect))
    rng.shuffle(correct)
    rng.shuffle(incorrect)
    combos = [(c, i) for c in range(len(correct)) for i in range(len(incorrect))]
    combos.sort(key=lambda ci: (max(ci), ci[0] != ci[1]))      # (0,0), (1,1), ... first: distinct answers first
    return [(correct[c], incorrect[i]) for c, i in combos[:cap]]


def pair_question(rec):
    """The question field of a pair: the human turn without its image tag (the loader adds it back)."""
    return model_prompt(rec, "cot").replace("<image>\n", "", 1)


def main(argv=None):
    args = parse_args(argv)
    d = Dist()
    try:
        records = load_qa(args.data)
    except (FormatError, OSError) as e:
        raise SystemExit(f"error: {e}")
    records = records[:args.limit] if args.limit else records
    from model import LlavaNext, Processor
    model = LlavaNext.from_pretrained(args.model, dtype=dtype_of(args.dtype, d.device), device=d.device).eval()
    proc = Processor.from_pretrained(args.model)
    eos = set(model.eos_token_ids)
    special = {proc.image_token_id} | {i for i in (proc.tokenizer.token_to_id(t) for t in (
        "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>")) if i is not None}

    base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    part = f".rank{d.rank}" if d.distributed else ""
    paths = {"pairs": f"{base}{part}.jsonl" if part else args.out, "rft": f"{base}.rft{part}.jsonl",
             "questions": f"{base}.questions{part}.jsonl"}
    if not os.path.exists(paths["questions"]):            # a half-run without its question log starts over
        for p in (paths["pairs"], paths["rft"]):
            if os.path.exists(p):
                os.remove(p)
    repair_tail(paths["questions"])
    done = {str(q["id"]) for _, q in read_jsonl(paths["questions"])} if os.path.exists(paths["questions"]) else set()
    drop_orphans(paths, done)
    writers = {k: Appender(p) for k, p in paths.items()}
    # every question samples from its own seeded stream, so its samples do not depend on the batch or the number of
    # processes; batches are still fixed slices of this rank's questions, done or not, and a resumed run regenerates
    # a half-done batch whole (writing only its new questions), so even bf16's batch-shape rounding stays the same
    mine = [r for i, r in enumerate(records) if i % d.world == d.rank]
    todo = sum(str(r["id"]) not in done for r in mine)
    print0(f"{len(records)} questions, {d.world} process(es); this rank: {todo} to sample "
           f"({args.n} CoT samples each at T={args.temperature})")
    stats = {"kept": 0, "too easy": 0, "too hard": 0, "pairs": 0, "bad image": 0, "dropped samples": 0}
    bar = tqdm(total=todo, desc="sample", unit="q", disable=not d.main, dynamic_ncols=True)
    for b in range(0, len(mine), args.batch_size):
        batch = mine[b:b + args.batch_size]
        if all(str(r["id"]) in done for r in batch):
            continue
        chunk, images = [], []
        for rec in batch:
            img = None
            if rec.get("image"):
                try:
                    img = proc.load_image(os.path.join(args.image_root, rec["image"]))
                except (OSError, ValueError) as e:
                    if str(rec["id"]) not in done:
                        writers["questions"].write({"id": rec["id"], "status": f"image: {e}"})
                        stats["bad image"] += 1
                        bar.update(1)
                    continue
            chunk.append((rec, int(img is not None)))
            images += [img] if img else []
        if not chunk:
            continue
        pv, sizes = proc.preprocess_images(images)            # every image once; each prompt takes its own size
        prompts, k = [], 0
        for rec, n_img in chunk:
            prompts.append(proc.tokenize([{"from": "human", "value": model_prompt(rec, "cot")}], sizes[k:k + n_img],
                                         template=args.template, add_generation_prompt=True)[0])
            k += n_img
        chunk = [rec for rec, _ in chunk]
        ids, mask = left_pad(prompts, pad_id=0)
        out = model.generate(ids.to(d.device), pv.to(d.device) if images else None, sizes if images else None,
                             mask.to(d.device), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_p=args.top_p, n=args.n,
                             seed=[question_seed(args.seed, r["id"]) for r in chunk]).tolist()
        for k, rec in enumerate(chunk):
            if str(rec["id"]) not in done:
                handle(rec, out[k * args.n:(k + 1) * args.n], proc, eos, special, args, writers, stats)
                bar.update(1)
    bar.close()
    for w in writers.values():
        w.close()
    d.barrier()
    if d.distributed and d.main:
        merge(args.out, base, d.world, records)
    if d.main:
        summarize(args.out, base, stats)
    d.close()
    return 0


def drop_orphans(paths, done):
    """A question's pairs and RFT rows are written before its log line: rows of a question whose log line a kill cut
    off are dropped here, since the resumed run writes them again."""
    for key, source in (("pairs", lambda r: r.get("source_id") or r["id"].rsplit("-p", 1)[0]),
                        ("rft", lambda r: r["id"].rsplit("-rft", 1)[0])):
        path = paths[key]
        if not os.path.exists(path):
            continue
        repair_tail(path)
        lines = open(path).readlines()
        keep = [line for line in lines if line.strip() and str(source(json.loads(line))) in done]
        if len(keep) < len(lines):
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)


def handle(rec, samples, proc, eos, special, args, writers, stats):
    """Grade one question's samples, window it by accuracy, write its pairs, RFT rows and log line. The accuracy is
    over all N samples, as the paper grades them: a sample that never stops (or holds an image / control token)
    counts as wrong, but is never a rejected answer, since it is cut off rather than wrong in its reasoning."""
    correct, incorrect, wrong_steps, dropped = [], [], 0, 0
    for row in samples:
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        if stop is None or any(t in special for t in row[:stop]):
            dropped += 1                                   # unfinished, or holding an image / control token
            continue
        text = proc.decode(row[:stop])
        _, s, found = grade(rec, text)
        if found and s >= 1.0:
            correct.append(text)
            if rec["dataset"] == "synthetic" and "meta" in rec:
                from data.synthetic import steps_correct
                wrong_steps += not steps_correct(rec, text)
        else:
            incorrect.append(text)
    graded = len(correct) + len(incorrect)
    acc = len(correct) / len(samples) if samples else 0.0
    stats["dropped samples"] += dropped
    status = "too easy" if acc > args.max_acc else "too hard" if acc < args.min_acc else \
        "kept" if correct and incorrect else "no pair"     # in the window, but every wrong sample is unfinished
    pairs = []
    if status == "kept":
        rng = random.Random(question_seed(args.seed + 1, rec["id"]))
        pairs = build_pairs(correct, incorrect, args.pairs_per_question, rng)
        q = pair_question(rec)
        writers["pairs"].write(*[{"id": f"{rec['id']}-p{k}", "image": rec.get("image"), "question": q, "chosen": c,
                                  "rejected": r, "accuracy": acc, "dataset": rec["dataset"], "answers": rec["answers"],
                                  "source_id": rec["id"]} for k, (c, r) in enumerate(pairs)])
        writers["rft"].write(*[{"id": f"{rec['id']}-rft{k}", "image": rec.get("image"),
                                "conversations": [{"from": "human", "value": model_prompt(rec, "cot")},
                                                  {"from": "gpt", "value": c}]}
                               for k, c in enumerate(dict.fromkeys(c for c, _ in pairs))])
    stats[status] = stats.get(status, 0) + 1
    stats["pairs"] += len(pairs)
    writers["questions"].write({"id": rec["id"], "status": status, "accuracy": acc, "samples": len(samples),
                                "graded": graded, "correct": len(correct), "dropped": dropped, "pairs": len(pairs),
                                "correct_with_wrong_steps": wrong_steps})


def merge(out, base, world, records):
    """Rank part files -> one file each, in question order (the same file one process would have written)."""
    order = {r["id"]: i for i, r in enumerate(records)}
    for name, suffix in (("pairs", ""), ("rft", ".rft"), ("questions", ".questions")):
        rows = []
        for r in range(world):
            p = f"{base}{suffix}.rank{r}.jsonl"
            if os.path.exists(p):
                rows += [row for _, row in read_jsonl(p)]
        key = "source_id" if name == "pairs" else "id"
        rows.sort(key=lambda row: (order.get(str(row.get(key, "")).rsplit("-rft", 1)[0], 0), str(row["id"])))
        target = out if name == "pairs" else f"{base}{suffix}.jsonl"
        with open(target, "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def summarize(out, base, stats):
    qs = [q for _, q in read_jsonl(f"{base}.questions.jsonl")] if os.path.exists(f"{base}.questions.jsonl") else []
    n_correct = sum(q.get("correct", 0) for q in qs if q.get("status") == "kept")
    wrong = sum(q.get("correct_with_wrong_steps", 0) for q in qs if q.get("status") == "kept")
    by = {s: sum(1 for q in qs if q.get("status") == s) for s in ("kept", "too easy", "too hard", "no pair")}
    pairs = sum(q.get("pairs", 0) for q in qs)
    print(f"questions: {len(qs)} | kept {by['kept']} | too easy {by['too easy']} | too hard {by['too hard']} | "
          + (f"in the window but no pair {by['no pair']} | " if by["no pair"] else "")
          + f"pairs {pairs} -> {out}")
    unfinished, n = sum(q.get("dropped", 0) for q in qs), sum(q.get("samples", 0) for q in qs)
    if unfinished:
        print(f"unfinished samples (no stop token within --max-new-tokens, or an image / control token): {unfinished}"
              f"{f' of {n}' if n else ''}; graded wrong, never used as rejected answers")
    if wrong:
        print(f"outcome-correct samples with a wrong step (kept questions): {wrong} of {n_correct} "
              f"({100 * wrong / max(n_correct, 1):.0f}%)")


if __name__ == "__main__":
    sys.exit(main())
