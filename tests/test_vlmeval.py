"""VLMEvalKit TSVs and the new benchmark converters (OCRBench, MMStar, MMMU, MathVista's query, A-OKVQA's split);
evaluate.py --rescore with the official scorers, the paper-layout table and the opt-in MathVista GPT extraction."""

import base64
import csv
import io
import json
import os

import pytest
from PIL import Image

import evaluate
from data import convert, vlmeval
from data.formats import validate_qa
from fake_openai import FakeOpenAI, Reply


def image_bytes(color, fmt="PNG"):
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buf, fmt)
    return buf.getvalue()


def b64(raw):
    return base64.b64encode(raw).decode()


def write_tsv(path, rows):
    cols = sorted({k for r in rows for k in r}, key=lambda k: (k != "index", k))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


RED, BLUE, JPG = image_bytes("red"), image_bytes("blue"), image_bytes("green", "JPEG")


def test_mmstar_tsv_images_written_once_and_nothing_else_touched(tmp_path):
    tsv = tmp_path / "MMStar.tsv"
    write_tsv(tsv, [
        {"index": "0", "question": "Which color?", "A": "red", "B": "blue", "C": "green", "D": "pink", "answer": "A",
         "image": b64(RED), "category": "coarse perception", "l2-category": "image style & quality"},
        {"index": "1", "question": "Same image, other question", "A": "x", "B": "y", "C": "", "D": "",
         "answer": "B", "image": "0"},                        # VLMEvalKit's reference to row 0's image
        {"index": "2", "question": "A jpeg", "A": "x", "B": "y", "answer": "B", "image": b64(JPG)}])
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "mine.txt").write_text("keep me")
    recs = list(convert.CONVERTERS["mmstar"](str(tsv), image_dir=str(images)))
    for r in recs:
        validate_qa(dict(r), "mmstar")
    assert [r["image"] for r in recs] == ["0.png", "1.png", "2.jpg"]
    assert (images / "0.png").read_bytes() == RED and (images / "1.png").read_bytes() == RED
    assert (images / "2.jpg").read_bytes() == JPG
    assert recs[0]["choices"] == ["red", "blue", "green", "pink"] and recs[0]["answers"] == ["A"]
    assert recs[1]["choices"] == ["x", "y"] and recs[0]["meta"]["category"] == "coarse perception"
    assert recs[0]["dataset"] == "mmstar" and recs[0]["id"] == "mmstar-0"
    # a second run finds the same bytes and keeps them; other content is never overwritten
    assert len(list(vlmeval.read_tsv(str(tsv), str(images)))) == 3
    (images / "2.jpg").write_bytes(BLUE)
    with pytest.raises(ValueError, match="exists with other content"):
        list(vlmeval.read_tsv(str(tsv), str(images)))
    assert (images / "2.jpg").read_bytes() == BLUE and (images / "mine.txt").read_text() == "keep me"
    assert sorted(os.listdir(images)) == ["0.png", "1.png", "2.jpg", "mine.txt"]


def test_mmmu_tsv_validation_split_multi_image_and_open(tmp_path):
    tsv = tmp_path / "MMMU_DEV_VAL.tsv"
    write_tsv(tsv, [
        {"index": "1", "split": "dev", "question": "dev row", "A": "a", "B": "b", "answer": "A", "image": b64(RED)},
        {"index": "2", "split": "validation", "question": "Compare <image 1> and <image 2>", "A": "left",
         "B": "right", "answer": "B", "image": str([b64(RED), b64(BLUE)])},
        {"index": "3", "split": "validation", "question": "How many? <image 1>", "answer": "12",
         "image": b64(BLUE)}])
    recs = list(convert.mmmu(str(tsv), image_dir=str(tmp_path / "im")))
    assert [r["id"] for r in recs] == ["mmmu-2", "mmmu-3"]
    mc, open_ = recs
    assert mc["image"] == "2_0.png" and mc["meta"]["images"] == ["2_0.png", "2_1.png"]
    assert (tmp_path / "im/2_1.png").read_bytes() == BLUE and "<image 2>" in mc["question"]
    assert mc["meta"]["question_type"] == "multiple-choice" and mc["answers"] == ["B"]
    assert open_["choices"] is None and open_["answers"] == ["12"] and open_["meta"]["question_type"] == "open"


