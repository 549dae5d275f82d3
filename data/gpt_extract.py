"""MathVista's GPT answer extraction, opt-in: evaluate.py --rescore --gpt-extract MODEL [--gpt-confirm].

It follows lupantech/MathVista, evaluation/extract_answer.py, extract_answer: the whole response (not only the
"### Answer:" line) is read; an empty response extracts to ""; a multiple-choice response that is exactly an option,
an integer answer int() accepts and a float answer float() accepts are taken without a request; every other
response goes to the model with the official few-shot prompt (prompts/ext_ans.py) followed by the problem's query
and the response, at temperature 0. Requests go through the client and retry code distillation uses
(common/chat_api.py). Without --gpt-confirm only the request count and the estimated cost are printed; nothing is
sent. Extractions are kept in the prediction rows ("extraction", "extractor"), so a later rescore neither resends
nor pays again.
"""

import asyncio
import os
from types import SimpleNamespace

from common import chat_api
from data.prompts import LETTERS

# the official few-shot extraction prompt (MathVista evaluation/prompts/ext_ans.py, pids 852, 104, 824, 506, 540)
DEMO_PROMPT = """Please read the following example. Then extract the answer from the model response and type it at \
the end of the prompt.

Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.
Question: Which number is missing?

Model response: The number missing in the sequence is 14.

Extracted answer: 14

Hint: Please answer the question requiring a floating-point number with one decimal place and provide the final \
value, e.g., 1.2, 1.3, 1.4, at the end.
Question: What is the fraction of females facing the camera?

Model response: The fraction of females facing the camera is 0.6, which means that six out of ten females in the \
group are facing the camera.

Extracted answer: 0.6

Hint: Please answer the question requiring a floating-point number with two decimal places and provide the final \
value, e.g., 1.23, 1.34, 1.45, at the end.
Question: How much money does Luca need to buy a sour apple candy and a butterscotch candy? (Unit: $)

Model response: Luca needs $1.45 to buy a sour apple candy and a butterscotch candy.

Extracted answer: 1.45

Hint: Please answer the question requiring a Python list as an answer and provide the final list, e.g., [1, 2, 3], \
[1.2, 1.3, 1.4], at the end.
Question: Between which two years does the line  graph saw its maximum peak?

Model response: The line graph saw its maximum peak between 2007 and 2008.

Extracted answer: [2007, 2008]

Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.
Question: What fraction of the shape is blue?
Choices:
(A) 3/11
(B) 8/11
(C) 6/11
(D) 3/5

Model response: The correct answer is (B) 8/11.

Extracted answer: B"""


def query_of(rec):
    """The problem's official query (hint, question, choices): kept by data.convert / data.vlmeval in meta."""
    q = (rec.get("meta") or {}).get("query")
    if q:
        return q
    choices = rec.get("choices") or []
    return rec["question"] + ("\nChoices:\n" + "\n".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
                              if choices else "")


def without_request(response, rec):
    """extract_answer's rules before the model: the extraction, or None when a request is needed."""
    meta = rec.get("meta") or {}
    if response == "":
        return ""
    if rec.get("choices") and response in rec["choices"]:
        return response
    for kind, conv in (("integer", lambda r: str(int(r))), ("float", lambda r: str(float(r)))):
        if meta.get("answer_type") == kind:
            try:
                return conv(response)
            except ValueError:
                pass
    return None


def prompt(rec, response):
    """extract_answer.create_test_prompt."""
    return f"{DEMO_PROMPT.strip()}\n\n{query_of(rec)}\n\n{response}\n\nExtracted answer: "


def run(rows, records, args):
    """Fill row["extraction"] of MathVista rows (those extracted by args.gpt_extract already are skipped). Returns
    {} when done, None when it only showed the cost (no --gpt-confirm)."""
    model = args.gpt_extract
    todo, free = [], 0
    for row in rows:
        rec = records.get(row["id"])
        if row.get("dataset") != "mathvista" or "output" not in row or row.get("extractor") in (model, "rule"):
            continue
        if rec is None:
            raise SystemExit("error: --gpt-extract needs the MathVista QA records (their query): pass --data")
        ext = without_request(row["output"], rec)
        if ext is not None:
            row["extraction"], row["extractor"] = ext, "rule"
            free += 1
        else:
            todo.append((row, prompt(rec, row["output"])))
    rates = chat_api.PRICES.get(model)
    tin, tout = sum(len(p) // 4 + 8 for _, p in todo), 8 * len(todo)
    est = f"${(tin * rates[0] + tout * rates[1]) / 1e6:.2f}" if rates else "unknown (no price for this model)"
    print(f"MathVista GPT extraction with {model}: {free} outputs need no request, {len(todo)} requests, "
          f"~{tin:,} input + ~{tout:,} output tokens, estimated cost {est}")
    if not todo:
        return {}
    if not args.gpt_confirm:
        print("nothing sent and nothing rescored: add --gpt-confirm to send these requests")
        return None
    if not os.environ.get("OPENAI_API_KEY"):
        raise SystemExit("error: OPENAI_API_KEY is not set")
    # the official call: one user message, temperature 0, max_tokens 1024
    opts = SimpleNamespace(model=model, max_tokens=1024, temperature=0.0, timeout=120.0, max_retries=6, backoff=1.0,
                           max_backoff=60.0)

    async def go():
        from openai import AsyncOpenAI
        client = AsyncOpenAI(base_url=args.gpt_base_url, max_retries=0, timeout=opts.timeout)
        gate, failed = asyncio.Semaphore(16), []
        # an unreachable server stops the run at once, as in distillation (not ~46 s of retries per request)
        health = chat_api.Health(chat_api.scrub(args.gpt_base_url or os.environ.get("OPENAI_BASE_URL")
                                              or chat_api.DEFAULT_URL), 300.0)

        async def one(row, text):
            async with gate:
                try:
                    out, _ = await chat_api.chat(client, [{"role": "user", "content": text}], opts, health)
                    row["extraction"], row["extractor"] = out.strip(), model
                except chat_api.RecordFailed as e:
                    failed.append(f"{row['id']}: {e}")
        try:
            await asyncio.gather(*(one(r, p) for r, p in todo))
        except chat_api.Fatal as e:
            raise SystemExit(f"error: {e}") from None
        finally:
            await client.close()
        return failed
    failed = asyncio.run(go())
    if failed:
        print(f"{len(failed)} extractions failed (scored rule-based; rerun to retry): {failed[:3]}")
    return {}
