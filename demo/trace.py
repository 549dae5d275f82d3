"""One question through every stage of a demo run, as Markdown: the rows the stages wrote, and what their files do
not keep recomputed exactly (the teacher's row, the label mask, the N samples, the token rewards, the answers).

    python -m demo.trace runs/demo/seed0                  # the first sampled question that gave pairs (Markdown)
    python -m demo.trace runs/demo/seed0 --id synthetic-train-000042   # any sampled question

The samples are drawn again with the run's own flags and the question's own seeded stream, which does not depend
on the batch it was sampled in (fp32), so they are the run's samples; the script checks their accuracy against the
run's question log.
"""

import json
import os
import random
import re
import sys
import textwrap

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill  # noqa: E402
import sample  # noqa: E402
from training.loop import pair_logps  # noqa: E402
from common.cli import ArgumentParser, UserError, cli  # noqa: E402
from common.dist import Dist  # noqa: E402
from data.answers import grade  # noqa: E402
from data.collate import PairDataset, collate_pairs  # noqa: E402
from data.prompts import model_prompt  # noqa: E402
from data.synthetic import first_wrong_step, steps_correct, teacher  # noqa: E402
from model import LlavaNext, Processor  # noqa: E402
from model.generation import left_pad  # noqa: E402


def rows(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def pretty(obj):
    """JSON with one key per line but lists of plain values kept on one line."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    return re.sub(r"\[\s*([^\[\]{}]*?)\s*\]", lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",\n"))
                  + "]" if m.group(1) else "[]", text)


def fence(text, lang=""):
    return f"```{lang}\n{text}\n```"


def label_mask(proc, turns, sizes):
    """The tokens of an SFT row, supervised ones in [brackets], the image's tokens folded into one mark."""
    ids, labels = proc.tokenize(turns, sizes)
    out, images = [], 0
    for t, y in zip(ids, labels):
        if t == proc.image_token_id:
            images += 1
            continue
        if images:
            out.append(f"<image x{images}>")
            images = 0
        piece = proc.decode([t], skip_special_tokens=False)
        out.append(f"[{piece}]" if y != -100 else piece)
    return " ".join(out), sum(y != -100 for y in labels), len(ids)


def main(argv=None):
    ap = ArgumentParser(__doc__)
    ap.add_argument("work", help="a demo run's seed directory, e.g. runs/demo/seed0")
    ap.add_argument("--id", default=None, help="a sampled question (default: the first one that gave pairs)")
    ap.add_argument("--pairs", default="outcome", choices=("outcome", "steps"), help="which pairs")
    args = ap.parse_args(argv)
    w = args.work
    pairs_dir, dpo_dir = f"{w}/pairs_{args.pairs}", f"{w}/dpo_{args.pairs}"
    for need in (f"{w}/pool/train.jsonl", f"{pairs_dir}/pairs.manifest.json", f"{dpo_dir}/manifest.json",
                 f"{w}/arm4/final/config.json", f"{dpo_dir}/final/config.json"):
        if not os.path.exists(need):
            raise UserError(f"{need} is missing: {w} is not a finished demo run with {args.pairs}-graded pairs "
                            "(make demo writes runs/demo/seed0)")
    log = {q["id"]: q for q in rows(f"{pairs_dir}/pairs.questions.jsonl")}
    pairs = rows(f"{pairs_dir}/pairs.jsonl")
    if not args.id and not pairs:
        raise UserError(f"{pairs_dir}/pairs.jsonl has no pairs; name a question with --id")
    qid = args.id or pairs[0]["source_id"]
    rec = next((r for r in rows(f"{w}/pool/train.jsonl") if r["id"] == qid), None)
    if rec is None:
        raise UserError(f"--id {qid}: no such question in {w}/pool/train.jsonl")
    flags = json.load(open(f"{pairs_dir}/pairs.manifest.json"))["flags"]
    dpo_flags = json.load(open(f"{dpo_dir}/manifest.json"))["flags"]
    torch.set_grad_enabled(False)
    sft = LlavaNext.from_pretrained(f"{w}/arm4/final").eval()
    dpo = LlavaNext.from_pretrained(f"{dpo_dir}/final").eval()
    proc = Processor.from_pretrained(f"{w}/arm4/final")
    image = proc.load_image(os.path.join(w, "pool", rec["image"]))
    pv, sizes = proc.preprocess_images([image])
    out = [f"### The QA record (`{w}/pool/train.jsonl`)", fence(pretty(rec), "json")]

    # ---- distillation: the teacher's rationale and the SFT row it makes
    text = teacher(rec, random.Random(0))
    answer, score, found = grade(rec, text)
    row = distill.cot_row(rec, answer, text, {}, "synthetic")
    row.pop("teacher")
    out += ["### The teacher's rationale, graded, and the SFT row it becomes",
            "The synthetic teacher reads the chart's numbers (`data/synthetic.py:teacher`); the filter keeps the row "
            f"because its answer scores {score:g} against the annotation {rec['answers']} "
            "(`distill.py:Sink.result`). This question is one of the fresh ones DPO samples from, so its row is shown "
            "as the training charts' rows are made:", fence(text), fence(pretty(row), "json")]
    mask, supervised, total = label_mask(proc, row["conversations"], sizes)
    out += ["### The SFT row as tokens, supervised ones in [brackets] (`model/processor.py:Processor.tokenize`)",
            f"{supervised} of {total} tokens are trained on: the assistant's text and its end-of-turn token.",
            fence(mask)]

    # ---- sampling: the run's N samples, graded
    ids = proc.tokenize([{"from": "human", "value": model_prompt(rec, "cot")}], sizes, template=flags["template"],
                        add_generation_prompt=True)[0]
    n = flags["num_samples"]
    prompt, mask_ = left_pad([ids], 0)
    gen = sft.generate(prompt, pv, sizes, mask_, max_new_tokens=flags["max_new_tokens"],
                       temperature=flags["temperature"], top_p=flags["top_p"], n=n,
                       seed=[sample.question_seed(flags["seed"], qid)]).tolist()
    eos = set(sft.eos_token_ids)
    table = ["| # | sample | answer | graded | every step right |", "|---|---|---|---|---|"]
    right = 0
    for k, toks in enumerate(gen):
        stop = next((i for i, t in enumerate(toks) if t in eos), None)
        if stop is None:
            table.append(f"| {k + 1} | (no end within {flags['max_new_tokens']} tokens) | | wrong | |")
            continue
        s = proc.decode(toks[:stop])
        a, sc, ok = grade(rec, s)
        good = ok and sc >= 1 and (flags.get("grade") != "steps" or steps_correct(rec, s))
        right += good
        table.append(f"| {k + 1} | `{s.replace('|', '/')}` | {a} | {'right' if good else 'wrong'} | "
                     f"{'yes' if steps_correct(rec, s) else 'no'} |")
    logged = log.get(qid, {})
    check = "the same as" if abs(right / n - logged.get("accuracy", -1)) < 1e-9 else "NOT the same as"
    acc = right / n
    window = (f"inside the window [{flags['min_acc']}, {flags['max_acc']}], so the question gives up to "
              f"{flags['pairs_per_question']} pairs (`sample.py:build_pairs`)"
              if flags["min_acc"] <= acc <= flags["max_acc"] else
              f"outside the window [{flags['min_acc']}, {flags['max_acc']}]: the question gives no pairs")
    if flags.get("grade") == "steps":
        window += " (graded by every step: `--grade steps`)"
    out += [f"### {n} samples from the SFT model (arm 4) at T = {flags['temperature']} (`sample.py:grade_question`)",
            f"Accuracy {right}/{n} = {acc:.2f}, {check} the run's question log ({logged.get('accuracy')}); "
            f"{window}.", "\n".join(table)]

    # ---- the pairs and their token rewards
    mine = [p for p in pairs if p["source_id"] == qid]
    if not mine:
        out += [f"### No pairs from this question in `{pairs_dir}/pairs.jsonl`"]
    else:
        out += [f"### The pairs (`{pairs_dir}/pairs.jsonl`)",
                fence("\n".join(json.dumps({k: p[k] for k in ("id", "chosen", "rejected", "accuracy")})
                                for p in mine), "json")]
        beta, k_words = dpo_flags["beta"], dpo_flags["truncate_words"]
        ds = PairDataset([(p, p["id"]) for p in mine[:1]], proc, os.path.join(w, "pool"), k_words,
                         dpo_flags["template"])
        mb = collate_pairs([ds[0]])
        d = Dist()
        _, lp_pol = pair_logps(dpo, mb, d)
        _, lp_ref = pair_logps(sft, mb, d)
        rewards = (beta * (lp_pol - lp_ref))
        lines = []
        for r, side in ((0, "chosen"), (1, "rejected")):
            keep = mb["targets"][r] != -100
            toks, rs = mb["targets"][r][keep].tolist(), rewards[r][keep].tolist()
            low = min(range(len(rs)), key=rs.__getitem__)
            lines.append(f"{side} (reward sum {sum(rs):+.4f}; lowest at token {low + 1}):")
            lines.append(" ".join(f"{proc.decode([t], skip_special_tokens=False)}({x:+.4f})"
                                  for t, x in zip(toks, rs)))
        span = first_wrong_step(rec, mine[0]["rejected"])
        where = mine[0]["rejected"][span[0]:span[1]] if span else "none: every step checks, the answer is wrong"
        out += ["### The token rewards of the first pair, beta * (log pi_DPO - log pi_SFT) (`training/audit.py:audit`)",
                f"beta = {beta}; responses cut as DPO training saw them ({k_words:g} words, no end-of-turn token). "
                f"The rejected chain's first wrong step (`data/synthetic.py:first_wrong_step`): `{where}`.",
                fence("\n".join(lines))]

    # ---- the evaluated answers
    table = ["| model | mode | output | answer | score |", "|---|---|---|---|---|"]
    for name, model in (("SFT (arm 4)", sft), ("DPO", dpo)):
        for mode in ("direct", "cot"):
            p = proc.tokenize([{"from": "human", "value": model_prompt(rec, mode)}], sizes,
                              add_generation_prompt=True)[0]
            toks = model.generate(torch.tensor([p]), pv, sizes, max_new_tokens=64)[0].tolist()
            stop = next((i for i, t in enumerate(toks) if t in eos), len(toks))
            s = proc.decode(toks[:stop])
            a, sc, _ = grade(rec, s, mode)
            table.append(f"| {name} | {mode} | `{s.replace('|', '/')}` | {a} | {sc:g} |")
    out += ["### The evaluated answers (greedy, both prompts; `evaluate.py:run_generation`)", "\n".join(table)]
    prose = [p if p.startswith(("```", "|", "#")) else textwrap.fill(p, 116, break_on_hyphens=False) for p in out]
    print("\n\n".join(prose))


if __name__ == "__main__":
    cli(main)
