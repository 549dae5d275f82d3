"""Answer extraction (the paper's) and the dispatch to each benchmark's official scorer (data/scorers.py).

answer_text()  the paper's extraction: the first non-empty line after the last "### Answer:" marker. Stripped: the
               line's surrounding whitespace and "*" emphasis marks (a bolded "**### Answer:** **C**" leaves them).
               Nothing else: units, "%", "$", thousands separators, trailing periods and case are left to the
               benchmark's scorer, which keeps or drops them as its official code does. Without a marker the whole
               output, stripped, is what the official scorer would see: that is scored, and flagged a format failure.
mc_letter()    the paper's multiple-choice answer form "A. uk" (its SFT targets read "### Answer: A. uk") -> "A".
score()        one prediction against the golds under the dataset's official scorer:

  dataset     scorer (data/scorers.py)  source it follows
  chartqa     chartqa_relaxed           google-research/pix2struct metrics.py relaxed_correctness
  docvqa      anls                      the RRC DocVQA / InfographicsVQA evaluation script (ANLS, threshold 0.5)
  infovqa     anls                      same
  textvqa     textvqa_accuracy          EvalAI answer processor + 10-annotator leave-one-out (LLaVA m4c_evaluator)
  aokvqa      aokvqa_mc                 allenai/aokvqa evaluation/eval_predictions.py (multiple choice)
  ai2d        ai2d_mc                   lmms-eval tasks/ai2d (MultiChoiceRegexFilter + exact_match)
  sqa         sqa_mc                    lmms-eval tasks/scienceqa sqa_process_results
  mathvista   mathvista_score           lupantech/MathVista evaluation/calculate_score.py
  ocrbench    ocrbench_score            Yuliang-Liu/MultimodalOCR OCRBench (gold contained in the answer)
  mmstar      mmstar_mc                 MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py
  mmmu        mmmu_score                MMMU-Benchmark/MMMU mmmu/utils/eval_utils.py
  synthetic   synthetic_score           our own task (below): numbers to 1e-6, labels, captions
"""

import re

from data import scorers
from data.prompts import ANSWER_MARKER, LETTERS, family

_MARKER = re.compile(r"#+\s*[*_]*\s*answer\s*[*_]*\s*:", re.IGNORECASE)


def answer_text(text):
    """(answer, found_marker): the first non-empty line after the last marker, or the whole output without one."""
    matches = list(_MARKER.finditer(text))
    if not matches:
        return text.strip(), False
    tail = text[matches[-1].end():]
    line = next((ln for ln in tail.splitlines() if ln.strip()), "")
    return re.sub(r"^[\s*]+|[\s*]+$", "", line), True


_PAPER_LETTER = re.compile(r"([A-J])\.(?:\s.*)?", re.DOTALL)


def mc_letter(ans, choices):
    """'A. uk' / 'A.' -> 'A' when A is one of the options; anything else unchanged (the scorer decides)."""
    m = _PAPER_LETTER.fullmatch(ans)
    return m.group(1) if m and choices and LETTERS.index(m.group(1)) < len(choices) else ans


def gold_letters(answers, choices):
    """Golds as letters for the letter-scored benchmarks: records store letters; a gold given as an option's text
    (and not itself a letter of an option) is mapped to its letter."""
    letters = LETTERS[:len(choices or [])]
    out = []
    for g in map(str, answers):
        if choices and not (len(g) == 1 and g in letters) and g in map(str, choices):
            g = letters[[str(c) for c in choices].index(g)]
        out.append(g)
    return out


SCORERS = {
    "chartqa": lambda p, a, c, m: scorers.chartqa_relaxed(p, a),
    "docvqa": lambda p, a, c, m: scorers.anls(p, a),
    "infovqa": lambda p, a, c, m: scorers.anls(p, a),
    "textvqa": lambda p, a, c, m: scorers.textvqa_accuracy(p, a),
    "aokvqa": lambda p, a, c, m: scorers.aokvqa_mc(p, a, c or []),
    "ai2d": lambda p, a, c, m: scorers.ai2d_mc(p, gold_letters(a, c)),
    "sqa": lambda p, a, c, m: scorers.sqa_mc(p, gold_letters(a, c)),
    "scienceqa": lambda p, a, c, m: scorers.sqa_mc(p, gold_letters(a, c)),
    "mathvista": lambda p, a, c, m: scorers.mathvista_score(p, a, c, m),
    "ocrbench": lambda p, a, c, m: scorers.ocrbench_score(p, a, m),
    "mmstar": lambda p, a, c, m: scorers.mmstar_mc(p, gold_letters(a, c)),
    "mmmu": lambda p, a, c, m: scorers.mmmu_score(p, gold_letters(a, c) if c else a, c, m),
    "synthetic": lambda p, a, c, m: synthetic_score(p, a, c),
}


