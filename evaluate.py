"""Stage 4 (paper section 6): evaluate a model in direct and CoT modes with each benchmark's own metric.

    python evaluate.py --model runs/sft/final --data runs/syn/test.jsonl runs/syn/test_holdout.jsonl \
        --image-root runs/syn --mode both --out runs/eval/sft
    # the paper's 8 benchmarks in one table (convert their files first: python -m data.convert NAME ...); one
    # --image-root for all files or one per file, in order
    torchrun --nproc_per_node 8 evaluate.py --model runs/8b/dpo/final --mode both --out eval/8b_dpo \
        --data eval/chartqa_human.jsonl eval/docvqa.jsonl ... --image-root ChartQA/test DocVQA/val ...
    # re-extract and re-score saved predictions; DPO as a verifier (paper section 5.5)
    python evaluate.py --out runs/eval/sft --rescore
    python evaluate.py --model runs/sft/final --data runs/syn/test.jsonl --image-root runs/syn --mode cot \
        --out runs/eval/rerank --rerank 16 --reward-model runs/dpo/final --reference runs/sft/final

Out: OUT/predictions.jsonl (prompt, output, extracted answer, score per record and mode) and OUT/results.{md,json}
(dataset x mode with the average, and the paper's Table 3 row). Under torchrun each process answers a share and
rank 0 merges; a rerun skips what is done. Guide: docs/evaluate.md.
"""

import glob
import json
import math
import os
import zlib
from collections import Counter, defaultdict

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from common.cli import ArgumentParser, UserError, add_dist_timeout, cli, number, progress
from common.dist import Dist, dtype_of, print0
from common.manifest import check_files, check_model_dir, check_out_dir, claim, file_id, model_id
from data import answers, gpt_extract
from data.answers import score
from data.collate import PairDataset
from data.formats import Appender, FormatError, load_qa, read_jsonl, repair_tail
from data.prompts import model_prompt
from model import LlavaNext, Processor
from model.generation import left_pad, row_logprobs
from model.processor import load_image


def parse_args(argv=None):
    ap = ArgumentParser(__doc__)
    pos = number(int, lo=1)
    ap.add_argument("--model", help="Hugging Face LLaVA-NeXT directory to evaluate")
    ap.add_argument("--data", nargs="+", help="QA record JSONL file(s)")
    ap.add_argument("--image-root", nargs="+", default=["."],
                    help="image paths in the records are relative to this: one root for every --data file, or one "
                         "per file, in the same order")
    ap.add_argument("--mode", choices=["direct", "cot", "both"], default="both",
                    help="the direct prompt, the CoT prompt, or both (the paper reports both)")
    ap.add_argument("--out", required=True, help="output directory: predictions.jsonl, results.md, results.json")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another evaluation in --out (only files evaluate.py wrote)")
    ap.add_argument("--batch-size", type=pos, default=16, help="prompts per generate call (per process)")
    ap.add_argument("--workers", type=number(int, lo=0), default=2, help="DataLoader workers decoding and "
                    "preprocessing the images of the next batches (0: in the main process)")
    ap.add_argument("--max-new-tokens", type=pos, default=512, help="CoT answers")
    ap.add_argument("--max-new-tokens-direct", type=pos, default=32, help="direct answers")
    ap.add_argument("--template", choices=["llava", "hf"], default="llava", help="chat template (model/processor.py)")
    ap.add_argument("--limit", type=pos, default=None, help="first N records of each file")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--rescore", action="store_true", help="re-extract and re-score OUT/predictions.jsonl only")
    ap.add_argument("--gpt-extract", default=None, metavar="MODEL",
                    help="with --rescore: MathVista answers extracted by this OpenAI model, as the official "
                         "pipeline does (off by default; prints the request count and cost, sends nothing "
                         "without --gpt-confirm; key from OPENAI_API_KEY)")
    ap.add_argument("--gpt-confirm", action="store_true", help="send the --gpt-extract requests")
    ap.add_argument("--gpt-base-url", default=None, help="an OpenAI-compatible server for --gpt-extract")
    # DPO as a verifier
    ap.add_argument("--rerank", type=number(int, lo=0), default=0,
                    help="sample N CoT answers per question from --model (the SFT model) and pick one by majority "
                         "vote, best-of-N under the DPO implicit reward, reward-weighted voting and the reference's "
                         "likelihood (paper section 5.5; 0: off)")
    ap.add_argument("--rerank-sizes", type=pos, nargs="+", default=None,
                    help="report the picks from the first n samples for each n (default: 1, 2, 4, ... up to N)")
    ap.add_argument("--reward-model", default=None, help="the DPO model (pi_dpo in the implicit reward)")
    ap.add_argument("--reference", default=None, help="the DPO run's reference, the SFT model (pi_sft)")
    ap.add_argument("--beta", type=number(float, above=0), default=0.1, help="the DPO run's beta (paper: 0.1)")
    ap.add_argument("--truncate-words", type=number(float, lo=0), default=90,
                    help="responses are scored cut as the DPO run cut them (train_dpo.py --truncate-words)")
    ap.add_argument("--temperature", type=number(float, lo=0), default=1.0, help="sampling temperature for --rerank")
    ap.add_argument("--seed", type=int, default=0, help="--rerank's sampling streams (one per question)")
    add_dist_timeout(ap)
    args = ap.parse_args(argv)
    if args.data and len(args.image_root) not in (1, len(args.data)):
        ap.error(f"--image-root: {len(args.image_root)} roots for {len(args.data)} --data files; give one root for "
                 "all of them, or one per file in the same order")
    return args


