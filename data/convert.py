"""Converters from each benchmark's released annotation files to QA records (one JSON object per line).

    python -m data.convert chartqa   --input ChartQA/test/test_human.json --out chartqa_human.jsonl
    python -m data.convert chartqa   --input ChartQA/train/train_human.json --image-prefix chartqa/ --out train.jsonl
    python -m data.convert aokvqa    --input aokvqa_v1p0_val.json --out aokvqa_val.jsonl        # images: val2017/
    python -m data.convert docvqa    --input val/val_v1.0.json --out docvqa_val.jsonl
    python -m data.convert infovqa   --input infographicsVQA_val_v1.0_withQT.json --out infovqa_val.jsonl
    python -m data.convert textvqa   --input TextVQA_0.5.1_val.json --out textvqa_val.jsonl    # images: train_images/
    python -m data.convert ai2d      --input ai2d/questions --out ai2d.jsonl [--ids ai2d_test_ids.csv]
    python -m data.convert sqa       --input ScienceQA/data/scienceqa/problems.json --split test --out sqa_img.jsonl
    python -m data.convert mathvista --input MathVista/data/testmini.json --out mathvista_testmini.jsonl
    python -m data.convert ocrbench  --input OCRBench/OCRBench.json --out ocrbench.jsonl    # images: OCRBench_Images/
    # MMStar and MMMU (validation) as VLMEvalKit ships them (their hub releases are parquet files, which would need
    # a new dependency): TSVs with the images inline, written out under --image-dir (give it as --image-root later)
    python -m data.convert mmstar    --input MMStar.tsv --image-dir mmstar_images --out mmstar.jsonl
    python -m data.convert mmmu      --input MMMU_DEV_VAL.tsv --image-dir mmmu_images --out mmmu_val.jsonl
    # any of VLMEvalKit's TSVs of these benchmarks (AI2D_TEST, ScienceQA_TEST, A-OKVQA, ChartQA_TEST, DocVQA_VAL,
    # InfoVQA_VAL, TextVQA_VAL, OCRBench, MathVista_MINI, MMStar, MMMU_DEV_VAL): the benchmark from the file name
    python -m data.convert vlmeval   --input AI2D_TEST.tsv --image-dir ai2d_images --out ai2d.jsonl

Image paths in the records are relative to the benchmark's own root (give that root as --image-root to
evaluate.py): ChartQA png/<imgname>, A-OKVQA <split>2017/<12-digit id>.jpg, DocVQA documents/..., InfoVQA
infographicsvqa_images/<name>, TextVQA train_images/<id>.jpg, AI2D images/<name>, ScienceQA <split>/<pid>/image.png,
MathVista images/<pid>.jpg, OCRBench <subset>/..., a TSV's images <index>.<format> under --image-dir.
Multiple-choice answers are stored as letters, with the option texts in "choices".
"""

import csv
import json
import os

from common.cli import ArgumentParser, UserError, cli
from data import vlmeval
from data.prompts import LETTERS


def _load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def chartqa(path, **_):
    """ChartQA test_{human,augmented}.json: [{"imgname", "query", "label"}]."""
    split = os.path.splitext(os.path.basename(path))[0]
    for i, r in enumerate(_load(path)):
        yield {"id": f"chartqa-{split}-{i}", "image": f"png/{r['imgname']}", "question": r["query"],
               "answers": [str(r["label"])], "choices": None, "dataset": "chartqa"}


def aokvqa(path, split=None, **_):
    """A-OKVQA aokvqa_v1p0_{split}.json: [{"question_id", "split", "image_id", "question", "choices",
    "correct_choice_idx", "direct_answers", ...}]; the multiple-choice setting (the paper's). The COCO 2017 image
    folder comes from each record's own "split" (--split only where a record has none)."""
    for r in _load(path):
        where = r.get("split") or split
        if not where:
            raise ValueError(f"A-OKVQA question {r.get('question_id')} has no 'split'; give --split train|val|test")
        rec = {"id": f"aokvqa-{r['question_id']}", "image": f"{where}2017/{int(r['image_id']):012d}.jpg",
               "question": r["question"], "choices": r["choices"], "dataset": "aokvqa",
               "answers": [LETTERS[r["correct_choice_idx"]]] if "correct_choice_idx" in r else ["?"]}
        if r.get("direct_answers"):
            rec["meta"] = {"direct_answers": r["direct_answers"]}
        yield rec