def score(dataset, pred, answers, choices=None, meta=None):
    """The dataset's official score of one prediction (already extracted), in [0, 1]."""
    family(dataset)                                   # an unknown dataset is an error naming the known ones
    return float(SCORERS[dataset](str(pred), list(answers), choices, meta))


def grade(record, text, mode="cot"):
    """Extract the answer of an output for a QA record and score it: (answer, score, found_marker).

    "direct" outputs are the answer itself (used whole, stripped) unless they hold a marker; "cot" outputs are read
    after the last marker. A multiple-choice "A. uk" becomes "A" (the paper's answer form)."""
    if record["dataset"] == "synthetic":
        ans, found = extract(text, record.get("choices"), numeric=True) if mode != "direct" or "###" in text else \
            extract("### Answer: " + text.strip().split("\n")[0], record.get("choices"), numeric=True)
    else:
        ans, found = answer_text(text)
        if mode == "direct" and not found:
            found = True                              # a direct answer needs no marker
        if record.get("choices"):
            ans = mc_letter(ans, record["choices"])
    return ans, score(record["dataset"], ans, record["answers"], record.get("choices"), record.get("meta")), found


def answer_line(answer):
    return f"{ANSWER_MARKER} {answer}"


# ------------------------------------------------------------------------------------------------ synthetic task
# Our own task's rules (not a benchmark): the demo's model and teacher write plain numbers, yes/no, labels and
# captions; markdown, a trailing period, units, "%" and thousands separators are tolerated.

_NUMBER = re.compile(r"^[$€£]?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)\s*(%|[a-zA-Z][a-zA-Z ./²³]{0,24})?$")


def strip_markdown(s):
    s = s.strip()
    s = re.sub(r"^[*_`\s]+|[*_`\s]+$", "", s)             # **bold**, __x__, `code`
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    return s.strip().rstrip(".").strip()


def extract(text, choices=None, numeric=False):
    """The synthetic task's extraction: (answer, found_marker). Without a marker, "the answer is X" or the last
    non-empty line stands in (found_marker False); MC answers become letters, numbers lose units, % and commas."""
    matches = list(_MARKER.finditer(text))
    found = bool(matches)
    if found:
        tail = text[matches[-1].end():]
        ans = next((line for line in tail.splitlines() if line.strip()), "")
    else:
        m = re.search(r"(?:the )?(?:final )?answer is[:\s]*(.+)", text, re.IGNORECASE)
        lines = [line for line in text.splitlines() if line.strip()]
        ans = m.group(1) if m else (lines[-1] if lines else "")
    ans = strip_markdown(ans)
    if choices:
        ans = to_letter(ans, choices)
    elif numeric:
        ans = normalize_number(ans)
    return ans, found


def to_letter(ans, choices):
    """'A', 'A.', '(A)', 'A. uk', 'A) uk', 'Option A' or an option's own text -> 'A'; anything else unchanged."""
    letters = LETTERS[:len(choices)]
    s = ans.strip()
    for i, c in enumerate(choices):                   # an option's text first: "a dog" is not letter A
        if s.lower() == str(c).strip().lower():
            return letters[i]
    m = re.fullmatch(rf"(?:option\s*)?\(?([{letters}])\)?(?:[.:)]\s*.*)?", s, re.IGNORECASE | re.DOTALL)
    return m.group(1).upper() if m else ans


def normalize_number(ans):
    """'1,000' -> '1000', '56%' -> '56', '$12.5' -> '12.5', '56 meters' -> '56'; non-numbers unchanged."""
    m = _NUMBER.match(ans.strip())
    return m.group(1).replace(",", "") if m else ans


def to_float(s):
    try:
        return float(str(s).replace(",", ""))
    except ValueError:
        return None


def synthetic_score(pred, answers, choices=None):
    if choices:
        gold = {to_letter(str(a).strip(), choices) for a in answers}
        return float(to_letter(pred.strip(), choices) in gold)
    def canon(s):                                     # captions: "A 6, B 0" == "a 6 , b 0"
        return " ".join(re.sub(r"\s*([,:=])\s*", r" \1 ", str(s).strip().lower()).split())
    for a in answers:
        p, g = to_float(pred), to_float(a)
        if g is not None and p is not None:
            if abs(p - g) <= 1e-6 * max(1.0, abs(g)):
                return 1.0
        elif canon(pred) == canon(a):
            return 1.0
    return 0.0