# ------------------------------------------------------------------------------------------------ grading

# scorers that need the record's options or meta (answer type, OCRBench subset), not just the golds
NEEDS_RECORD = ("aokvqa", "mmmu", "mathvista", "ocrbench")

# (extracted answer, score, format_ok) of one output: the paper's extraction (the text after the last "### Answer:"; a
# direct output is the answer itself), then the benchmark's official scorer; evaluate.grade is the public name
grade = answers.grade


def family_of(rec):
    """The synthetic task's question family (reported separately), None elsewhere."""
    return (rec.get("meta") or {}).get("family") if rec["dataset"] == "synthetic" else None


def table(rows, out):
    """results.md / results.json: mean score x 100 per dataset and mode, counts, and the average over datasets."""
    cells = defaultdict(list)
    for r in rows:                                    # the synthetic task reports each question family
        name = r["dataset"] + (f" {r['family']}" if r.get("family") else "")
        cells[(name, r["mode"])].append(r)
    datasets = sorted({d for d, _ in cells})
    modes = [m for m in MODES if any(k[1] == m for k in cells)]
    results = {}
    for (d, m), rs in cells.items():
        results.setdefault(d, {})[m] = {
            "score": 100 * sum(r["score"] for r in rs) / len(rs), "n": len(rs),
            "format_failures": sum(1 for r in rs if not r.get("format_ok", True) and not r.get("error")),
            "failed": sum(1 for r in rs if r.get("error"))}
    avg = {m: sum(results[d][m]["score"] for d in datasets if m in results[d]) / max(1, sum(
        1 for d in datasets if m in results[d])) for m in modes}
    lines = ["| dataset | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for d in datasets:
        cells_md = []
        for m in modes:
            c = results[d].get(m)
            if c is None:
                cells_md.append("-")
                continue
            note = [f"n={c['n']}"] + ([f"{c['format_failures']} no marker"] if c["format_failures"] else []) + \
                ([f"{c['failed']} failed"] if c["failed"] else [])
            cells_md.append(f"{c['score']:.1f} ({', '.join(note)})")
        lines.append(f"| {d} | " + " | ".join(cells_md) + " |")
    lines.append("| **Avg** | " + " | ".join(f"**{avg[m]:.1f}**" for m in modes) + " |")
    paper_md, paper = paper_table(results, modes)
    md = "\n".join(lines) + "\n" + rerank_table(rows) + paper_md
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"results": results, "average": avg, "paper_table": paper}, f, indent=1)
    return md


# the paper's Table 3 columns (its "Avg" is the mean of these 8), then Table 5's generalisation benchmarks
PAPER_COLUMNS = [("A-OK", ("aokvqa",)), ("Chart", ("chartqa",)), ("Doc", ("docvqa",)), ("Info", ("infovqa",)),
                 ("Text", ("textvqa",)), ("AI2D", ("ai2d",)), ("SQA", ("sqa", "scienceqa")),
                 ("MathV", ("mathvista",))]