def docvqa(path, **_):
    """DocVQA {val,test}_v1.0.json: {"data": [{"questionId", "question", "image", "answers", ...}]}."""
    for r in _load(path)["data"]:
        yield {"id": f"docvqa-{r['questionId']}", "image": r["image"], "question": r["question"],
               "answers": r.get("answers") or ["?"], "choices": None, "dataset": "docvqa"}


def infovqa(path, **_):
    """InfographicsVQA *_v1.0_withQT.json: {"data": [{"questionId", "question", "image_local_name", "answers"}]}."""
    for r in _load(path)["data"]:
        yield {"id": f"infovqa-{r['questionId']}", "image": f"infographicsvqa_images/{r['image_local_name']}",
               "question": r["question"], "answers": r.get("answers") or ["?"], "choices": None,
               "dataset": "infovqa"}


def textvqa(path, **_):
    """TextVQA TextVQA_0.5.1_{val,train}.json: {"data": [{"question_id", "question", "image_id", "answers"}]}
    (10 annotator answers each: the VQA accuracy needs all of them)."""
    for r in _load(path)["data"]:
        yield {"id": f"textvqa-{r['question_id']}", "image": f"train_images/{r['image_id']}.jpg",
               "question": r["question"], "answers": r.get("answers") or ["?"], "choices": None,
               "dataset": "textvqa"}


def ai2d(path, ids=None, **_):
    """AI2D: a directory of questions/<image>.json files {"imageName", "questions": {text: {"answerTexts",
    "correctAnswer", "questionId", "abcLabel"}}}; --ids keeps the test split's image ids (one per line)."""
    keep = None
    if ids:
        with open(ids) as f:
            keep = {row[0].strip() for row in csv.reader(f) if row}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".json"):
            continue
        doc = _load(os.path.join(path, name))
        image = doc["imageName"]
        if keep is not None and image.split(".")[0] not in keep:
            continue
        for text, q in sorted(doc["questions"].items(), key=lambda kv: kv[1]["questionId"]):
            yield {"id": f"ai2d-{q['questionId']}", "image": f"images/{image}", "question": text,
                   "choices": q["answerTexts"], "answers": [LETTERS[q["correctAnswer"]]], "dataset": "ai2d"}


def sqa(path, split="test", images_only=True, **_):
    """ScienceQA problems.json: {pid: {"question", "choices", "answer", "hint", "image", "split"}}; the paper
    evaluates the image subset (SQA-IMG); the hint (context) is prepended as LLaVA does."""
    for pid, r in _load(path).items():
        if r.get("split") != split or (images_only and not r.get("image")):
            continue
        question = f"Context: {r['hint']}\n{r['question']}" if r.get("hint") else r["question"]
        yield {"id": f"sqa-{pid}", "image": f"{split}/{pid}/{r['image']}" if r.get("image") else None,
               "question": question, "choices": r["choices"], "answers": [LETTERS[r["answer"]]], "dataset": "sqa"}


def mathvista(path, **_):
    """MathVista testmini.json: {pid: {"question", "image", "choices", "answer", "question_type", "answer_type",
    "precision", "unit", "query"}}; multiple choice as letters; meta keeps question_type, answer_type, precision,
    unit and the official query (hint + question + choices: the GPT extraction's prompt uses it)."""
    data = _load(path)
    for pid, r in (data.items() if isinstance(data, dict) else ((str(x["pid"]), x) for x in data)):
        choices = r.get("choices") if r.get("question_type") == "multi_choice" else None
        if choices:
            answers = [LETTERS[choices.index(r["answer"])]] if r["answer"] in choices else [str(r["answer"])]
        else:
            answers = [str(r["answer"])]
        meta = {"answer_type": r.get("answer_type"), "question_type": r.get("question_type")}
        if r.get("precision") is not None:
            meta["precision"] = int(r["precision"])
        for key in ("unit", "query"):
            if r.get(key):
                meta[key] = r[key]
        yield {"id": f"mathvista-{pid}", "image": r["image"], "question": r["question"], "choices": choices,
               "answers": answers, "dataset": "mathvista", "meta": meta}


