"""Stage 3a (paper section 5.1): sample CoT answers from the SFT model, grade them, and build DPO pairs.

    python sample.py --model runs/sft/final --data runs/syn/train.jsonl --image-root runs/syn --num-samples 12 \
        --temperature 1.0 --out runs/dpo_data/pairs.jsonl
    torchrun --nproc_per_node 8 sample.py --model runs/8b/sft/final --data chartqa_train.jsonl aokvqa_train.jsonl \
        --image-root images --num-samples 32 --temperature 1.0 --out runs/8b/dpo_data/pairs.jsonl

N CoT answers per question from one shared prefill, each graded by its extracted answer; questions whose sample
accuracy lies in [--min-acc, --max-acc] (paper: 0.25-0.85) give up to --pairs-per-question (correct, incorrect)
pairs. Out: PAIRS (the released dpo_data format), PAIRS.rft.jsonl (the chosen answers as SFT rows, for the RFT
baseline), PAIRS.questions.jsonl (a line per question). The same files for any number of processes; a rerun of the
same command continues where a killed one stopped. Guide: docs/dpo.md.
"""

import json
import os
import random
import re
import zlib

from tqdm import tqdm

from common.cli import ArgumentParser, UserError, add_dist_timeout, cli, number, progress
from common.dist import Dist, dtype_of, print0
from common.manifest import check_files, check_model_dir, check_out_dir, claim, file_id, model_id
from data.answers import grade
from data.formats import Appender, load_qa, read_jsonl, repair_tail
from data.prompts import model_prompt
from data.tasks import checkable, steps_correct
from model import LlavaNext, Processor
from model.generation import left_pad


def parse_args(argv=None):
    ap = ArgumentParser(__doc__)
    pos = number(int, lo=1)
    ap.add_argument("--model", required=True, help="the SFT model (Hugging Face directory)")
    ap.add_argument("--data", nargs="+", required=True, help="QA record JSONL file(s)")
    ap.add_argument("--image-root", default=".", help="image paths in the records are relative to this")
    ap.add_argument("--out", required=True, help="pairs JSONL (dpo_data format); side files are written beside it")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another sampling run at --out (only files sampling wrote)")
    ap.add_argument("--num-samples", type=pos, default=32, help="CoT samples per question (paper: 32)")
    ap.add_argument("--temperature", type=number(float, lo=0), default=1.0, help="sampling temperature (paper: 1)")
    ap.add_argument("--top-p", type=number(float, above=0, hi=1), default=1.0, help="nucleus sampling mass")
    ap.add_argument("--max-new-tokens", type=pos, default=512, help="a sample that has not ended by then is wrong")
    ap.add_argument("--min-acc", type=number(float, lo=0, hi=1), default=0.25,
                    help="keep questions whose sample accuracy is >= this (paper: 0.25)")
    ap.add_argument("--max-acc", type=number(float, lo=0, hi=1), default=0.85, help="... and <= this (paper: 0.85)")
    ap.add_argument("--pairs-per-question", type=pos, default=3, help="(correct, incorrect) pairs per kept question")
    ap.add_argument("--grade", choices=["outcome", "steps"], default="outcome",
                    help="outcome: a sample is correct when its final answer is (the paper); steps: only when every "
                         "step of its rationale checks against the chart too (the synthetic task, whose records "
                         "carry the chart's data; data.synthetic.steps_correct)")
    ap.add_argument("--dev-share", type=number(float, lo=0, hi=0.5), default=0.0,
                    help="the pairs of this share of the questions (drawn by --seed) go to PAIRS.dev.jsonl instead, "
                         "held out for train_dpo.py --dev-pairs")
    ap.add_argument("--limit", type=pos, default=None, help="first N records")
    ap.add_argument("--batch-size", type=pos, default=8, help="questions per generate call (x --num-samples each)")
    ap.add_argument("--template", choices=["llava", "hf"], default="llava", help="chat template (model/processor.py)")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--seed", type=int, default=0, help="each question samples from its own stream seeded by this")
    add_dist_timeout(ap)
    args = ap.parse_args(argv)
    if args.min_acc > args.max_acc:
        ap.error(f"--min-acc {args.min_acc} is above --max-acc {args.max_acc}")
    return args


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


SUFFIXES = {"pairs": "", "rft": ".rft", "questions": ".questions"}


def part_paths(base, rank):
    """This rank's part files: every process appends to its own; rank 0 merges them all at the end."""
    return {k: f"{base}{suffix}.rank{rank}.jsonl" for k, suffix in SUFFIXES.items()}


def existing_ranks(base):
    folder, name = os.path.split(os.path.abspath(base))
    pattern = re.compile(re.escape(name) + r"\.questions\.rank(\d+)\.jsonl$")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(m.group(1)) for f in names if (m := pattern.match(f)))