EXTRA_COLUMNS = [("OCRBench", ("ocrbench",)), ("MMStar", ("mmstar",)), ("MMMU", ("mmmu",))]


def paper_table(results, modes):
    """One row per mode in the paper's Table 3 columns (+ OCRBench, MMStar, MMMU when present): (markdown, dict).
    Avg is the plain mean of the 8 Table 3 benchmarks, as the paper's; with some missing it averages those present
    and says how many."""
    columns = PAPER_COLUMNS + [c for c in EXTRA_COLUMNS if any(d in results for d in c[1])]
    if not any(d in results for _, names in columns for d in names):
        return "", {}
    table = {}
    for m in modes:
        row = {}
        for col, names in columns:
            cell = next((results[d][m]["score"] for d in names if m in results.get(d, {})), None)
            if cell is not None:
                row[col] = cell
        main = [row[c] for c, _ in PAPER_COLUMNS if c in row]
        if main:
            row["Avg"] = sum(main) / len(main)
            row["Avg of"] = len(main)
            table[m] = row
    head = [c for c, _ in PAPER_COLUMNS] + ["Avg"] + [c for c, _ in columns[len(PAPER_COLUMNS):]]
    lines = ["", "Paper layout (Table 3 columns; Avg = mean of its 8 benchmarks):", "",
             "| mode | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for m, row in table.items():
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in head]
        if row["Avg of"] < len(PAPER_COLUMNS):
            cells[len(PAPER_COLUMNS)] += f" ({row['Avg of']}/8)"
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n", table


# ------------------------------------------------------------------------------------------------ generation

def load_model(path, dtype, device):
    """(model in eval mode, processor) of a Hugging Face directory."""
    return LlavaNext.from_pretrained(path, dtype=dtype, device=device).eval(), Processor.from_pretrained(path)


def load_records(paths, roots, limit=None):
    """The QA records of every --data file (the first `limit` of each), each with its file's image root; ids must
    be unique over all files (the converters prefix them with the benchmark's name)."""
    roots = roots * len(paths) if len(roots) == 1 else roots
    records, seen = [], {}
    for path, root in zip(paths, roots):
        for rec in load_qa(path)[:limit] if limit else load_qa(path):
            if rec["id"] in seen:
                raise FormatError(f"{path}: record id {rec['id']!r} is also in {seen[rec['id']]}; ids must be unique "
                                  "over all --data files")
            seen[rec["id"]] = path
            rec["_root"] = root
            records.append(rec)
    return records


def image_file(rec):
    """Where a record's image is: under the --image-root of the --data file it came from."""
    return os.path.join(rec["_root"], rec["image"])


def image_size(path):
    """(H, W) of an image from its file header, without decoding the pixels; errors as Processor.load_image's."""
    try:
        with Image.open(path) as img:
            return img.size[::-1]
    except FileNotFoundError:
        raise FileNotFoundError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def prompt_ids(rec, mode, proc, args):
    """(prompt ids, prompt text) of one record, the image's token count from its header size; or an error string."""
    sizes = []
    if rec.get("image"):
        try:
            sizes = [image_size(image_file(rec))]
        except (OSError, ValueError) as e:
            return str(e)
    text = model_prompt(rec, mode)
    ids, _ = proc.tokenize([{"from": "human", "value": text}], sizes, template=args.template,
                           add_generation_prompt=True)
    return ids, text


class BatchImages(torch.utils.data.Dataset):
    """Item i: the images of batch i decoded and preprocessed (in a DataLoader worker, just ahead of the model):
    (i, pixel_values (n, P, 3, S, S), image_sizes (n, 2), {position in the batch: error} for images that fail)."""

    def __init__(self, batches, image_processor):
        self.paths = [[image_file(rec) if rec.get("image") else None for rec, _ in batch] for batch in batches]
        self.image_processor = image_processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        images, errors = [], {}
        for k, path in enumerate(self.paths[i]):
            if path:
                try:
                    images.append(load_image(path))
                except (OSError, ValueError) as e:
                    errors[k] = str(e)
        pv, sizes = self.image_processor(images)
        return i, pv, sizes, errors