def ocrbench(path, **_):
    """OCRBench OCRBench.json: [{"dataset_name", "id", "image_path", "question", "answers": str | [str], "type"}]
    (ids repeat across subsets: the record id is the position); the subset and type go to meta (HME100k is
    scored without spaces)."""
    for i, r in enumerate(_load(path)):
        answers = r["answers"] if isinstance(r["answers"], list) else [r["answers"]]
        yield {"id": f"ocrbench-{i}", "image": r["image_path"], "question": r["question"],
               "answers": [str(a) for a in answers], "choices": None, "dataset": "ocrbench",
               "meta": {"dataset_name": r["dataset_name"], "type": r["type"], "source_id": r.get("id")}}


def mmstar(path, image_dir=None, **_):
    """MMStar as VLMEvalKit's MMStar.tsv (1500 questions, options A-D, images inline)."""
    return _tsv(path, "mmstar", image_dir)


def mmmu(path, image_dir=None, split=None, **_):
    """MMMU as VLMEvalKit's MMMU_DEV_VAL.tsv, the validation split by default (900 questions; multiple choice
    and open; a multi-image question keeps its first image, see data/vlmeval.py)."""
    return _tsv(path, "mmmu", image_dir, split or "validation")


def vlmeval_tsv(path, image_dir=None, split=None, dataset=None, **_):
    """Any VLMEvalKit TSV of a benchmark above; the benchmark from --dataset or the file name."""
    return _tsv(path, dataset, image_dir, split)


def _tsv(path, dataset, image_dir, split=None):
    if not image_dir:
        raise ValueError("a TSV's images are written out: give --image-dir")
    return vlmeval.read_tsv(path, image_dir, dataset, split)


CONVERTERS = {"chartqa": chartqa, "aokvqa": aokvqa, "docvqa": docvqa, "infovqa": infovqa, "textvqa": textvqa,
              "ai2d": ai2d, "sqa": sqa, "mathvista": mathvista, "ocrbench": ocrbench, "mmstar": mmstar,
              "mmmu": mmmu, "vlmeval": vlmeval_tsv}


def main():
    ap = ArgumentParser(__doc__)
    ap.add_argument("benchmark", choices=sorted(CONVERTERS))
    ap.add_argument("--input", required=True, help="the benchmark's annotation file (AI2D: its questions/ folder)")
    ap.add_argument("--out", required=True, help="QA records JSONL to write")
    ap.add_argument("--split", default=None, help="ScienceQA split; A-OKVQA image folder for records without "
                                                     "a split; MMMU TSV split (default validation)")
    ap.add_argument("--ids", default=None, help="AI2D: a file of test image ids to keep")
    ap.add_argument("--image-dir", default=None, help="TSV input: where its images are written (the records' "
                                                      "image paths are relative to it: give it as --image-root)")
    ap.add_argument("--dataset", default=None, help="vlmeval: the benchmark (default: from the file name)")
    ap.add_argument("--image-prefix", default="",
                    help="put this folder in front of every image path (e.g. chartqa/), so that records of several "
                         "benchmarks share one --image-root holding each benchmark's images in its own folder")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    args = ap.parse_args()
    if os.path.exists(args.out) and not args.overwrite:
        raise UserError(f"--out {args.out} exists; nothing was changed (--overwrite replaces it)")
    kw = {"ids": args.ids, "image_dir": args.image_dir, "dataset": args.dataset}
    if args.split:
        kw["split"] = args.split
    if not os.path.exists(args.input):
        raise UserError(f"--input {args.input}: no such file or directory")
    try:
        records = list(CONVERTERS[args.benchmark](args.input, **kw))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"--input {args.input} does not look like {args.benchmark}'s released format ({e!r})")
    for r in records:
        if args.image_prefix and r.get("image"):
            r["image"] = os.path.join(args.image_prefix, r["image"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} {args.benchmark} records to {args.out}")


if __name__ == "__main__":
    cli(main)