def main(argv=None):
    args = parse_args(argv)
    check_model_dir(args.model)
    check_files(args.data, "--data")
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; give the pairs file to write, e.g. {args.out}/pairs.jsonl")
    check_out_dir(os.path.dirname(args.out) or ".")
    d = Dist(args.dist_timeout)
    records = load_qa(args.data)
    records = records[:args.limit] if args.limit else records
    if args.grade == "steps" and any(not checkable(r) for r in records):
        raise UserError("--grade steps needs synthetic records with their chart data (meta); "
                        f"{sum(not checkable(r) for r in records)} of {len(records)} records have none")
    dtype = dtype_of(args.dtype, d.device)

    # ---------------------------------------------------------------- outputs: claimed, repaired, what is done
    base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    ranks = existing_ranks(base)
    created = [args.out, f"{base}.rft.jsonl", f"{base}.questions.jsonl", f"{base}.dev.jsonl"] + [
        p for r in ranks for p in part_paths(base, r).values()]
    fields = {"stage": "sample", "model": model_id(args.model), "data": [file_id(f) for f in args.data],
              "dtype": str(dtype), "flags": {k: getattr(args, k) for k in (
                  "num_samples", "temperature", "top_p", "max_new_tokens", "min_acc", "max_acc",
                  "pairs_per_question", "template", "seed", "dev_share", "grade")}}
    claim(f"{base}.manifest.json", fields, created, args.overwrite, act=False)
    d.barrier()
    if d.main:
        claim(f"{base}.manifest.json", fields, created, args.overwrite)
        ranks = existing_ranks(base)
    # a kill leaves half lines and rows whose question has no log line yet: each part is repaired by its rank (rank 0
    # takes the parts of ranks an earlier, larger run had), then every rank reads every part's log: a question done
    # by any earlier run, with any number of processes, is not sampled again
    for r in [d.rank] + ([r for r in ranks if r >= d.world] if d.main else []):
        paths = part_paths(base, r)
        repair_tail(paths["questions"])
        drop_orphans(paths, logged(paths["questions"]))
    d.barrier()
    done = set().union(*(logged(part_paths(base, r)["questions"]) for r in existing_ranks(base)))
    writers = {k: Appender(p) for k, p in part_paths(base, d.rank).items()}

    # ---------------------------------------------------------------- model
    model = LlavaNext.from_pretrained(args.model, dtype=dtype, device=d.device).eval()
    proc = Processor.from_pretrained(args.model)
    eos = set(model.eos_token_ids)
    special = {proc.image_token_id} | {i for i in (proc.tokenizer.token_to_id(t) for t in (
        "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>")) if i is not None}

    # ---------------------------------------------------------------- sample
    # every question samples from its own seeded stream, and batches are fixed slices of all the questions, done or
    # not, dealt to the processes in turn: a question shares its generate call with the same questions (the same
    # left padding, the same shapes) whatever the number of processes, and a resumed run regenerates a half-done
    # batch whole (writing only its new questions), so even the rounding that depends on the batch stays the same
    n = args.num_samples
    batches = [records[b:b + args.batch_size] for b in range(0, len(records), args.batch_size)][d.rank::d.world]
    mine = [r for batch in batches for r in batch]
    todo = sum(str(r["id"]) not in done for r in mine)
    print0(f"{len(records)} questions ({len(done)} done before), {d.world} process(es); this rank: {todo} to sample "
           f"({n} CoT samples each at T={args.temperature})")
    stats = {"kept": 0, "too easy": 0, "too hard": 0, "pairs": 0, "bad image": 0, "dropped samples": 0}
    bar = tqdm(total=todo, desc="sample", unit="q", disable=not d.main, dynamic_ncols=True)
    progress["then"] = "rerun the same command to continue (finished questions are kept)"
    for b, batch in enumerate(batches):
        if all(str(r["id"]) in done for r in batch):
            continue
        progress["at"] = f"batch {b + 1} of {len(batches)} on rank {d.rank}"
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
                             top_p=args.top_p, n=n,
                             seed=[question_seed(args.seed, r["id"]) for r in chunk]).tolist()
        for k, rec in enumerate(chunk):
            if str(rec["id"]) not in done:
                grade_question(rec, out[k * n:(k + 1) * n], proc, eos, special, args, writers, stats)
                bar.update(1)
    bar.close()
    for w in writers.values():
        w.close()
    d.barrier()
    if d.main:
        merge(args.out, base, records, args.dev_share, args.seed)
        summarize(args.out, base, stats, args.grade)
    d.close()
    return 0


def logged(path):
    """Question ids with a line in a question log."""
    return {str(q["id"]) for _, q in read_jsonl(path)} if os.path.exists(path) else set()


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