def run_generation(model, proc, todo, mode, args, writer, main=True):
    """Batched greedy answers (left-padded prompts, positions from the mask: batch size does not change them).
    Prompts are tokenized up front (image sizes from the file headers) and sorted by length, so that a batch holds
    similar lengths; the pixels are decoded batch by batch in DataLoader workers, never all at once."""
    device = model.output_weight.device
    max_new = args.max_new_tokens if mode == "cot" else args.max_new_tokens_direct
    eos = set(model.eos_token_ids)
    bar = tqdm(total=len(todo), desc=f"eval {mode}", unit="q", dynamic_ncols=True, disable=not main)

    def failed(rec, err):
        writer.write({"id": rec["id"], "dataset": rec["dataset"], "mode": mode, "error": err, "score": 0.0,
                      "format_ok": False, "gold": rec["answers"], "family": family_of(rec)})
        bar.update(1)

    planned = []
    for rec in todo:
        p = prompt_ids(rec, mode, proc, args)
        if isinstance(p, str):
            failed(rec, p)
        else:
            planned.append((rec, p))
    planned.sort(key=lambda x: len(x[1][0]))            # similar lengths together: less padding
    batches = [planned[b:b + args.batch_size] for b in range(0, len(planned), args.batch_size)]
    if not batches:
        bar.close()
        return
    loader = torch.utils.data.DataLoader(BatchImages(batches, proc.image_processor), batch_size=None,
                                         num_workers=args.workers)
    for b, pv, sizes, errors in loader:
        for k, err in errors.items():
            failed(batches[b][k][0], err)
        ok = [x for k, x in enumerate(batches[b]) if k not in errors]
        if not ok:
            continue
        ids, mask = left_pad([p[0] for _, p in ok], pad_id=0)
        images = len(pv) > 0
        out = model.generate(ids.to(device), pv.to(device) if images else None, sizes if images else None,
                             mask.to(device), max_new_tokens=max_new)
        for (rec, p), row in zip(ok, out.tolist()):
            stop = next((i for i, t in enumerate(row) if t in eos), len(row))
            text = proc.decode(row[:stop])
            ans, s, fmt_ok = grade(rec, text, mode)
            writer.write({"id": rec["id"], "dataset": rec["dataset"], "mode": mode, "prompt": p[1], "output": text,
                          "answer": ans, "score": s, "format_ok": fmt_ok, "gold": rec["answers"],
                          "family": family_of(rec), "choices": rec.get("choices"), "meta": rec.get("meta")})
        bar.update(len(ok))
    bar.close()


RERANK = ("cot majority", "cot best-of-n", "cot weighted", "cot likelihood")


def rerank_sizes(args):
    """The n of --rerank-sizes (default 1, 2, 4, ... up to --rerank); checked before anything is written."""
    sizes = args.rerank_sizes or [2 ** k for k in range(args.rerank.bit_length()) if 2 ** k <= args.rerank]
    if max(sizes) > args.rerank:
        raise UserError(f"--rerank-sizes {max(sizes)} is above --rerank {args.rerank}")
    return sizes


def dpo_rows(rec, texts, proc, image_sizes, args):
    """Each response as (input ids, targets) exactly as train_dpo.py trains on it (data/collate.PairDataset): the
    pair's question, the response cut to --truncate-words by the paper's rule, no final end-of-turn token."""
    rows = PairDataset([], proc, ".", args.truncate_words, args.template)      # (its tokenizer only: no images)
    question = model_prompt(rec, "cot").replace("<image>\n", "", 1)
    return [rows.tokenize(question, t, image_sizes, 1 if rec.get("image") else 0) for t in texts]


def pick(answers, rewards, likelihoods, n):
    """The answer each method picks from the first n samples: {mode: answer}. Ties go to the earliest sample."""
    answers, rewards, likelihoods = answers[:n], rewards[:n], likelihoods[:n]
    votes = Counter(answers)
    top = max(rewards)
    weight = defaultdict(float)
    for a, r in zip(answers, rewards):
        weight[a] += math.exp(r - top)                 # softmax(reward) summed per answer
    first = {a: answers.index(a) for a in votes}
    return {"cot majority": max(votes, key=lambda a: (votes[a], -first[a])),
            "cot best-of-n": answers[max(range(n), key=lambda i: (rewards[i], -i))],
            "cot weighted": max(weight, key=lambda a: (weight[a], -first[a])),
            "cot likelihood": answers[max(range(n), key=lambda i: (likelihoods[i], -i))]}


