"""The synthetic chart task: determinism, gold answers recomputed from the chart data, the offline teacher."""

import hashlib
import json
import os
import random

import pytest

from data.answers import grade
from data.synthetic import FAMILIES, LEVELS, generate, steps_correct, teacher


def recompute(meta):
    """Each family's answer from the chart's numbers, written independently of data/synthetic.py's solver."""
    names, values = meta["chart"]["names"], meta["chart"]["values"]
    v = dict(zip(names, values))
    p, fam = meta["params"], meta["family"]
    num = lambda x: round(float(x), 2)  # noqa: E731
    if fam == "caption":
        return [(n, num(x)) for n, x in zip(names, values)]
    if fam == "lookup":
        return num(v[p["a"]])
    if fam == "max_label":
        return names[values.index(max(values))]
    if fam == "min_label":
        return names[values.index(min(values))]
    if fam == "compare":
        return "yes" if v[p["a"]] > v[p["b"]] else "no"
    if fam == "count_above":
        return num(sum(x > p["x"] for x in values))
    if fam == "count_below":
        return num(sum(x < p["x"] for x in values))
    if fam == "sum":
        return num(sum(v[n] for n in p["items"]))
    if fam == "diff":
        return num(max(values) - min(values))
    if fam == "average":
        return num(sum(values) / len(values))
    if fam == "ratio":
        return num(v[p["a"]] / v[p["b"]])
    if fam == "chain":
        return "yes" if v[p["a"]] > v[p["b"]] > v[p["c"]] else "no"
    raise AssertionError(fam)


def gold_value(rec):
    a = rec["answers"][0]
    if rec["choices"]:
        a = rec["choices"]["ABCDEFGHIJ".index(a)]
    if rec["meta"]["family"] == "caption":
        return [(part.rsplit(" ", 1)[0].removesuffix(" is"), round(float(part.rsplit(" ", 1)[1]), 2)) for part in a.split(", ")]
    try:
        return round(float(a), 2)
    except ValueError:
        return a


@pytest.fixture(scope="module", params=list(LEVELS))
def dataset(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    generate(str(out), 96, seed=11, level=request.param, n_test=24)
    recs = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in ("train", "test", "test_holdout")}
    return out, recs


def test_every_gold_answer_recomputes_from_the_chart(dataset):
    _, recs = dataset
    for rec in recs["train"] + recs["test"] + recs["test_holdout"]:
        assert gold_value(rec) == recompute(rec["meta"]), rec["id"]


def test_splits_families_and_holdout(dataset):
    _, recs = dataset
    train_fams = {r["meta"]["family"] for r in recs["train"]}
    assert train_fams == set(FAMILIES) - {"count_below"}
    assert {r["meta"]["family"] for r in recs["test_holdout"]} == {"count_below"}
    assert not {r["id"] for r in recs["train"]} & {r["id"] for r in recs["test"]}


def test_deterministic_from_the_seed(tmp_path):
    def digest(d):
        h = hashlib.sha256()
        for root, _, files in sorted(os.walk(d)):
            for f in sorted(files):
                h.update(f.encode() + open(os.path.join(root, f), "rb").read())
        return h.hexdigest()
    generate(str(tmp_path / "a"), 30, seed=5, level="medium", n_test=10)
    generate(str(tmp_path / "b"), 30, seed=5, level="medium", n_test=10)
    generate(str(tmp_path / "c"), 30, seed=6, level="medium", n_test=10)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")
    # record i depends on (seed, split, i) only: a longer run starts with the same records
    generate(str(tmp_path / "d"), 40, seed=5, level="medium", n_test=10)
    assert open(tmp_path / "d/train.jsonl").readlines()[:30] == open(tmp_path / "a/train.jsonl").readlines()


def test_teacher_without_errors_is_always_right_and_steps_check(dataset):
    _, recs = dataset
    rng = random.Random(0)
    for rec in recs["train"]:
        text = teacher(rec, rng, error_rate=0.0)
        answer, score, found = grade(rec, text)
        assert found and score == 1.0, (rec["id"], text, rec["answers"])
        assert text.endswith(f"### Answer: {answer}") or rec["choices"]
        assert steps_correct(rec, text), text


