"""Each benchmark's official scorer, one small pure function per benchmark: (prediction, golds, ...) -> float in [0, 1].

The prediction is the answer the paper's extraction gave (data/answers.py: the text after the last "### Answer:"); a
scorer changes it only where its official scorer does, and each docstring names that scorer (repository, file,
function) and lists what it strips or changes before comparing. Expected values in tests/test_answers.py come from
running those official functions.
"""

import random
import re
import string

from data.prompts import LETTERS


def levenshtein(a, b):
    """Edit distance (insert, delete, substitute: cost 1 each)."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        cur = [j]
        for i, ca in enumerate(a, 1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[-1]))
        prev = cur
    return prev[-1]


def _gold_text(gold, choices):
    """A gold letter -> its option text (golds of MC records are stored as letters)."""
    g = str(gold)
    return choices[LETTERS.index(g)] if choices and len(g) == 1 and g in LETTERS[:len(choices)] else g


# ------------------------------------------------------------------------------------------------ ChartQA

def chartqa_relaxed(pred, answers, tol=0.05):
    """ChartQA relaxed accuracy: google-research/pix2struct, pix2struct/metrics.py, relaxed_correctness (lmms-eval's
    chartqa utils and VLMEvalKit call the same function, the prediction stripped). Both sides go through Python's
    float(); a text ending in "%" is divided by 100 (only that side: "45%" vs "45" is wrong). Within 5% of a non-zero
    target (relative to the target) is right; otherwise the texts must match after lower-casing only: no unit, "$",
    thousands separator or trailing period is removed, and the gold is not stripped. Max over golds."""
    def to_float(t):
        try:
            return float(t.rstrip("%")) / 100.0 if t.endswith("%") else float(t)
        except ValueError:
            return None
    best = 0.0
    for target in map(str, answers):
        p, t = to_float(pred), to_float(target)
        ok = abs(p - t) / abs(t) <= tol if p is not None and t else pred.lower() == target.lower()
        best = max(best, float(ok))
    return best


# ------------------------------------------------------------------------------------------------ DocVQA, InfoVQA

def anls(pred, answers, threshold=0.5):
    """ANLS: the RRC evaluation script of DocVQA / InfographicsVQA (infographicsvqa_eval.py, evaluate_method; the same
    code is lmms-eval's api/metrics.py anls and VLMEvalKit's anls_compute). Both sides are lower-cased and their
    whitespace collapsed for the edit distance, but the length that divides it is the longer of the RAW strings
    (as upper-cased, unstripped); the score is 1 - the smallest normalised distance over the golds, and is zeroed
    only when it is below 0.5 (exactly 0.5 is kept)."""
    p = " ".join(pred.strip().lower().split())
    values = []
    for a in map(str, answers):
        dist = levenshtein(" ".join(a.strip().lower().split()), p)
        length = max(len(a.upper()), len(pred.upper()))
        values.append(0.0 if length == 0 else dist / length)
    if not values:
        return 0.0
    result = 1 - min(values)
    return 0.0 if result < threshold else result


# ------------------------------------------------------------------------------------------------ TextVQA

# EvalAI's answer processor (mmf pythia/tasks/processors.py EvalAIAnswerProcessor, copied into LLaVA's
# llava/eval/m4c_evaluator.py and lmms-eval's tasks/_task_utils/vqa_eval_metric.py), its tables as data
_CONTRACTIONS = dict(pair.split("=") for pair in """aint=ain't arent=aren't cant=can't couldve=could've
couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't
hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've
mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's
shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA = re.compile(r"(?<=\d)(\,)+(?=\d)")


