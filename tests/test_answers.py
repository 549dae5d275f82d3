"""Answer extraction and each benchmark's official scorer.

Every expected score in the scorer tables below was produced by running the official code itself (fetched, outside
this repository) on the same inputs; our functions are never their own oracle:
  ChartQA    google-research/pix2struct pix2struct/metrics.py relaxed_correctness
  ANLS       the RRC DocVQA/InfographicsVQA script (QwenLM/Qwen-VL eval_mm/infographicsvqa_eval.py evaluate_method),
             cross-checked with lmms-eval api/metrics.py anls
  TextVQA    LLaVA llava/eval/m4c_evaluator.py (EvalAIAnswerProcessor, TextVQAAccuracyEvaluator) and lmms-eval
             tasks/textvqa textvqa_process_results
  A-OKVQA    allenai/aokvqa evaluation/eval_predictions.py eval_aokvqa (letter forms mapped to the option text first)
  AI2D       lmms-eval tasks/ai2d MultiChoiceRegexFilter + the task's strip + api/metrics.py exact_match_hf_evaluate
             (its numpy string arrays: same outputs under numpy 1.26.4 and 2.4.6)
  ScienceQA  lmms-eval tasks/scienceqa sqa_process_results
  MathVista  lupantech/MathVista evaluation/calculate_score.py normalize_extracted_answer + safe_equal
             (python-Levenshtein's distance)
  OCRBench   Yuliang-Liu/MultimodalOCR OCRBench/example.py scoring block
  MMStar     MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py MMStar_eval per-item block
  MMMU       MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py (random.seed(42) before each unparseable choice)
"""

import pytest

from data import scorers
from data.answers import answer_text, extract, grade, mc_letter, score
from data.prompts import LETTERS


# ------------------------------------------------------------------------------------------------ official scorers

@pytest.mark.parametrize("pred,golds,want", [
    ("56", ["56"], 1.0), ("58", ["56"], 1.0), ("59", ["56"], 0.0), ("53.2", ["56"], 1.0), ("53.1", ["56"], 0.0),
    ("0.5", ["50%"], 1.0), ("50%", ["50%"], 1.0), ("0.5%", ["0.5"], 0.0), ("45%", ["45"], 0.0),
    ("Spain", ["spain"], 1.0), ("Spain.", ["Spain"], 0.0), ("Italy", ["Spain"], 0.0), ("0", ["0"], 1.0),
    ("0.01", ["0"], 0.0), ("2008", ["2010"], 1.0), ("1,000", ["1000"], 0.0), ("1000 ml", ["1000"], 0.0),
    ("$12", ["12"], 0.0), ("12", [" 12"], 1.0), ("yes", ["Yes "], 0.0), ("", ["0"], 0.0), ("", [""], 1.0),
    ("1e3", ["1000"], 1.0), ("-5", ["5"], 0.0), ("17", ["17", "1000"], 1.0), ("999", ["17", "1000"], 1.0),
    ("nan", ["nan"], 0.0), ("65 and over", ["65 and over"], 1.0),
])
def test_chartqa_relaxed_correctness(pred, golds, want):
    assert scorers.chartqa_relaxed(pred, golds) == want
    assert score("chartqa", pred, golds) == want


