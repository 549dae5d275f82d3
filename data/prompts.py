"""Prompt templates (paper §2 and its appendix prompt tables).

Two families of text:
  * the mode suffixes our own model is trained and evaluated with (SFT rows, evaluate.py): a CoT suffix asks for a
    rationale then "### Answer: X"; a direct suffix asks for the short answer alone;
  * the teacher's prompts for distillation (the paper's GPT-4o prompts, appendix tables), per dataset family.
"""

# ---- the model's mode suffixes (the CoT strings are the released ShareGPT-4o-Reasoning ones)
COT_OPEN = "Generate a reason first and then output a short answer."
COT_MC = "Generate a reason first and then output a letter answer."
# the paper's exact direct strings could not be verified; these are LLaVA's standard short-answer instructions
DIRECT_OPEN = "Answer the question using a single word or phrase."
DIRECT_MC = "Answer with the option's letter from the given choices directly."

ANSWER_MARKER = "### Answer:"
LETTERS = "ABCDEFGHIJ"

# dataset -> prompt family; the family picks the teacher prompt (data/answers.py picks the scorer by dataset)
FAMILIES = {
    "aokvqa": "mc", "ai2d": "mc", "sqa": "mc", "scienceqa": "mc", "mmstar": "mc",
    "chartqa": "chart",
    "docvqa": "doc", "infovqa": "doc",
    "textvqa": "text",
    "ocrbench": "ocr",
    "mathvista": "math", "mmmu": "math",
    "synthetic": "synthetic",
}


def family(dataset):
    if dataset not in FAMILIES:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[dataset]


def format_choices(choices):
    """'A. first\\nB. second' for a list of option texts."""
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def question_text(record):
    """The question with its options (MC), as our model reads it."""
    q = record["question"].strip()
    return f"{q}\n{format_choices(record['choices'])}" if record.get("choices") else q


def model_prompt(record, mode):
    """The human turn of an SFT row / an evaluation prompt: <image>, the question (+ options), the mode suffix."""
    mc = bool(record.get("choices"))
    suffix = {"cot": COT_MC if mc else COT_OPEN, "direct": DIRECT_MC if mc else DIRECT_OPEN}[mode]
    image = "<image>\n" if record.get("image") else ""
    return f"{image}{question_text(record)}\n{suffix}"


# ---- the teacher (the paper's appendix prompt tables for GPT-4o, with the PDF's text-extraction glitches fixed)
TEACHER_SYSTEM = ("When provided with an image and a question, generate a rationale first and then derive an answer. "
                  "Your rationale should include detailed visual elements in order to derive the answer.")

_COT_TAIL = "Question: {question}\n# Output Format #\n<rationale>\n### Answer: <your answer>"
_DOC = ("# Objective #\nYou are provided with an image, a question. Your job is to generate a rationale first and "
        "then derive an answer.\n###########\n# Question #\n{question}\n###########\n# Rationale Requirement #\n"
        "1. Do not state an answer at the beginning. Explain descriptions of visual clue that help to derive the "
        "answer.\n2. Conclude with ### Answer: <your answer>\n3. Your final answer should be a single word or "
        "phrase.\n4. {item4}\n###########\n# Output Style #\n<rationale>\n### Answer: <your answer>\n###########")
TEACHER_COT = {
    "mc": ("Answer the question with following instruction:\n1. Generate a rationale first and then derive an answer.\n"
           "2. For your final answer, provide a letter choice.\n" + _COT_TAIL),
    "chart": ("Answer the question with following instruction:\n1. Generate a rationale first and then derive an "
              "answer.\n2. Don't include any unit, i.e. 56 instead of 56 meters\n3. Don't include '%' sign, i.e. 56 "
              "instead of 56%\n" + _COT_TAIL),
    "doc": _DOC.replace("{item4}", "If possible, copy the answer from document. Don't add or remove symbols, units, "
                                   "or titles."),
    "text": _DOC.replace("{item4}", "Output your answer in lower case."),
    "ocr": ("Answer the question with following instruction:\n1. Generate a rationale first and then derive an answer.\n"
            "2. Your answer should be a single word or phrase.\n" + _COT_TAIL),
}
# math and the synthetic charts use the chart prompt's numeric rules; math MC questions get the letter rule
TEACHER_COT["math"] = TEACHER_COT["ocr"]
TEACHER_COT["synthetic"] = TEACHER_COT["chart"]


def teacher_prompt(record, hint_answer=False):
    """The user text sent to the teacher for one QA record."""
    fam = family(record["dataset"])
    template = TEACHER_COT["mc"] if record.get("choices") else TEACHER_COT[fam]
    text = template.replace("{question}", question_text(record))
    if hint_answer:
        # paper §2.5: the rationale is written "given short annotations"; the hint is only a hint, the filter decides
        text += f"\n(Reference answer: {record['answers'][0]})"
    return text