def test_vqa_mathvista_and_ocrbench_tsvs(tmp_path):
    tv = tmp_path / "TextVQA_VAL.tsv"
    write_tsv(tv, [{"index": "7", "question": "brand?", "answer": str(["nokia"] * 9 + ["Nokia phone"]),
                    "image": b64(RED)}])
    rec = next(convert.CONVERTERS["vlmeval"](str(tv), image_dir=str(tmp_path / "tv")))
    assert rec["dataset"] == "textvqa" and len(rec["answers"]) == 10 and rec["choices"] is None

    mv = tmp_path / "MathVista_MINI.tsv"
    query = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the "
             "end.\nQuestion: What is the angle?\nChoices:\n(A) 145°\n(B) 35°")
    write_tsv(mv, [{"index": "9", "question": query, "answer": "145°", "answer_option": "A",
                    "choices": str(["145°", "35°"]), "question_type": "multi_choice", "answer_type": "text",
                    "precision": "", "image": b64(RED)}])
    rec = next(vlmeval.read_tsv(str(mv), str(tmp_path / "mv")))
    assert rec["choices"] == ["145°", "35°"] and rec["answers"] == ["A"] and rec["meta"]["query"] == query
    assert "Choices" not in rec["question"] and rec["question"].startswith("Hint:")
    assert evaluate.grade(rec, "### Answer: 145", "cot")[1] == 1.0

    ocr = tmp_path / "OCRBench.tsv"
    write_tsv(ocr, [{"index": "0", "question": "formula?", "answer": str(["x ^ { 2 }"]), "image": b64(RED),
                     "category": "Handwritten Mathematical Expression Recognition"}])
    rec = next(vlmeval.read_tsv(str(ocr), str(tmp_path / "ocr")))
    assert evaluate.grade(rec, "x^{2}", "direct")[1] == 1.0              # HME100k: spaces removed