@pytest.mark.parametrize("pred,golds,want", [
    ("abcde", ["abcdefghij"], 0.5), ("abcdef", ["abcdefghij"], 0.6), ("abcd", ["abcdefghij"], 0.0),
    ("Hello World", ["hello world"], 1.0), ("hello wrld", ["hello world"], 0.9090909090909091),
    ("x", ["abc", "x"], 1.0), ("  spaced   out ", ["spaced out"], 1.0), ("spaced out", ["  spaced   out "], 1.0),
    ("", ["abc"], 0.0), ("", [""], 1.0), ("abc", [""], 0.0), ("1/8/93", ["1/8/93"], 1.0),
    ("1/8/1993", ["1/8/93"], 0.75), ("$1,284.50", ["1,284.50"], 0.8888888888888888),
    ("straße", ["strasse"], 0.7142857142857143), ("STRASSE", ["straße"], 0.7142857142857143),
    ("65 and over", ["65 and over"], 1.0), ("65", ["65 and over"], 0.0), ("pinterest.", ["pinterest"], 0.9),
    ("ab", ["abc", "abd"], 0.6666666666666667), ("a b", ["ab"], 0.6666666666666667),
    ("Pinterest", ["pinterest", "Pinterest Inc"], 1.0),
])
def test_anls(pred, golds, want):
    assert scorers.anls(pred, golds) == pytest.approx(want, abs=1e-12)
    assert score("docvqa", pred, golds) == score("infovqa", pred, golds) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("pred,golds,want", [
    ("lets go", ["let's go"] * 10, 0.0), ("let's go", ["let's go"] * 10, 1.0), ("ab", ["a,b"] * 10, 1.0),
    ("dont know", ["don't know"] * 10, 1.0), ("Two", ["2"] * 3 + ["two dogs"] * 7, 0.9),
    ("two dogs", ["2"] * 3 + ["two dogs"] * 7, 1.0), ("cat", ["cat"] + ["dog"] * 9, 0.3), ("The cat.", ["cat"] * 10, 1.0),
    ("1,000", ["1000"] * 10, 1.0), ("yes/no", ["yes no"] * 10, 1.0), ("cat's toy", ["cats toy"] * 10, 0.0),
    ("cat's toy", ["cat's toy"] * 10, 1.0), ("what?", ["what"] * 10, 1.0),
    ("nokia", ["nokia"] * 2 + ["Nokia"] + ["nokia phone"] * 7, 0.9), ("", [""] * 4 + ["x"] * 6, 1.0),
    ("none", ["0"] * 10, 1.0), ("coca-cola", ["coca cola"] * 10, 1.0), ("coca - cola", ["coca cola"] * 10, 1.0),
    ("3.5", ["3.5"] * 10, 1.0), ("e.g.", ["eg"] * 10, 1.0), ("a dog", ["dog"] * 5 + ["the dog"] * 5, 1.0),
    ("hes", ["he's"] * 10, 0.0), ("DAKOTA", ["dakota", "dakota", "x"], 0.4444444444444444), ("Im", ["i'm"] * 10, 0.0),
])
def test_textvqa_accuracy(pred, golds, want):
    assert score("textvqa", pred, golds) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("pred,choices,gold,want", [
    ("D", ["toothpick", "food", "popsicle stick", "cigarette"], "D", 1.0), ("D.", ["a", "b", "c", "cig"], "D", 1.0),
    ("(D)", ["a", "b", "c", "cig"], "D", 1.0), ("D) cig", ["a", "b", "c", "cig"], "D", 1.0),
    ("D. cig", ["a", "b", "c", "cig"], "D", 1.0), ("cig", ["a", "b", "c", "cig"], "D", 1.0),
    ("Cig", ["a", "b", "c", "cig"], "D", 0.0), ("cig.", ["a", "b", "c", "cig"], "D", 0.0),
    ("C", ["a", "b", "c", "cig"], "D", 0.0), ("", ["a", "b", "c", "cig"], "D", 0.0),
    ("E", ["a", "b", "c", "cig"], "D", 0.0), ("d", ["a", "b", "c", "cig"], "D", 0.0),
    ("The answer is D", ["a", "b", "c", "cig"], "D", 0.0), ("B", ["x", "y", "z", "w"], "B", 1.0),
    ("A. wrong text", ["uk", "cuba", "usa", "mexico"], "A", 1.0), ("uk", ["uk", "cuba", "usa", "mexico"], "A", 1.0),
    ("usa", ["uk", "cuba", "usa", "mexico"], "A", 0.0), ("A.uk", ["uk", "cuba", "usa", "mexico"], "A", 0.0),
    ("mexico", ["uk", "cuba", "usa", "mexico"], "D", 1.0), ("Option D", ["uk", "cuba", "usa", "mexico"], "D", 0.0),
])
def test_aokvqa_multiple_choice(pred, choices, gold, want):
    assert score("aokvqa", pred, [gold], choices) == want