def grade_question(rec, samples, proc, eos, special, args, writers, stats):
    """Grade one question's samples, window it by accuracy, write its pairs, RFT rows and log line. The accuracy is
    over all N samples, as the paper grades them: a sample that never stops (or holds an image / control token)
    counts as wrong, but is never a rejected answer, since it is cut off rather than wrong in its reasoning. With
    --grade steps a right answer reached through a wrong step is an incorrect sample (a possible rejected answer)."""
    correct, incorrect, wrong_steps, dropped = [], [], 0, 0
    for row in samples:
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        if stop is None or any(t in special for t in row[:stop]):
            dropped += 1                                   # unfinished, or holding an image / control token
            continue
        text = proc.decode(row[:stop])
        _, s, found = grade(rec, text)
        right = found and s >= 1.0
        bad_steps = right and checkable(rec) and not steps_correct(rec, text)
        wrong_steps += bad_steps
        if right and not (bad_steps and args.grade == "steps"):
            correct.append(text)
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
                                  "source_id": rec["id"], **({"meta": rec["meta"]} if checkable(rec) else {})}
                                 for k, (c, r) in enumerate(pairs)])
        writers["rft"].write(*[{"id": f"{rec['id']}-rft{k}", "image": rec.get("image"),
                                "conversations": [{"from": "human", "value": model_prompt(rec, "cot")},
                                                  {"from": "gpt", "value": c}]}
                               for k, c in enumerate(dict.fromkeys(c for c, _ in pairs))])
    stats[status] = stats.get(status, 0) + 1
    stats["pairs"] += len(pairs)
    writers["questions"].write({"id": rec["id"], "status": status, "accuracy": acc, "samples": len(samples),
                                "graded": graded, "correct": len(correct), "dropped": dropped, "pairs": len(pairs),
                                "correct_with_wrong_steps": wrong_steps})


def merge(out, base, records, dev_share=0.0, seed=0):
    """Every part file (of this run and of earlier ones, whatever their process count) -> one file each, in question
    order: the same files one uninterrupted process writes. With dev_share, the pairs of that share of the questions
    (drawn by seed) go to PAIRS.dev.jsonl, and their RFT rows nowhere. Written to temporary files, then renamed."""
    order = {r["id"]: i for i, r in enumerate(records)}
    ranks = existing_ranks(base)

    def dev(qid):
        return dev_share > 0 and question_seed(seed + 2, qid) % 10_000 < dev_share * 10_000

    def question(row, name):
        return str(row.get("source_id") or row["id"]) if name == "pairs" else str(row["id"]).rsplit("-rft", 1)[0]

    outputs = {}
    for name, suffix in SUFFIXES.items():
        rows = []
        for r in ranks:
            p = part_paths(base, r)[name]
            if os.path.exists(p):
                rows += [row for _, row in read_jsonl(p)]
        rows.sort(key=lambda row: (order.get(question(row, name), 0), str(row["id"])))
        target = out if name == "pairs" else f"{base}{suffix}.jsonl"
        if name == "pairs" and dev_share > 0:
            outputs[f"{base}.dev.jsonl"] = [row for row in rows if dev(question(row, name))]
        outputs[target] = rows if name == "questions" else [row for row in rows if not dev(question(row, name))]
    for target, rows in outputs.items():
        with open(target + ".tmp", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(target + ".tmp", target)


def summarize(out, base, stats, grade="outcome"):
    qs = [q for _, q in read_jsonl(f"{base}.questions.jsonl")] if os.path.exists(f"{base}.questions.jsonl") else []
    n_correct = sum(q.get("correct", 0) for q in qs if q.get("status") == "kept")
    wrong = sum(q.get("correct_with_wrong_steps", 0) for q in qs if q.get("status") == "kept")
    by = {s: sum(1 for q in qs if q.get("status") == s) for s in ("kept", "too easy", "too hard", "no pair")}
    pairs = sum(q.get("pairs", 0) for q in qs)
    dev = sum(1 for _ in open(f"{base}.dev.jsonl")) if os.path.exists(f"{base}.dev.jsonl") else 0
    print(f"questions: {len(qs)} | kept {by['kept']} | too easy {by['too easy']} | too hard {by['too hard']} | "
          + (f"in the window but no pair {by['no pair']} | " if by["no pair"] else "")
          + f"pairs {pairs} -> {out}" + (f" ({dev} held out in {base}.dev.jsonl)" if dev else ""))
    unfinished, n = sum(q.get("dropped", 0) for q in qs), sum(q.get("samples", 0) for q in qs)
    if unfinished:
        print(f"unfinished samples (no stop token within --max-new-tokens, or an image / control token): {unfinished}"
              f"{f' of {n}' if n else ''}; graded wrong, never used as rejected answers")
    if wrong:
        right = n_correct + (wrong if grade == "steps" else 0)     # under --grade steps they were graded incorrect
        print(f"samples with the right answer and a wrong step (kept questions): {wrong} of {right} "
              f"({100 * wrong / max(right, 1):.0f}%)" + ("; graded incorrect" if grade == "steps" else ""))


if __name__ == "__main__":
    cli(main)
