"""VLMEvalKit's benchmark TSV files -> QA records, the inline base64 images written out as files.

    python -m data.convert vlmeval --input MMStar.tsv --image-dir data/mmstar_images --out mmstar.jsonl
    python evaluate.py --data mmstar.jsonl --image-root data/mmstar_images ...

A VLMEvalKit TSV (the files its run.py downloads into $LMUData) has one row per question: "index", "question",
the option columns "A", "B", ... (multiple choice), "answer" (a letter, a text, or a Python list of texts for the
VQA sets), "hint", and the image: "image" holds base64 (or, to save space, the index of another row with the same
image; or a Python list of base64 strings for multi-image questions), or "image_path" names a file instead.
Images are written to IMAGE_DIR/<index>.<format> (<index>_<k>.<format> for the k-th image of a question) with
their bytes as stored; a record's "image" is relative to IMAGE_DIR. An existing file with the same bytes is kept;
with other bytes it is an error: nothing is ever overwritten or deleted.

Per benchmark (the dataset comes from --dataset or the file's name, e.g. AI2D_TEST.tsv -> ai2d):
  a hint becomes "Context: <hint>\\n" before the question (LLaVA's ScienceQA form);
  MMMU (MMMU_DEV_VAL.tsv) keeps the rows of --split (default "validation"); questions without options are open;
    a multi-image question keeps its FIRST image as "image" (as MMMU's own LLaVA baseline does) and lists all in
    meta["images"], the "<image k>" tags staying in the text (records carry one image: data/formats.py);
  MathVista (MathVista_MINI.tsv): choices from "choices", the gold letter from "answer_option" (or the answer's
    option), question_type, answer_type, precision, unit in meta; the question (its official query: hint,
    question, choices) is kept whole in meta["query"] and, for the prompt, without its "Choices:" block (our
    prompt lists the options itself);
  OCRBench: its category in meta["type"] (the HME100k rule keys on it).
"""

import ast
import base64
import binascii
import csv
import os
import re
import sys

from data.prompts import LETTERS

FILE_DATASETS = {"AI2D_TEST": "ai2d", "ScienceQA_TEST": "sqa", "ScienceQA_VAL": "sqa", "MMStar": "mmstar",
                 "A-OKVQA": "aokvqa", "MMMU_DEV_VAL": "mmmu", "ChartQA_TEST": "chartqa", "DocVQA_VAL": "docvqa",
                 "InfoVQA_VAL": "infovqa", "TextVQA_VAL": "textvqa", "OCRBench": "ocrbench",
                 "MathVista_MINI": "mathvista"}
_MAGIC = [(b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"RIFF", "webp"), (b"BM", "bmp")]


def dataset_of(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    for name, ds in FILE_DATASETS.items():
        if stem.lower() == name.lower() or stem.lower().startswith(name.lower()):
            return ds
    raise ValueError(f"cannot tell the benchmark from the file name {stem!r} (known: {sorted(FILE_DATASETS)}); "
                     "give --dataset")


def _list_or_str(s):
    """VLMEvalKit's toliststr: "['a', 'b']" -> ['a', 'b']; anything else -> [s]."""
    if len(s) > 1 and s[0] == "[" and s[-1] == "]":
        try:
            value = ast.literal_eval(s)
        except (ValueError, SyntaxError):
            return [s]
        if isinstance(value, list):
            return [str(x) for x in value]
    return [s]


def write_image(b64, image_dir, stem):
    """Decode one base64 image to IMAGE_DIR/STEM.<format>; returns the file name."""
    try:
        raw = base64.b64decode(b64, validate=False)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image of row {stem}: not base64 ({e})") from None
    ext = next((e for magic, e in _MAGIC if raw.startswith(magic)), "img")
    name = f"{stem}.{ext}"
    path = os.path.join(image_dir, name)
    if os.path.exists(path):
        with open(path, "rb") as f:
            if f.read() != raw:
                raise ValueError(f"{path} exists with other content; not overwriting it (choose another "
                                 "--image-dir)")
        return name
    with open(path + ".part", "wb") as f:
        f.write(raw)
    os.replace(path + ".part", path)
    return name


def read_rows(path):
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_tsv(path, image_dir, dataset=None, split=None):
    """QA records of one VLMEvalKit TSV (images written under image_dir)."""
    dataset = dataset or dataset_of(path)
    rows = read_rows(path)
    if not rows or "index" not in rows[0] or "question" not in rows[0]:
        raise ValueError(f"{path}: not a VLMEvalKit TSV (no 'index' / 'question' columns)")
    if dataset == "mmmu" and "split" in rows[0]:
        rows = [r for r in rows if r["split"] == (split or "validation")]
    images = {r["index"]: r.get("image") or "" for r in rows}
    os.makedirs(image_dir, exist_ok=True)
    for r in rows:
        yield record(r, dataset, images, image_dir)


def _images(row, images, image_dir):
    img = images.get(row["index"], "")
    if 0 < len(img) <= 64:                            # a reference to the row that holds the image
        img = images.get(img, "")
        if len(img) <= 64:
            raise ValueError(f"row {row['index']}: its image refers to a row without one")
    if img:
        blobs = _list_or_str(img)
        stems = [row["index"]] if len(blobs) == 1 else [f"{row['index']}_{k}" for k in range(len(blobs))]
        return [write_image(b, image_dir, s) for b, s in zip(blobs, stems)]
    return _list_or_str(row["image_path"]) if row.get("image_path") else []


def record(row, dataset, images, image_dir):
    files = _images(row, images, image_dir)
    question = row["question"]
    if row.get("hint"):
        question = f"Context: {row['hint']}\n{question}"
    choices = [row[c] for c in LETTERS if row.get(c)] or None
    answer = row.get("answer", "")
    answers = [answer] if choices else _list_or_str(answer)
    meta = {"vlmeval_index": row["index"]}
    if len(files) > 1:
        meta["images"] = files
    for key in ("category", "l2-category", "split"):
        if row.get(key):
            meta[key] = row[key]
    if dataset == "mathvista":
        choices, answers = _mathvista(row, meta)
        question = re.split(r"\nChoices:", question)[0] if choices else question
    if dataset == "ocrbench" and row.get("category"):
        meta["type"] = row["category"]
    if dataset == "mmmu":
        meta["question_type"] = "multiple-choice" if choices else "open"
    return {"id": f"{dataset}-{row['index']}", "image": files[0] if files else None, "question": question,
            "answers": answers or [""], "choices": choices, "dataset": dataset, "meta": meta}


def _mathvista(row, meta):
    choices = _list_or_str(row["choices"]) if row.get("choices") and row["choices"] not in ("None", "nan") else None
    for key in ("question_type", "answer_type", "unit"):
        if row.get(key) and row[key] not in ("None", "nan"):
            meta[key] = row[key]
    if row.get("precision") and row["precision"] not in ("None", "nan"):
        meta["precision"] = int(float(row["precision"]))
    meta["query"] = row["question"]
    answer = row.get("answer", "")
    if choices:
        meta.setdefault("question_type", "multi_choice")
        letter = row.get("answer_option") or (LETTERS[choices.index(answer)] if answer in choices else None)
        return choices, [letter or answer]
    return None, [answer]