@pytest.mark.parametrize("pred,choices,gold,want", [
    ("B", ["c", "D", "b", "a"], "B", 1.0), ("B.", ["c", "D", "b", "a"], "B", 1.0),
    ("(B)", ["c", "D", "b", "a"], "B", 1.0), ("D", ["c", "D", "b", "a"], "B", 0.0),
    ("b", ["c", "D", "b", "a"], "B", 1.0), ("b.", ["c", "D", "b", "a"], "B", 1.0),
    ("B. D", ["c", "D", "b", "a"], "B", 1.0), ("B) D", ["c", "D", "b", "a"], "B", 0.0),
    ("B: D", ["c", "D", "b", "a"], "B", 0.0), ("The answer is B", ["x", "y"], "B", 0.0), ("y", ["x", "y"], "B", 0.0),
    ("  B. y", ["x", "y"], "B", 1.0), ("", ["x", "y"], "B", 0.0), ("A", ["x", "y"], "B", 0.0),
    ("B!", ["x", "y"], "B", 1.0), ("'B'", ["x", "y"], "B", 1.0), ("**B**", ["x", "y"], "B", 1.0),
    ("C. larva", ["egg", "larva", "pupa"], "C", 1.0), ("Cat. larva", ["egg", "larva", "pupa"], "C", 0.0),
    ("c) pupa", ["egg", "larva", "pupa"], "C", 0.0),
    # exact_match compares numpy string arrays: trailing NULs vanish, lower() is cut to the text's width
    ("B\0", ["x", "y"], "B", 1.0), ("B\0.", ["x", "y"], "B", 1.0), ("b\0\0", ["x", "y"], "B", 1.0),
    ("İ", list("abcdefghi"), "I", 1.0), ("İ\0", list("abcdefghi"), "I", 0.0), ("(İ)", list("abcdefghi"), "I", 0.0),
])
def test_ai2d(pred, choices, gold, want):
    assert score("ai2d", pred, [gold], choices) == want


@pytest.mark.parametrize("pred,choices,gold,want", [
    ("A", ["West Virginia", "Louisiana"], "A", 1.0), ("a", ["x", "y"], "A", 1.0), ("A.", ["x", "y"], "A", 1.0),
    ("A. West Virginia", ["x", "y"], "A", 1.0), ("(A)", ["x", "y"], "A", 0.0), ("A)", ["x", "y"], "A", 0.0),
    ("B", ["x", "y"], "A", 0.0), ("a. x", ["x", "y"], "A", 0.0), ("x", ["x", "y"], "A", 0.0),
    ("", ["x", "y"], "A", 0.0), (" A ", ["x", "y"], "A", 1.0), ("A: x", ["x", "y"], "A", 0.0),
    ("Answer: A", ["x", "y"], "A", 0.0), ("A.B", ["x", "y"], "A", 1.0), ("B.", ["x", "y"], "B", 1.0),
    ("C. z", ["x", "y", "z"], "C", 1.0), ("The answer is A.", ["x", "y"], "A", 0.0), ("A,", ["x", "y"], "A", 0.0),
    ("b", ["x", "y"], "B", 1.0), ("E. a", ["a", "b", "c", "d", "e"], "E", 1.0),
])
def test_scienceqa(pred, choices, gold, want):
    assert score("sqa", pred, [gold], choices) == want