def test_tsv_needs_a_known_name_or_dataset(tmp_path):
    write_tsv(tmp_path / "mystery.tsv", [{"index": "0", "question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match="give --dataset"):
        list(vlmeval.read_tsv(str(tmp_path / "mystery.tsv"), str(tmp_path / "im")))
    rec = next(vlmeval.read_tsv(str(tmp_path / "mystery.tsv"), str(tmp_path / "im"), dataset="docvqa"))
    assert rec["image"] is None and rec["answers"] == ["a"]


def test_ocrbench_mathvista_and_aokvqa_converters(tmp_path):
    (tmp_path / "OCRBench.json").write_text(json.dumps([
        {"dataset_name": "IIIT5K", "id": 2843, "image_path": "IIIT5K/test/918_1.png",
         "question": "what is written in the image?", "answers": "CENTRE", "type": "Regular Text Recognition"},
        {"dataset_name": "HME100k", "id": 14413, "image_path": "HME100K/test/test_images/test_17522.jpg",
         "question": "Please write out the expression of the formula in the image using LaTeX format.",
         "answers": ["y _ { 2 } = - 1\n", "y_2 = - 1\n"], "type": "Handwritten Mathematical Expression Recognition"}]))
    recs = list(convert.ocrbench(str(tmp_path / "OCRBench.json")))
    assert [r["answers"] for r in recs] == [["CENTRE"], ["y _ { 2 } = - 1\n", "y_2 = - 1\n"]]
    assert recs[1]["meta"]["dataset_name"] == "HME100k" and recs[0]["image"] == "IIIT5K/test/918_1.png"

    (tmp_path / "testmini.json").write_text(json.dumps({"3": {
        "question": "How many?", "image": "images/3.jpg", "choices": None, "unit": "cm", "precision": None,
        "answer": "4", "question_type": "free_form", "answer_type": "integer",
        "query": "Hint: Please answer the question requiring an integer answer ...\nQuestion: How many?"}}))
    rec = next(convert.mathvista(str(tmp_path / "testmini.json")))
    assert rec["meta"]["unit"] == "cm" and rec["meta"]["query"].startswith("Hint:")

    (tmp_path / "aokvqa_v1p0_val.json").write_text(json.dumps([
        {"split": "test", "image_id": 5, "question_id": "a", "question": "q", "choices": ["x", "y"]},
        {"image_id": 6, "question_id": "b", "question": "q", "choices": ["x", "y"], "correct_choice_idx": 1}]))
    with pytest.raises(ValueError, match="give --split"):
        list(convert.aokvqa(str(tmp_path / "aokvqa_v1p0_val.json")))
    recs = list(convert.aokvqa(str(tmp_path / "aokvqa_v1p0_val.json"), split="train"))
    assert [r["image"] for r in recs] == ["test2017/000000000005.jpg", "train2017/000000000006.jpg"]


# ------------------------------------------------------------------------------------------------ rescore

RECORDS = [
    {"id": "d1", "dataset": "docvqa", "question": "q", "image": None, "choices": None, "answers": ["abcdefghij"]},
    {"id": "a1", "dataset": "ai2d", "question": "q", "image": None, "choices": ["c", "D", "b", "a"],
     "answers": ["B"]},
    {"id": "m1", "dataset": "mathvista", "question": "Angle?", "image": None, "choices": ["145°", "35°"],
     "answers": ["A"], "meta": {"question_type": "multi_choice", "answer_type": "text"}},
    {"id": "m2", "dataset": "mathvista", "question": "How many?", "image": None, "choices": None,
     "answers": ["12"], "meta": {"question_type": "free_form", "answer_type": "integer",
                                 "query": "Hint: integer\nQuestion: How many?"}},
]
OUTPUTS = {("d1", "direct"): "abcde", ("a1", "cot"): "so\n\n### Answer: B", ("m1", "cot"): "### Answer: 145",
           ("m2", "cot"): "There are twelve of them, 12 in all."}


def write_predictions(tmp_path):
    (tmp_path / "recs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "eval"
    out.mkdir()
    rows = [{"id": i, "dataset": next(r["dataset"] for r in RECORDS if r["id"] == i), "mode": m, "output": o,
             "answer": "stale", "score": 0.0, "format_ok": False,
             "gold": next(r["answers"] for r in RECORDS if r["id"] == i)} for (i, m), o in OUTPUTS.items()]
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def preds(out):
    return {(r["id"], r["mode"]): r for r in map(json.loads, open(out / "predictions.jsonl"))}


def test_rescore_uses_the_official_scorers_and_the_paper_layout(tmp_path, capsys):
    out = write_predictions(tmp_path)
    with pytest.raises(SystemExit, match="need their QA records"):       # MathVista needs its options and type
        evaluate.main(["--out", str(out), "--rescore"])
    assert evaluate.main(["--out", str(out), "--rescore", "--data", str(tmp_path / "recs.jsonl")]) == 0
    got = {k: (r["answer"], r["score"]) for k, r in preds(out).items()}
    assert got == {("d1", "direct"): ("abcde", 0.5),                     # ANLS exactly at its threshold is kept
                   ("a1", "cot"): ("B", 1.0),                            # letter options "c, D, b, a": B is B
                   ("m1", "cot"): ("145", 1.0),                          # nearest option "145°"
                   ("m2", "cot"): ("There are twelve of them, 12 in all.", 0.0)}   # no marker, no GPT: wrong
    md = (out / "results.md").read_text()
    assert "| mode | A-OK | Chart | Doc | Info | Text | AI2D | SQA | MathV | Avg |" in md
    assert "| direct | - | - | 50.0 | - | - | - | - | - | 50.0 (1/8) |" in md
    assert "| cot | - | - | - | - | - | 100.0 | - | 50.0 | 75.0 (2/8) |" in md
    paper = json.load(open(out / "results.json"))["paper_table"]
    assert paper["cot"]["MathV"] == 50.0 and paper["cot"]["Avg of"] == 2


def test_gpt_extraction_shows_the_cost_first_then_goes_through_distills_client(tmp_path, capsys, monkeypatch):
    out = write_predictions(tmp_path)
    data = ["--data", str(tmp_path / "recs.jsonl")]
    def behave(req, attempt):
        return Reply(text="A" if "Angle?" in req["messages"][0]["content"] else "12")

    with FakeOpenAI(behave) as server:
        args = ["--out", str(out), "--rescore", *data, "--gpt-extract", "gpt-4o-mini", "--gpt-base-url", server.url]
        assert evaluate.main(args) == 0                                   # no --gpt-confirm: nothing sent
        assert "2 requests" in capsys.readouterr().out and not server.requests
        assert preds(out)[("m2", "cot")]["score"] == 0.0
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        assert evaluate.main(args + ["--gpt-confirm"]) == 0
        assert len(server.requests) == 2
        sent = next(r["body"]["messages"][0]["content"] for r in server.requests if "Angle" not in str(r["body"]))
        assert sent.startswith("Please read the following example.") and sent.endswith(
            "Hint: integer\nQuestion: How many?\n\nThere are twelve of them, 12 in all.\n\nExtracted answer: ")
        row = preds(out)[("m2", "cot")]
        assert (row["extraction"], row["extractor"], row["score"]) == ("12", "gpt-4o-mini", 1.0)
        assert preds(out)[("m1", "cot")]["extraction"] == "A" and preds(out)[("m1", "cot")]["score"] == 1.0
        # a later plain rescore keeps the paid extraction and sends nothing
        assert evaluate.main(["--out", str(out), "--rescore", *data]) == 0
        assert preds(out)[("m2", "cot")]["score"] == 1.0 and len(server.requests) == 2