def test_teacher_errors_are_caught_by_the_filter_or_the_step_check(dataset):
    _, recs = dataset
    rng = random.Random(1)
    wrong_answer = wrong_steps = 0
    for rec in recs["train"]:
        text = teacher(rec, rng, error_rate=1.0)
        _, score, _ = grade(rec, text)
        wrong_answer += score < 1
        wrong_steps += not steps_correct(rec, text)
    assert wrong_answer >= len(recs["train"]) // 2          # the slips usually change the answer
    assert wrong_steps >= wrong_answer * 0.8


def test_tiny_level_is_aligned_with_16px_patches(dataset):
    out, recs = dataset
    rec = recs["train"][0]
    if rec["meta"]["level"] != "tiny":
        pytest.skip("tiny level only")
    from PIL import Image
    img = Image.open(out / rec["image"])
    assert img.size == (64, 64) and rec["meta"]["chart"]["labels"] == list("ABCD")
    px = img.load()
    for i, v in enumerate(rec["meta"]["chart"]["values"]):
        column = [px[16 * i + 8, y] for y in range(9, 54)]
        bar = sum(c != (255, 255, 255) and c != (232, 232, 232) for c in column)
        assert bar == 5 * v                                   # the value is the bar height in 5 px steps
        assert px[16 * i, 30] in ((255, 255, 255), (232, 232, 232))    # patch borders stay background


def test_step_check_reads_any_sampled_text_without_raising(dataset):
    # samples drawn at T = 1 put anything where a number goes ("A is . ", "1.2.3 > 4 yes"); a crash here once
    # stopped sample.py mid-run
    _, recs = dataset
    rec = next(r for r in recs["train"] if r["meta"]["chart"]["kind"] == "bar")
    name = rec["meta"]["chart"]["names"][0]
    assert steps_correct(rec, f"{name} is . B is 1.2.3 . 1.2.3 > . yes . 4 + . = 1..2 . -.- / 0 = inf .")
    rng = random.Random(0)
    pieces = [name, "is", ".", "..", "1.2.3", "-", "-.", "5", "0", ">", "<", "yes", "no", "=", "+", "/", "inf"]
    for _ in range(2000):
        steps_correct(rec, " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))))
    value = rec["meta"]["chart"]["values"][0]
    assert not steps_correct(rec, f"{name} is {round(value + 1, 2)} .")      # a real misreading still counts


def test_first_wrong_step_finds_the_first_step_that_does_not_check():
    from data.synthetic import first_wrong_step
    rec = {"meta": {"family": "count_above", "params": {"x": 4},
                    "chart": {"names": list("ABCD"), "values": [6, 3, 8, 1]}}}
    steps = ["A is 6 > 4 yes 1 .", "B is 3 > 4 no 1 .", "C is 8 > 4 yes 2 .", "D is 1 > 4 no 2 ."]

    def at(chain):
        text = " ".join(chain) + "\n\n### Answer: 2"
        span = first_wrong_step(rec, text)
        return None if span is None else text[span[0]:span[1]]
    assert at(steps) is None and steps_correct(rec, " ".join(steps) + "\n\n### Answer: 2")
    for k, bad in ((1, "B is 5 > 4 yes 2 ."),           # misread
                   (1, "B is 3 > 4 yes 2 ."),           # a false comparison
                   (2, "C is 8 > 4 yes 1 ."),           # a running count that does not follow
                   (0, "A is 6 > 5 yes 1 ."),           # another threshold than the question's
                   (0, "A is 6 < 4 no 0 ."),            # the other direction
                   (1, "C is 8 > 4 yes 2 .")):          # a bar out of order (B skipped)
        chain = steps[:k] + [bad] + steps[k + 1:]
        assert at(chain) == bad, (k, bad, at(chain))
    # the same misread, decoded from word-level tokens ("### Answer : 2"), is found the same way
    assert first_wrong_step(rec, "A is 6 > 4 yes 1 . B is 5 > 4 yes 2 . ### Answer : 3")[0] == len(steps[0]) + 1
    # a chain that stops early is wrong where it ends; the answer is not a step
    text = " ".join(steps[:3]) + "\n\n### Answer: 2"
    assert first_wrong_step(rec, text) == (len(" ".join(steps[:3])),) * 2
    assert first_wrong_step(rec, " ".join(steps) + "\n\n### Answer: 3") is None