@pytest.mark.parametrize("pred,choices,qtype,atype,precision,gold,want", [
    ("145", ["145°", "35°", "55°", "125°"], "multi_choice", "text", None, "145°", 1.0),
    ("A", ["145°", "35°", "55°", "125°"], "multi_choice", "text", None, "145°", 1.0),
    ("(A) 145°", ["145°", "35°", "55°", "125°"], "multi_choice", "text", None, "145°", 1.0),
    ("a", ["145°", "35°", "55°", "125°"], "multi_choice", "text", None, "145°", 0.0),
    ("B", ["145°", "35°", "55°", "125°"], "multi_choice", "text", None, "145°", 0.0),
    ("", ["1000", "1500", "2000"], "multi_choice", "text", None, "1500", 0.0),
    ("1500 ml", ["1000", "1500", "2000"], "multi_choice", "text", None, "1500", 1.0),
    ("E", ["1000", "1500", "2000"], "multi_choice", "text", None, "1500", 0.0),
    ("12", [], "free_form", "integer", None, "12", 1.0), ("12.7", [], "free_form", "integer", None, "12", 1.0),
    ("12.0", [], "free_form", "integer", None, "12", 1.0), ("1,000", [], "free_form", "integer", None, "1000", 0.0),
    ("1000 ml", [], "free_form", "integer", None, "1000", 0.0), (" 7 ", [], "free_form", "integer", None, "7", 1.0),
    ("1e3", [], "free_form", "integer", None, "1000", 1.0), ("-3", [], "free_form", "integer", None, "-3", 1.0),
    ("1.20", [], "free_form", "float", 1.0, "1.2", 1.0), ("1.25", [], "free_form", "float", 1.0, "1.2", 1.0),
    ("3.1416", [], "free_form", "float", 2.0, "3.14", 1.0), ("3.2", [], "free_form", "float", 2.0, "3.14", 0.0),
    ("0.6", [], "free_form", "float", 2.0, "0.60", 0.0), ("56%", [], "free_form", "float", 1.0, "56.0", 0.0),
    ("$1.45", [], "free_form", "float", 2.0, "1.45", 0.0),
    ("[2007, 2008]", [], "free_form", "list", None, "[2007, 2008]", 1.0),
    ("[2007,2008]", [], "free_form", "list", None, "[2007, 2008]", 0.0),
])
def test_mathvista_calculate_score(pred, choices, qtype, atype, precision, gold, want):
    meta = {"question_type": qtype, "answer_type": atype, "precision": precision}
    stored = LETTERS[choices.index(gold)] if qtype == "multi_choice" else gold      # MC golds are stored as letters
    assert score("mathvista", pred, [stored], choices or None, meta) == want


@pytest.mark.parametrize("pred,golds,subset,want", [
    ("CENTRE", "CENTRE", "IIIT5K", 1.0), ("centre", "CENTRE", "IIIT5K", 1.0),
    ("The word is CENTRE.", "CENTRE", "IIIT5K", 1.0), ("CENTER", "CENTRE", "IIIT5K", 0.0),
    ("", "CENTRE", "IIIT5K", 0.0), ("anything", "", "IIIT5K", 1.0),
    ("nokia 3310", ["Nokia", "nokia phone"], "textVQA", 1.0), ("phone", ["Nokia", "nokia phone"], "textVQA", 0.0),
    ("y_2 = -1", ["y _ { 2 } = - 1\n", "y_2 = - 1\n"], "HME100k", 1.0),
    ("Y_2=-1", ["y _ { 2 } = - 1\n", "y_2 = - 1\n"], "HME100k", 0.0),
    ("y _ { 2 } = - 1", ["y _ { 2 } = - 1\n"], "HME100k", 1.0), ("x^{2}", "X^{2}", "HME100k", 0.0),
    ("x ^ { 2 }", "x^{2}", "HME100k", 1.0), ("a\nb", "a b", "docVQA", 1.0), ("ab", "a b", "docVQA", 0.0),
    ("12 April", ["12 april"], "SROIE", 1.0), ("$5.00", ["5.00"], "SROIE", 1.0), ("5", ["5.00"], "SROIE", 0.0),
    ("  spaced  ", ["spaced"], "svt", 1.0), ("65", ["65 and over"], "ChartQA", 0.0),
])
def test_ocrbench(pred, golds, subset, want):
    golds = golds if isinstance(golds, list) else [golds]
    assert score("ocrbench", pred, golds, meta={"dataset_name": subset}) == want


@pytest.mark.parametrize("pred,gold,want", [
    ("B", "B", 1.0), ("b", "B", 1.0), ("B. cat", "B", 1.0), ("(B)", "B", 1.0), ("(b) cat", "B", 1.0),
    ("Option B", "B", 1.0), ("option b", "B", 1.0), ("The answer is B", "B", 1.0), ("the answer is b.", "B", 1.0),
    ("Answer: B", "B", 0.0), ("bananas", "B", 1.0), ("A", "B", 0.0), ("", "B", 0.0), ("  B  ", "B", 1.0),
    ("\nB", "B", 1.0), ("The correct answer is B", "B", 0.0), ("B) x", "B", 1.0), ("[B]", "B", 0.0),
    ("option  B", "B", 0.0), ("(", "B", 0.0),
])
def test_mmstar(pred, gold, want):
    assert score("mmstar", pred, [gold], ["w", "x", "y", "z"]) == want