def run_rerank(model, proc, todo, args, writer, dtype, device, main=True):
    """DPO as a verifier (paper section 5.5): --rerank N CoT samples per question from --model at --temperature (each
    question its own seeded stream), and for every n in --rerank-sizes the answer picked from the first n of them by
    majority vote, by best-of-n under the implicit reward beta * (log pi_dpo - log pi_ref) (the highest), by
    reward-weighted voting (each answer weighted by the sum of softmax(reward) over its samples), and, as a control,
    by the reference's own likelihood log pi_ref (the SFT model's). Every response is scored as DPO training saw it
    (dpo_rows). A sample that never stops is kept as a candidate (a verifier faces every sample)."""
    sizes_n = rerank_sizes(args)
    same = os.path.abspath
    reward_model = model if same(args.reward_model) == same(args.model) else \
        load_model(args.reward_model, dtype, device)[0]
    reference = model if same(args.reference) == same(args.model) else \
        reward_model if same(args.reference) == same(args.reward_model) else load_model(args.reference, dtype,
                                                                                         device)[0]
    eos = set(model.eos_token_ids)
    bar = tqdm(total=len(todo), desc=f"rerank x{args.rerank}", unit="q", dynamic_ncols=True, disable=not main)
    for b in range(0, len(todo), args.batch_size):
        batch, prompts, images, ok = todo[b:b + args.batch_size], [], [], []
        for rec in batch:
            try:
                image = proc.load_image(image_file(rec)) if rec.get("image") else None
            except (OSError, ValueError) as e:
                for m in RERANK:
                    writer.write({"id": rec["id"], "dataset": rec["dataset"], "mode": m, "error": str(e), "score": 0.0,
                                  "gold": rec["answers"], "family": family_of(rec)})
                bar.update(1)
                continue
            ok.append(rec)
            prompts.append(prompt_ids(rec, "cot", proc, args)[0])
            images += [image] if image else []
        if not ok:
            continue
        pv, sizes = proc.preprocess_images(images)
        ids, mask = left_pad(prompts, pad_id=0)
        out = model.generate(ids.to(device), pv.to(device) if images else None, sizes if images else None,
                             mask.to(device), max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             n=args.rerank, seed=[zlib.crc32(f"{args.seed}/{r['id']}".encode()) for r in ok]).tolist()
        k = 0
        for q, rec in enumerate(ok):
            n_img = 1 if rec.get("image") else 0
            pv_q, sizes_q = (pv[k:k + 1], sizes[k:k + 1]) if n_img else (None, None)
            k += n_img
            texts, finished = [], []
            for row in out[q * args.rerank:(q + 1) * args.rerank]:
                stop = next((i for i, t in enumerate(row) if t in eos), None)
                finished.append(stop is not None)
                texts.append(proc.decode(row[:stop]))
            rows = dpo_rows(rec, texts, proc, sizes_q, args)
            pol = row_logprobs(reward_model, rows, pv_q, sizes_q)
            ref = pol if reference is reward_model else row_logprobs(reference, rows, pv_q, sizes_q)
            rewards = [args.beta * (x - y) for x, y in zip(pol, ref)]
            graded = [grade(rec, t, "cot") for t in texts]
            answers = [g[0] for g in graded]

            def scored(a):
                return score(rec["dataset"], a, rec["answers"], rec.get("choices"), rec.get("meta"))
            picks = {n: pick(answers, rewards, ref, n) for n in sizes_n}
            top = max(sizes_n)
            for m in RERANK:
                row = {"id": rec["id"], "dataset": rec["dataset"], "mode": m, "answer": picks[top][m],
                       "gold": rec["answers"], "family": family_of(rec), "score": scored(picks[top][m]),
                       "format_ok": True, "n": top, "by_n": {str(n): scored(picks[n][m]) for n in sizes_n}}
                if m == "cot best-of-n":               # the samples and their scores, once per question
                    row.update(samples=texts, sample_scores=[g[1] for g in graded], finished=finished,
                               rewards=rewards, ref_logps=ref)
                writer.write(row)
            bar.update(1)
    bar.close()


