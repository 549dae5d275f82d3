"""Answer extraction and each benchmark's metric, as small pure functions.

extract()   the model's (or teacher's) final answer: the text after the last "### Answer:", markdown stripped; MC
            letters ("A. uk" -> A, an option's text -> its letter); numbers freed of units, % and 1,000 commas.
score()     one prediction against the gold answers under the dataset's official metric:
  chartqa           relaxed accuracy: numbers within 5% of the target, exact (case-insensitive) match otherwise
  docvqa, infovqa   ANLS: 1 - normalised Levenshtein distance, 0 below the 0.5 similarity threshold, max over golds
  textvqa           VQA accuracy: min(1, matches / 3) averaged over the 10 leave-one-out subsets of 10 annotators,
                    after the official answer normalisation (punctuation, articles, number words, contractions)
  aokvqa, ai2d, sqa MC accuracy on the letter
  mathvista         MC letter; else int / float (to the record's precision) / normalised text
  synthetic         numbers equal (to 1e-6), yes/no and labels exact, a caption's list of values exact
"""

import itertools
import re

from data.prompts import ANSWER_MARKER, LETTERS, family

_MARKER = re.compile(r"#+\s*[*_]*\s*answer\s*[*_]*\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"^[$€£]?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)\s*(%|[a-zA-Z][a-zA-Z ./²³]{0,24})?$")


def strip_markdown(s):
    s = s.strip()
    s = re.sub(r"^[*_`\s]+|[*_`\s]+$", "", s)             # **bold**, __x__, `code`
    s = re.sub(r"\\boxed\{(.*)\}", r"\1", s)
    return s.strip().rstrip(".").strip()


def extract(text, choices=None, numeric=False):
    """(answer, found_marker). Without a "### Answer:" marker the last non-empty line stands in, and found_marker
    is False (a format failure, counted by the callers). Direct-mode outputs are short: pass them as they are."""
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


# ------------------------------------------------------------------------------------------------ metrics

def relaxed_accuracy(pred, target, tol=0.05):
    """ChartQA (pix2struct's relaxed_correctness): a trailing % divides by 100; a zero target needs exact text."""
    def num(t):
        t = t.strip()
        try:
            return float(t[:-1]) / 100 if t.endswith("%") else float(t)
        except ValueError:
            return None
    p, t = num(pred), num(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tol)
    return float(pred.strip().lower() == target.strip().lower())


def levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(pred, answers, threshold=0.5):
    """DocVQA / InfoVQA: max over golds of 1 - NL, where NL = edit distance / longer length, zeroed at NL >= 0.5."""
    p = " ".join(pred.strip().lower().split())
    best = 0.0
    for a in answers:
        a = " ".join(str(a).strip().lower().split())
        n = max(len(a), len(p))
        nl = levenshtein(a, p) / n if n else 0.0
        best = max(best, 1 - nl if nl < threshold else 0.0)
    return best


# the official VQA normalisation (VQA-Challenge PythonEvaluationTools vqaEval.py)
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've
might've mustn't must've needn't not've o'clock oughtn't shan't she'd've she's should've shouldn't shouldn't've
somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've
something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't
we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's
who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split()
CONTRACTIONS = {}
for _word in _CONTRACTED:              # every spelling with some apostrophes left out -> the contracted form
    _parts = _word.split("'")
    for _keep in itertools.product([True, False], repeat=len(_parts) - 1):
        _variant = _parts[0] + "".join(("'" if k else "") + p for k, p in zip(_keep, _parts[1:]))
        if _variant != _word:
            CONTRACTIONS.setdefault(_variant, _word)
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA = re.compile(r"(\d)(,)(\d)")


def vqa_normalize(text):
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:               # dropped where it touches a space (or in "1,000"), else a word break
        if (p + " " in text or " " + p in text) or _COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out)
    words = [NUMBER_WORDS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(pred, answers):
    """TextVQA: each of the (usually 10) annotators left out in turn, min(1, #others matching / 3), averaged."""
    p = vqa_normalize(pred)
    golds = [vqa_normalize(str(a)) for a in answers]
    if not golds:
        return 0.0
    accs = [min(1.0, sum(g == p for j, g in enumerate(golds) if j != i) / 3) for i in range(len(golds))]
    return sum(accs) / len(accs)


def mc_accuracy(pred, answers, choices):
    """The predicted letter against the gold letter (a gold given as option text is mapped to its letter too)."""
    gold = {to_letter(str(a).strip(), choices) for a in answers}
    return float(to_letter(pred.strip(), choices) in gold)


def mathvista_score(pred, answers, choices=None, meta=None):
    if choices:
        return mc_accuracy(pred, answers, choices)
    meta = meta or {}
    kind = meta.get("answer_type")
    gold = str(answers[0])
    p, g = to_float(normalize_number(pred)), to_float(gold)
    if kind == "integer" or (kind is None and g is not None and float(g).is_integer() and "." not in gold):
        return float(p is not None and g is not None and round(p) == p and int(p) == int(g))
    if kind == "float" or (kind is None and g is not None):
        digits = int(meta.get("precision", 2))
        return float(p is not None and g is not None and round(p, digits) == round(g, digits))
    return float(pred.strip().lower() == gold.strip().lower())


def synthetic_score(pred, answers, choices=None):
    if choices:
        return mc_accuracy(pred, answers, choices)
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


def score(dataset, pred, answers, choices=None, meta=None):
    """The dataset's metric for one prediction (already extracted), in [0, 1]."""
    fam = family(dataset)
    if fam == "mc" or (choices and fam not in ("math", "synthetic")):
        return mc_accuracy(pred, answers, choices or [])
    if fam == "chart":
        return max(relaxed_accuracy(pred, str(a)) for a in answers)
    if fam == "doc":
        return anls(pred, answers)
    if fam == "text":
        return vqa_accuracy(pred, answers)
    if fam == "math":
        return mathvista_score(pred, answers, choices, meta)
    if fam == "synthetic":
        return synthetic_score(pred, answers, choices)
    return float(any(pred.strip().lower() == str(a).strip().lower() for a in answers))      # ocr: exact


NUMERIC_FAMILIES = ("chart", "math", "synthetic")


def grade(record, text):
    """Extract the answer of a CoT output for a QA record and score it: (answer, score, found_marker)."""
    numeric = family(record["dataset"]) in NUMERIC_FAMILIES
    ans, found = extract(text, record.get("choices"), numeric=numeric)
    return ans, score(record["dataset"], ans, record["answers"], record.get("choices"), record.get("meta")), found


def answer_line(answer):
    return f"{ANSWER_MARKER} {answer}"