@pytest.mark.parametrize("pred,gold,options,want", [
    ("A", "A", ["uk", "cuba", "usa", "mexico"], 1.0), ("(B)", "B", ["uk", "cuba", "usa", "mexico"], 1.0),
    ("The answer is (C) usa.", "C", ["uk", "cuba", "usa", "mexico"], 1.0),
    ("B.", "B", ["uk", "cuba", "usa", "mexico"], 1.0), ("B. cuba", "B", ["uk", "cuba", "usa", "mexico"], 0.0),
    ("I think B or maybe C", "C", ["uk", "cuba", "usa", "mexico"], 1.0),
    ("(A) is wrong, (B) is right", "B", ["uk", "cuba", "usa", "mexico"], 1.0),
    ("the bus is clearly located somewhere in the usa", "C", ["uk", "cuba", "usa", "mexico"], 1.0),
    ("usa", "C", ["uk", "cuba", "usa", "mexico"], 0.0), ("d", "D", ["uk", "cuba", "usa", "mexico"], 0.0),
    ("12", "12", None, 1.0), ("12.0", "12", None, 1.0), ("1,200", "1200", None, 1.0),
    ("The answer is 3.14159", "3.14", None, 1.0), ("so the value is 5 m", "5", None, 1.0), ("x = 7", "7", None, 1.0),
    ("It is Paris.", "paris", None, 1.0), ("a", "b", None, 0.0), ("The result is 2e3", "2000", None, 1.0),
    ("answer 3 or 4", ["4", "4.0"], None, 1.0), ("", "0", None, 0.0), ("ab", "b", None, 0.0),
])
def test_mmmu(pred, gold, options, want):
    assert score("mmmu", pred, gold if isinstance(gold, list) else [gold], options) == want


# ------------------------------------------------------------------------------------------------ extraction

@pytest.mark.parametrize("text,want,found", [
    ("The bus is red.\n\n### Answer: A. uk", "A. uk", True),
    ("reasoning\n\n**### Answer:** **C**", "C", True),                   # a bolded marker leaves "*" around
    ("first guess\n### Answer: 12\nwait, no\n### Answer: 14", "14", True),  # the last marker wins
    ("### Answer:\n\n  1,234 meters.  \nmore text", "1,234 meters.", True),  # first non-empty line, kept as written
    ("### answer: 56%", "56%", True), ("# Answer: $12.50", "$12.50", True), ("#### **Answer**: 9", "9", True),
    ("### Answer: 65 and over", "65 and over", True),
    ("### Answer:", "", True),
    ("Adding them up, the answer is 42.", "Adding them up, the answer is 42.", False),   # no marker: all of it
    ("  It shows a bar chart\n42\n", "It shows a bar chart\n42", False),
    ("", "", False),
])
def test_answer_text(text, want, found):
    assert answer_text(text) == (want, found)


def test_mc_letter_is_the_papers_answer_form_only():
    ch = ["uk", "cuba", "usa", "mexico"]
    assert [mc_letter(a, ch) for a in ("A. uk", "D.", "D", "B. whatever")] == ["A", "D", "D", "B"]
    assert [mc_letter(a, ch) for a in ("E. x", "(A)", "uk", "A) uk", "a. uk")] == ["E. x", "(A)", "uk", "A) uk", "a. uk"]


LETTER_OPTIONS = {"id": "1", "dataset": "ai2d", "question": "Which label is the larva?",
                  "choices": ["c", "D", "b", "a"], "answers": ["B"]}