def rerank_table(rows):
    """Markdown: accuracy (%) of each picking method against n, per dataset; with the mean accuracy of one sample and
    the share of questions some sample of the first n answers right (what any picker can reach)."""
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("by_n"):
            by[r["dataset"] + (f" {r['family']}" if r.get("family") else "")][r["mode"]].append(r)
    lines = []
    for d, modes in sorted(by.items()):
        ns = sorted({int(n) for rs in modes.values() for r in rs for n in r["by_n"]})
        lines += ["", f"DPO as a verifier on {d}: accuracy (%) of the answer picked from the first n samples", "",
                  "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---" * (len(ns) + 1) + "|"]
        for m in RERANK:
            rs = modes.get(m, [])
            if rs:
                lines.append(f"| {m[4:]} | " + " | ".join(
                    f"{100 * sum(r['by_n'].get(str(n), 0) for r in rs) / len(rs):.1f}" for n in ns) + " |")
        best = [r for r in modes.get("cot best-of-n", []) if r.get("sample_scores")]
        if best:
            lines.append("| one sample (mean) | " + " | ".join(
                f"{100 * sum(sum(r['sample_scores'][:n]) / n for r in best) / len(best):.1f}" for n in ns) + " |")
            lines.append("| some sample right | " + " | ".join(
                f"{100 * sum(max(r['sample_scores'][:n]) for r in best) / len(best):.1f}" for n in ns) + " |")
    return "\n".join(lines) + ("\n" if lines else "")


# ------------------------------------------------------------------------------------------------ predictions files

MODES = ("direct", "cot") + RERANK


def rank_share(todo, what, d, batch=1):
    """This process's share of the records left: every world-th slice of `batch` of them, from its rank on (--rerank
    deals whole batches, so that a question is sampled beside the same questions for any number of processes)."""
    share = [r for b in range(d.rank * batch, len(todo), d.world * batch) for r in todo[b:b + batch]]
    if d.distributed:
        print(f"[rank {d.rank}/{d.world}] {what}: {len(share)} of {len(todo)} records left", flush=True)
    return share


def part_files(out):
    """The per-process prediction files of a torchrun run (or of a killed one, with any number of processes)."""
    return sorted(glob.glob(os.path.join(out, "predictions.rank*.jsonl")))