def vqa_normalize(text):
    """EvalAIAnswerProcessor.__call__: lower-case; delete every "," and "?"; "'s" -> " 's"; newlines and tabs to
    spaces; then each punctuation mark in the list is deleted where a space touches it (or anywhere, when the text
    holds a digit,digit comma) and becomes a space elsewhere; periods not beside a digit go (the original passes
    re.UNICODE as sub()'s count, so at most 32); number words zero..ten (and "none") become digits; articles go;
    the table's contractions are restored word by word ("dont" -> "don't"; "lets" stays "lets")."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=re.UNICODE)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def textvqa_accuracy(pred, answers):
    """TextVQA accuracy: LLaVA's llava/eval/m4c_evaluator.py TextVQAAccuracyEvaluator (= lmms-eval's textvqa
    textvqa_process_results): prediction and the annotators' answers through vqa_normalize(); each annotator left
    out in turn, min(1, #other annotators equal to the prediction / 3), averaged over the annotators."""
    p = vqa_normalize(pred)
    golds = [vqa_normalize(str(a)) for a in answers]
    if not golds:
        return 0.0
    accs = [min(1.0, sum(g == p for j, g in enumerate(golds) if j != i) / 3) for i in range(len(golds))]
    return sum(accs) / len(accs)


# ------------------------------------------------------------------------------------------------ multiple choice

_AOK_LETTER = re.compile(r"\(?([A-J])\)?(?:[.)](?:\s.*)?)?", re.DOTALL)


def aokvqa_mc(pred, answers, choices):
    """A-OKVQA multiple choice: allenai/aokvqa, evaluation/eval_predictions.py, eval_aokvqa(multiple_choice=True):
    the predicted option TEXT must equal the correct choice exactly (case-sensitive, nothing stripped). The official
    scorer takes option texts; our model answers with letters, so a letter form ("B", "B.", "(B)", "B)", "B. text",
    "B) text") is first replaced by the text of that option; anything else is compared as it is."""
    m = _AOK_LETTER.fullmatch(pred)
    if m and LETTERS.index(m.group(1)) < len(choices):
        pred = choices[LETTERS.index(m.group(1))]
    return float(any(pred == _gold_text(g, choices) for g in answers))


_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def ai2d_mc(pred, answers, choices=None):
    """AI2D: lmms-eval tasks/ai2d (ai2d.yaml, utils.py MultiChoiceRegexFilter, metric exact_match with ignore_case
    and ignore_punctuation): a capital letter followed by "." at the start (after spaces) is taken alone ("B. cat"
    -> "B"); otherwise the whole answer, stripped, lower-cased and freed of ASCII punctuation, must equal the gold
    letter ("(b)" -> "b" is right; "B: cat" -> "b cat" is wrong; an option's text is never mapped to its letter).
    exact_match compares numpy string arrays, and _np_text keeps what those do to a text: trailing NUL characters
    vanish, and lower-casing is cut to the text's length ("İ" -> "i", not "i" + a combining dot)."""
    m = re.match(r"^\s*([A-Z])\.", pred)
    p = _np_text((m.group(1) if m else pred).strip())
    return float(any(p == _np_text(str(g)) for g in answers))


def _np_text(s):
    """lmms-eval's exact_match_hf_evaluate (ignore_case, ignore_punctuation) on one text held in a numpy array."""
    width = len(s)                                    # the array's fixed width: lower() cannot exceed it
    return s.rstrip("\0").lower()[:width].rstrip("\0").translate(_PUNCT_TABLE).rstrip("\0")


def sqa_mc(pred, answers, choices=None):
    """ScienceQA-IMG: lmms-eval tasks/scienceqa/utils.py, sqa_process_results (LLaVA's rule): the stripped answer
    equals the gold letter ignoring case, or it starts with a capital letter and "." ("B. text") and that letter is
    the gold; "(B)" and "B)" are wrong."""
    p = pred.strip()
    for g in answers:
        target = str(g).strip().lower()
        if p.lower() == target or (len(p) >= 2 and p[0].isupper() and p[1] == "." and p[0].lower() == target):
            return 1.0
    return 0.0


def mmstar_mc(pred, answers, choices=None):
    """MMStar: MMStar-Benchmark/MMStar, eval/vlmeval/evaluate/mmstar.py, MMStar_eval: both sides lower-cased,
    stripped, newlines made spaces; right when the gold letter is the answer's first character, or follows "(",
    "option " or "the answer is " at its start ("bananas" counts as b, as in the original). Empty is wrong. The
    official final score counts items over all 1500 (a plain mean, as here)."""
    p = pred.lower().strip().replace("\n", " ")
    for g in answers:
        a = str(g).lower().strip().replace("\n", " ")
        for prefix in ("", "(", "option ", "the answer is "):
            if p.startswith(prefix) and len(p) > len(prefix) and p[len(prefix)] == a:
                return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------------ MMMU

def mmmu_parse_choice(response, choices, seed=42):
    """MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py, parse_multi_choice_response: ",.!?;:'" trimmed from the ends;
    "(A)" forms first, then " A " surrounded by spaces, then (for answers longer than 5 words) an option's text
    inside the answer; several candidates -> the one that occurs last; none -> a random option. The original draws
    from one random stream seeded 42 in file order, which a pure function cannot follow: each unparseable answer
    draws from a fresh stream seeded 42 instead."""
    letters = list(LETTERS[:len(choices)])
    index2ans = dict(zip(letters, map(str, choices)))
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = f" {response} "
    cands = [c for c in letters if f"({c})" in response]
    bracket, by_index = bool(cands), True
    if not cands:
        cands = [c for c in letters if f" {c} " in response]
    if not cands and len(response.split()) > 5:
        cands = [c for c in letters if index2ans[c].lower() in response.lower()]
        by_index = False
    if not cands:
        return random.Random(seed).choice(letters)
    if len(cands) == 1:
        return cands[0]
    if by_index:
        pos = [response.rfind(f"({c})" if bracket else f" {c} ") for c in cands]
    else:
        pos = [response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[pos.index(max(pos))]


def _mmmu_norm(s):
    """eval_utils.normalize_str: a number (commas removed) -> [float rounded to 2]; else lower-cased text, a single
    character padded to [" x", "x "] so it cannot match inside a word."""
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
        return [" " + s, s + " "] if len(s) == 1 else [s]


_MMMU_NUMBERS = [r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                 r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"]


def mmmu_parse_open(response):
    """eval_utils.parse_open_response: the sub-responses' tails after "could be ", "so ", "is ", "thus ",
    "therefore ", "final ", "answer ", "result " (and "=" in the last one), the shortest each; plus every number in
    them; all normalised with _mmmu_norm."""
    response = response.strip().strip(".").lower()
    subs = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, resp in enumerate(subs):
        indicators = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]
        if i == len(subs) - 1:
            indicators.append("=")
        shortest = None
        for ind in indicators:
            if ind in resp:
                tail = resp.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    preds = list(keys)
    for k in keys:
        for pattern in _MMMU_NUMBERS:
            preds += re.findall(pattern, k)
    return list({x for p in preds for x in _mmmu_norm(p)})


def mmmu_score(pred, answers, choices=None, meta=None):
    """MMMU (validation): MMMU-Benchmark/MMMU, mmmu/utils/eval_utils.py. Multiple choice: mmmu_parse_choice(), then
    eval_multi_choice (the letter equals a gold letter). Open: mmmu_parse_open(), then eval_open: a parsed number
    equal to a gold number (both rounded to 2), or a gold text contained in a parsed text."""
    if choices:
        return float(mmmu_parse_choice(pred, choices) in [str(g) for g in answers])
    golds = [x for g in answers for x in _mmmu_norm(str(g))]
    for p in mmmu_parse_open(pred):
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return 1.0
        elif p in golds:
            return 1.0
    return 0.0


# ------------------------------------------------------------------------------------------------ MathVista

def mathvista_normalize(extraction, choices, question_type, answer_type, precision):
    """lupantech/MathVista, evaluation/calculate_score.py, normalize_extracted_answer: multiple choice -> the first
    "(X)" letter if any; a letter -> its option; anything else -> the option nearest in edit distance (the first of
    ties; so "145" picks "145°"). integer -> str(int(float(x))) (truncates: "12.7" -> "12"); float ->
    str(round(float(x), precision)); list -> str(x). Python's float() takes no "1,000", "1000 ml" or "$5": None."""
    if question_type == "multi_choice":
        extraction = extraction.strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = LETTERS[:len(choices)]
        if len(extraction) == 1 and extraction in letters:
            return choices[letters.index(extraction)]
        dist = [levenshtein(extraction, c) for c in choices]
        return choices[dist.index(min(dist))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            return str(round(float(extraction), int(precision)))
    except (ValueError, TypeError, OverflowError):
        return None
    return str(extraction)              # list (and any other type: the original has no branch for it)


def mathvista_score(pred, answers, choices=None, meta=None):
    """MathVista (testmini): calculate_score.py, mathvista_normalize() then safe_equal (plain ==) against the gold
    answer as released (a string; for multiple choice the option text, which our records store as its letter).
    The extraction is the "### Answer:" text, or GPT's (data/gpt_extract.py) when evaluate.py --rescore
    --gpt-extract was run; extract_answer.py's own rules before GPT (int(), float(), the response being an option)
    change nothing that normalisation does not."""
    meta = meta or {}
    qtype = meta.get("question_type") or ("multi_choice" if choices else "free_form")
    if qtype == "multi_choice" and not choices:
        qtype = "free_form"
    gold = _gold_text(answers[0], choices if qtype == "multi_choice" else None)
    got = mathvista_normalize(pred, [str(c) for c in choices or []], qtype, meta.get("answer_type"),
                              meta.get("precision"))
    return float(got == gold)


# ------------------------------------------------------------------------------------------------ OCRBench

def ocrbench_score(pred, answers, meta=None):
    """OCRBench: Yuliang-Liu/MultimodalOCR, OCRBench/example.py (and scripts/*.py; VLMEvalKit's OCRBench.evaluate is
    the same): right when a gold, lower-cased, stripped, newlines made spaces, is CONTAINED in the answer treated
    alike; for HME100k (handwritten formulas) case is kept and all spaces are removed from both instead. Any gold
    counts. The official total is out of 1000; the mean here x 100 is that total / 10."""
    meta = meta or {}
    hme = meta.get("dataset_name") == "HME100k" or \
        meta.get("type") == "Handwritten Mathematical Expression Recognition"
    for a in map(str, answers):
        if hme:
            a, p = (s.strip().replace("\n", " ").replace(" ", "") for s in (a, pred))
        else:
            a, p = (s.lower().strip().replace("\n", " ") for s in (a, pred))
        if a in p:
            return 1.0
    return 0.0