@pytest.mark.parametrize("text,mode,want", [
    ("reasons\n\n### Answer: B", "cot", ("B", 1.0, True)), ("### Answer: B.", "cot", ("B", 1.0, True)),
    ("### Answer: (B)", "cot", ("(B)", 1.0, True)), ("### Answer: B. D", "cot", ("B", 1.0, True)),
    ("B.", "direct", ("B", 1.0, True)), ("(B)", "direct", ("(B)", 1.0, True)),
    ("D", "direct", ("D", 0.0, True)),                     # the option whose text is "D" is letter B: wrong
    ("no marker, B", "cot", ("no marker, B", 0.0, False)),
])
def test_grade_mc_whose_options_are_letters(text, mode, want):
    assert grade(LETTER_OPTIONS, text, mode) == want


def test_grade_issue_cases():
    doc = {"dataset": "docvqa", "answers": ["65 and over"], "choices": None}
    assert grade(doc, "### Answer: 65 and over", "cot") == ("65 and over", 1.0, True)      # nothing stripped
    chart = {"dataset": "chartqa", "answers": ["1000"], "choices": None}
    assert grade(chart, "### Answer: 1,000", "cot")[1] == 0.0                             # as pix2struct
    assert grade(chart, "1000\nbecause the bar", "direct")[1] == 0.0                      # the whole direct output
    mv = {"dataset": "mathvista", "answers": ["A"], "choices": ["145°", "35°", "55°", "125°"],
          "meta": {"question_type": "multi_choice", "answer_type": "text"}}
    assert grade(mv, "### Answer: 145", "cot")[1] == 1.0                                  # nearest option
    mmmu = {"dataset": "mmmu", "answers": ["B"], "choices": ["uk", "cuba", "usa", "mexico"]}
    assert grade(mmmu, "### Answer: B. cuba", "cot") == ("B", 1.0, True)                  # the paper's "B. cuba"
    tv = {"dataset": "textvqa", "answers": ["let's go"] * 10, "choices": None}
    assert grade(tv, "### Answer: lets go", "cot")[1] == 0.0
    ocr = {"dataset": "ocrbench", "answers": ["CENTRE"], "choices": None, "meta": {"dataset_name": "IIIT5K"}}
    assert grade(ocr, "The word reads CENTRE", "cot") == ("The word reads CENTRE", 1.0, False)


# ------------------------------------------------------------------------------------------------ synthetic task

@pytest.mark.parametrize("text,choices,numeric,want,found", [
    ("The bus is red.\n\n### Answer: A. uk", ["uk", "cuba"], False, "A", True),
    ("### answer: cuba.", ["uk", "cuba"], False, "B", True),                  # an option's text -> its letter
    ("The total is large.\n\n### Answer: 1,234 meters.", None, True, "1234", True),
    ("### Answer: 56%", None, True, "56", True),
    ("Adding them up, the answer is 42.", None, True, "42", False),          # no marker: fallback, flagged
    ("It shows a bar chart\n42", None, True, "42", False),
])
def test_synthetic_extraction(text, choices, numeric, want, found):
    assert extract(text, choices, numeric) == (want, found)


def test_synthetic_metric_and_grade():
    assert score("synthetic", "4.50", ["4.5"]) == 1.0 and score("synthetic", "4.6", ["4.5"]) == 0.0
    assert score("synthetic", "a 6 , b 0", ["A 6, B 0"]) == 1.0
    assert score("synthetic", "Yes", ["yes"]) == 1.0
    rec = {"dataset": "synthetic", "answers": ["12"], "choices": None}
    assert grade(rec, "steps\n### Answer: 12 units.") == ("12", 1.0, True)
    assert grade(rec, "12\nmore", "direct") == ("12", 1.0, True)


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown dataset 'vqav2'; known: .*chartqa"):
        score("vqav2", "a", ["a"])


def test_a_gold_given_as_option_text_is_its_letter():
    ch = ["egg", "larva", "pupa"]
    for ds in ("ai2d", "sqa", "mmstar", "mmmu", "aokvqa", "mathvista"):
        assert score(ds, "B", ["larva"], ch) == score(ds, "B", ["B"], ch) == 1.0, ds
    assert score("ai2d", "D", ["D"], ["c", "D", "b", "a"]) == 1.0 and score("ai2d", "B", ["D"], ["c", "D", "b", "a"]) == 0