def merge(pred_path, parts, records):
    """predictions.jsonl and the part files -> predictions.jsonl: one row per (id, mode), in record order and then
    mode order (what one process writes too); the part files go once their rows are in. Rows of records not in
    this run keep their order, after the others."""
    order = {str(r["id"]): i for i, r in enumerate(records)}
    rows, seen = [], set()
    for path in ([pred_path] if os.path.exists(pred_path) else []) + parts:
        for _, row in read_jsonl(path):
            key = (str(row["id"]), row["mode"])
            if key not in seen:                        # a kill between the merge and the clean-up: rows twice
                seen.add(key)
                rows.append(row)
    rows.sort(key=lambda r: (order.get(str(r["id"]), len(order)),
                             MODES.index(r["mode"]) if r["mode"] in MODES else len(MODES)))
    with open(pred_path + ".tmp", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    os.replace(pred_path + ".tmp", pred_path)
    for path in parts:
        os.remove(path)


# ------------------------------------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    pred_path = os.path.join(args.out, "predictions.jsonl")
    if args.rescore and not os.path.isdir(args.out):
        raise UserError(f"--out {args.out}: no such directory, nothing to rescore")
    check_out_dir(args.out)
    check_files(args.data, "--data")

    if args.rescore:                                   # no model, no generation: extraction and metrics again
        if not os.path.exists(pred_path):
            raise UserError(f"{pred_path} not found: nothing to rescore")
        records = {r["id"]: r for r in load_qa(args.data)} if args.data else {}
        rows = [row for _, row in read_jsonl(pred_path)]
        blind = sorted({r["dataset"] for r in rows if "output" in r and r["id"] not in records and "meta" not in r
                        and r["dataset"] in NEEDS_RECORD})      # rows written before they carried choices and meta
        if blind:
            raise SystemExit(f"error: predictions of {blind} need their QA records (options, answer type) to be "
                             "rescored: pass the records with --data")
        extractions = {}
        if args.gpt_extract:                           # MathVista's GPT answer extraction, opt-in, cost shown first
            extractions = gpt_extract.run(rows, records, args)
            if extractions is None:
                return 0
        for row in rows:
            if "output" in row:
                rec = records.get(row["id"]) or {"dataset": row["dataset"], "answers": row["gold"],
                                                 "choices": row.get("choices"), "meta": row.get("meta")}
                row["answer"], row["score"], row["format_ok"] = grade(rec, row["output"], row["mode"])
                ext = extractions.get((row["id"], row["mode"]), row.get("extraction"))
                if ext is not None:                    # a GPT extraction (kept in the row) replaces the rule-based one
                    row["answer"] = row["extraction"] = ext
                    row["score"] = score(rec["dataset"], row["answer"], rec["answers"], rec.get("choices"),
                                         rec.get("meta"))
        with open(pred_path + ".tmp", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(pred_path + ".tmp", pred_path)
        print(table(rows, args.out))
        return 0

    # ---- every check before the first write (a refused command leaves nothing behind)
    if not (args.model and args.data):
        raise UserError("--model and --data are needed (or --rescore)")
    check_model_dir(args.model)
    if args.rerank:
        if not (args.reward_model and args.reference):
            raise UserError("--rerank needs --reward-model (the DPO model) and --reference (its SFT model)")
        check_model_dir(args.reward_model, "--reward-model")
        check_model_dir(args.reference, "--reference")
        rerank_sizes(args)
    d = Dist(args.dist_timeout)
    records = load_records(args.data, args.image_root, args.limit)
    dtype = dtype_of(args.dtype, d.device)
    # OUT holds one model's answers: a rerun resumes them only for the same model, data and settings
    fields = {"stage": "evaluate", "model": model_id(args.model), "data": [file_id(f) for f in args.data],
              "dtype": str(dtype), "flags": {k: getattr(args, k) for k in (
                  "template", "max_new_tokens", "max_new_tokens_direct")}}
    if args.rerank:
        fields["rerank"] = {"n": args.rerank, "reward_model": model_id(args.reward_model or args.model),
                            "reference": model_id(args.reference or args.model), "beta": args.beta,
                            "temperature": args.temperature, "seed": args.seed, "sizes": args.rerank_sizes,
                            "truncate_words": args.truncate_words, "scoring": "as DPO training"}
    created = [os.path.join(args.out, n) for n in ("predictions.jsonl", "results.md", "results.json")] + \
        part_files(args.out)
    claim(os.path.join(args.out, "manifest.json"), fields, created, args.overwrite, act=False)
    d.barrier()
    if d.main:
        claim(os.path.join(args.out, "manifest.json"), fields, created, args.overwrite)
    d.barrier()
    model, proc = load_model(args.model, dtype, d.device)
    progress["then"] = "rerun the same command to continue (the answers so far are kept)"

    # ---- what is left: every process reads the same finished rows before any process writes
    if d.main:                                         # a run killed mid-write: drop its half lines
        for path in [pred_path] + part_files(args.out):
            repair_tail(path)
    d.barrier()
    done = {(str(r["id"]), r["mode"]) for path in [pred_path] + part_files(args.out) if os.path.exists(path)
            for _, r in read_jsonl(path)}
    d.barrier()
    writer = Appender(os.path.join(args.out, f"predictions.rank{d.rank}.jsonl") if d.distributed else pred_path)
    modes = ["direct", "cot"] if args.mode == "both" else [args.mode]
    if args.rerank:
        todo = [r for r in records if (r["id"], "cot best-of-n") not in done]
        print0(f"{len(records)} records, {len(records) - len(todo)} already reranked")
        run_rerank(model, proc, rank_share(todo, "rerank", d, args.batch_size), args, writer, dtype, d.device, d.main)
    else:
        for mode in modes:
            todo = [r for r in records if (r["id"], mode) not in done]
            print0(f"{mode}: {len(records)} records, {len(records) - len(todo)} already done")
            run_generation(model, proc, rank_share(todo, mode, d), mode, args, writer, d.main)
    writer.close()
    d.barrier()
    if d.main:
        merge(pred_path, part_files(args.out), records)
        wanted = {(r["id"], m) for r in records for m in (RERANK if args.rerank else modes)}
        rows = [r for _, r in read_jsonl(pred_path) if (str(r["id"]), r["mode"]) in wanted]
        md = table(rows, args.out)
        print(md + f"wrote {pred_path}, {os.path.join(args.out, 'results.md')}")
    d.close()
    return 0


if __name__ == "__main__":
    cli(main)
