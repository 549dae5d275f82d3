"""Stage 1 (paper sections 1, 2.4-2.5): distil chain-of-thought rationales from a teacher into SFT rows.

The teacher writes a rationale ending in "### Answer: X" for each short-answer QA record; a row is kept only when
that answer matches the annotation under the dataset's metric. Out: ShareGPT-4o-Reasoning rows (CoT and direct).

    # the built-in offline teacher on the synthetic chart task (no network)
    python distill.py --data runs/syn/train.jsonl --image-root runs/syn --out runs/sft_data/cot.jsonl \
        --teacher synthetic --with-direct
    # GPT-4o (key from OPENAI_API_KEY): --dry-run first for the request count and the cost; --batch-api at half price
    python distill.py --data chartqa_train.jsonl --image-root images --out runs/distill/chartqa.jsonl \
        --teacher openai --model gpt-4o-2024-05-13 --concurrency 32 --max-cost 100 --with-direct --dry-run

Beside OUT: OUT.dropped.jsonl (the rows the filter dropped, with the reason), OUT.failed.jsonl (requests a rerun
retries). Rerunning the same command resumes; a kill loses at most the requests in flight. Guide: docs/distill.md.
"""

import asyncio
import base64
import io
import json
import math
import os
import random
import sys
import time

from tqdm import tqdm

from common.chat_api import DEFAULT_URL, PRICES, Fatal, Health, RecordFailed, chat, scrub
from common.cli import ArgumentParser, UserError, cli, number
from common.manifest import check_files, check_out_dir, claim, file_id
from data.answers import grade
from data.formats import Appender, done_ids, load_qa, read_jsonl, repair_tail
from data.prompts import LETTERS, TEACHER_SYSTEM, family, model_prompt, teacher_prompt
from data.tasks import checkable, offline_teacher

def api_url(args):
    """The server the requests go to, as the openai client resolves it (never holding the key)."""
    return scrub(args.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_URL)



MIN_SCORE = {"doc": 0.5, "text": 0.3}      # ANLS's own threshold; VQA accuracy of one agreeing annotator


# ------------------------------------------------------------------------------------------------ rows

def cot_row(rec, answer, rationale, usage, model):
    body = rationale.rsplit("###", 1)[0].rstrip() if "###" in rationale else rationale.strip()
    if rec.get("choices"):                           # MC targets read "A. uk", as in the released data
        answer = f"{answer}. {rec['choices'][LETTERS.index(answer)]}" if answer in LETTERS[:len(rec["choices"])] \
            else answer
    return {"id": rec["id"], "image": rec.get("image"), "dataset": rec["dataset"],
            "conversations": [{"from": "human", "value": model_prompt(rec, "cot")},
                              {"from": "gpt", "value": f"{body}\n\n### Answer: {answer}"}],
            "teacher": {"model": model, **usage}}


def direct_row(rec):
    return {"id": f"{rec['id']}_direct", "image": rec.get("image"), "dataset": rec["dataset"],
            "conversations": [{"from": "human", "value": model_prompt(rec, "direct")},
                              {"from": "gpt", "value": str(rec["answers"][0])}]}


class Sink:
    """Grades teacher outputs and writes each record's rows in one flushed append."""

    def __init__(self, args, min_score):
        base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
        self.paths = {"out": args.out, "dropped": base + ".dropped.jsonl", "failed": base + ".failed.jsonl",
                      "batch": base + ".batch.json"}
        for p in (self.paths["out"], self.paths["dropped"]):
            repair_tail(p)
        done_out = done_ids(self.paths["out"])
        self.done = {i for i in done_out if not i.endswith("_direct")} | done_ids(self.paths["dropped"])
        self.bad_images = {str(row["id"]) for _, row in read_jsonl(self.paths["dropped"])
                           if str(row.get("reason", "")).startswith("image:")} \
            if os.path.exists(self.paths["dropped"]) else set()
        self.direct_done = {i[:-len("_direct")] for i in done_out if i.endswith("_direct")}
        self.out, self.dropped = Appender(self.paths["out"]), Appender(self.paths["dropped"])
        self.failed = open(self.paths["failed"], "w")
        self.args, self.min_score = args, min_score
        self.counts = {"kept": 0, "filtered": 0, "no marker": 0, "bad image": 0, "failed": 0}
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def _direct(self, rec):
        if self.args.with_direct and rec["id"] not in self.direct_done:
            self.direct_done.add(rec["id"])
            return [direct_row(rec)]
        return []

    def result(self, rec, text, usage):
        for k in self.usage:
            self.usage[k] += usage.get(k, 0)
        answer, score, found = grade(rec, text)
        if found and score >= self.min_score(rec):
            self.out.write(cot_row(rec, answer, text, usage, self.args.model), *self._direct(rec))
            self.counts["kept"] += 1
        else:
            reason = "no '### Answer:' marker" if not found else "answer does not match the annotation"
            self.counts["no marker" if not found else "filtered"] += 1
            self.dropped.write({"id": rec["id"], "dataset": rec["dataset"], "reason": reason, "teacher_answer": answer,
                                "gold": rec["answers"], "score": score, "response": text,
                                "teacher": {"model": self.args.model, **usage}})
            if self.args.with_direct:                # the direct row comes from the annotation, not the teacher
                if d := self._direct(rec):
                    self.out.write(*d)
        self.done.add(rec["id"])

    def bad_image(self, rec, err):
        self.counts["bad image"] += 1
        self.bad_images.add(rec["id"])
        self.dropped.write({"id": rec["id"], "dataset": rec["dataset"], "reason": f"image: {err}"})
        self.done.add(rec["id"])

    def fail(self, rec, err):
        self.counts["failed"] += 1
        self.failed.write(json.dumps({"id": rec["id"], "error": scrub(str(err))}) + "\n")
        self.failed.flush()

    def close(self):
        self.out.close(), self.dropped.close(), self.failed.close()


# ------------------------------------------------------------------------------------------------ images, cost

def load_image_url(path):
    """A data URL of the file's own bytes (no re-encoding), after checking that it is an image."""
    from PIL import Image
    with open(path, "rb") as f:
        raw = f.read()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
            fmt = (img.format or "PNG").lower()
    except Exception as e:                            # PIL raises many types for a file that is not an image
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    if fmt not in ("png", "jpeg", "gif", "webp"):
        from PIL import Image as I
        buf = io.BytesIO()
        I.open(io.BytesIO(raw)).convert("RGB").save(buf, "PNG")
        raw, fmt = buf.getvalue(), "png"
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode()}"


def image_tokens(width, height, detail="auto"):
    """GPT-4o's image token count: 85 + 170 per 512 px tile after fitting 2048 px and a 768 px short side."""
    if detail == "low":
        return 85
    s = min(1.0, 2048 / max(width, height))
    w, h = width * s, height * s
    s = min(1.0, 768 / min(w, h))
    return 85 + 170 * math.ceil(w * s / 512) * math.ceil(h * s / 512)


def estimate_tokens(rec, args):
    from PIL import Image
    tokens = (len(TEACHER_SYSTEM) + len(teacher_prompt(rec, args.hint_answer))) // 4 + 20
    if rec.get("image"):
        try:
            with Image.open(os.path.join(args.image_root, rec["image"])) as img:
                tokens += image_tokens(*img.size, args.image_detail)
        except Exception:
            pass
    return tokens, args.est_output_tokens


def price(args):
    """($ per input token, $ per output token), or None when unknown (a local server)."""
    p = (args.price_in, args.price_out) if args.price_in is not None else PRICES.get(args.model)
    if p is None:
        return None
    half = 0.5 if args.batch_api else 1.0
    return p[0] * half / 1e6, p[1] * half / 1e6


def cost(usage, rates):
    return usage["prompt_tokens"] * rates[0] + usage["completion_tokens"] * rates[1] if rates else 0.0


def spent_so_far(sink, rates):
    """What earlier runs paid: the usage recorded in the rows they wrote."""
    total = {"prompt_tokens": 0, "completion_tokens": 0}
    for path in (sink.paths["out"], sink.paths["dropped"]):
        if os.path.exists(path):
            for _, row in read_jsonl(path):
                for k in total:
                    total[k] += (row.get("teacher") or {}).get(k, 0)
    return cost(total, rates)


# ------------------------------------------------------------------------------------------------ the teachers

def messages(rec, args, image_url):
    content = [{"type": "text", "text": teacher_prompt(rec, args.hint_answer)}]
    if image_url:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url, "detail": args.image_detail}})
    return [{"role": "system", "content": TEACHER_SYSTEM}, {"role": "user", "content": content}]


async def ask(client, rec, args, image_url, health=None):
    return await chat(client, messages(rec, args, image_url), args, health)


async def run_live(pending, args, sink, rates, budget_left):
    from openai import AsyncOpenAI
    client = AsyncOpenAI(base_url=args.base_url, max_retries=0, timeout=args.timeout)
    health = Health(api_url(args), args.max_retry_time)
    queue = list(reversed(pending))
    state = {"fatal": None, "budget": False, "in_flight": 0.0, "shown": 0.0, "health": health, "first_error": None}
    tasks = []
    bar = tqdm(total=len(pending), desc="distill", unit="q", dynamic_ncols=True)

    async def worker():
        while queue and not state["fatal"]:
            rec = queue.pop()
            est = 0.0
            if budget_left is not None:                   # spent + in flight + this one must stay in the budget
                est = cost(dict(zip(("prompt_tokens", "completion_tokens"), estimate_tokens(rec, args))), rates)
                if cost(sink.usage, rates) + state["in_flight"] + est > budget_left:
                    state["budget"] = True
                    queue.clear()
                    break
            image_url = None
            if rec.get("image"):
                try:
                    image_url = await asyncio.to_thread(load_image_url, os.path.join(args.image_root, rec["image"]))
                except (OSError, ValueError) as e:
                    sink.bad_image(rec, scrub(str(e)))
                    bar.update(1)
                    continue
            state["in_flight"] += est
            try:
                text, usage = await ask(client, rec, args, image_url, health)
                sink.result(rec, text, usage)
            except RecordFailed as e:
                sink.fail(rec, e)
                state["first_error"] = state["first_error"] or scrub(str(e))
            except Fatal as e:
                sink.fail(rec, e)
                state["fatal"] = state["fatal"] or str(e)
                for t in tasks:                        # the others' requests are not written: a rerun redoes them
                    if t is not asyncio.current_task():
                        t.cancel()
            finally:
                state["in_flight"] -= est
            bar.update(1)
            if time.time() - state["shown"] > 0.5:         # the postfix costs more than a request: throttle it
                state["shown"] = time.time()
                bar.set_postfix(kept=sink.counts["kept"], dropped=sink.counts["filtered"] + sink.counts["no marker"],
                                failed=sink.counts["failed"], cost=f"${cost(sink.usage, rates):.2f}")

    tasks += [asyncio.create_task(worker()) for _ in range(args.concurrency)]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    bar.close()
    await client.close()
    for r in results:                                  # a bug in a worker still surfaces
        if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError):
            raise r
    return state


def run_batch(pending, args, sink):
    """The OpenAI Batch API: write the requests, upload, create the batch (its id saved beside --out), poll,
    download and ingest through the same filter. A rerun of the same command picks the saved batch up again."""
    from openai import OpenAI
    client = OpenAI(base_url=args.base_url, max_retries=args.max_retries, timeout=args.timeout)
    by_id = {r["id"]: r for r in pending}
    if os.path.exists(sink.paths["batch"]):
        with open(sink.paths["batch"]) as f:
            state = json.load(f)
        print(f"resuming batch {state['batch_id']}")
    else:
        req_path = sink.paths["batch"][:-len(".json")] + ".requests.jsonl"
        ids = []
        with open(req_path, "w") as f:
            for rec in pending[:args.batch_size]:
                try:
                    url = load_image_url(os.path.join(args.image_root, rec["image"])) if rec.get("image") else None
                except (OSError, ValueError) as e:
                    sink.bad_image(rec, str(e))
                    continue
                body = {"model": args.model, "messages": messages(rec, args, url), "max_tokens": args.max_tokens,
                        "temperature": args.temperature}
                f.write(json.dumps({"custom_id": rec["id"], "method": "POST", "url": "/v1/chat/completions",
                                    "body": body}) + "\n")
                ids.append(rec["id"])
        if not ids:
            return {}
        with open(req_path, "rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        state = {"batch_id": batch.id, "input_file_id": uploaded.id, "requests": len(ids)}
        with open(sink.paths["batch"], "w") as f:
            json.dump(state, f)
        print(f"created batch {batch.id} with {len(ids)} requests (saved in {sink.paths['batch']})")
    while True:
        batch = client.batches.retrieve(state["batch_id"])
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            break
        if args.no_wait:
            print(f"batch {batch.id} is {batch.status}; rerun the same command to ingest it when it is done")
            return {"pending": True}
        time.sleep(args.poll_interval)
    if batch.status != "completed" or not batch.output_file_id:
        os.remove(sink.paths["batch"])
        raise SystemExit(f"batch {batch.id} ended {batch.status}; its state file was removed, rerun to retry")
    for line in client.files.content(batch.output_file_id).text.splitlines():
        if not line.strip():
            continue
        item = json.loads(line)
        rec = by_id.get(item.get("custom_id"))
        if rec is None or rec["id"] in sink.done:
            continue
        resp = item.get("response") or {}
        try:
            if resp.get("status_code") != 200:
                raise RecordFailed(f"status {resp.get('status_code')}: {item.get('error')}")
            body = resp["body"]
            text, usage = body["choices"][0]["message"]["content"], body.get("usage") or {}
            sink.result(rec, text, {"prompt_tokens": usage.get("prompt_tokens", 0),
                                    "completion_tokens": usage.get("completion_tokens", 0)})
        except (RecordFailed, KeyError, IndexError, TypeError) as e:
            sink.fail(rec, e)
    os.remove(sink.paths["batch"])
    return {}


def run_synthetic(pending, args, sink):
    rng = random.Random(args.seed)
    for rec in tqdm(pending, desc="distill (synthetic teacher)", unit="q", dynamic_ncols=True):
        if not checkable(rec):
            raise UserError(f"record {rec['id']}: the synthetic teacher needs the chart data ('meta') that "
                            "python -m data.synthetic writes")
        path = os.path.join(args.image_root, rec["image"]) if rec.get("image") else None
        if path and not os.path.exists(path):
            sink.bad_image(rec, f"image not found: {path}")
            continue
        sink.result(rec, offline_teacher(rec, rng, args.error_rate), {"prompt_tokens": 0, "completion_tokens": 0})


# ------------------------------------------------------------------------------------------------ main

def dry_run(records, args):
    """--dry-run: the requests an actual run would send (records an earlier run of this --out finished are not
    counted) and their estimated cost. Reads only."""
    def finished(path):
        ids = set()
        if os.path.exists(path):
            for line in open(path, encoding="utf-8"):
                try:
                    ids.add(str(json.loads(line).get("id")))
                except ValueError:                      # a half-written last line: an actual run repairs it
                    pass
        return ids
    base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    done = {i for i in finished(args.out) if not i.endswith("_direct")} | finished(base + ".dropped.jsonl")
    pending = [r for r in records if r["id"] not in done]
    rates = price(args) if args.teacher == "openai" else None
    tin = sum(estimate_tokens(r, args)[0] for r in pending)
    tout = len(pending) * args.est_output_tokens
    print(f"{len(records)} records, {len(records) - len(pending)} already done, {len(pending)} to go")
    print(f"dry run: {len(pending)} requests, ~{tin:,} input + ~{tout:,} output tokens, estimated "
          f"${cost({'prompt_tokens': tin, 'completion_tokens': tout}, rates):.2f}"
          f"{' (Batch API price)' if args.batch_api else ''}; nothing was sent and nothing written")
    return 0


def claim_out(args, act=True):
    """--out is taken only by the same distillation (data, teacher and its settings; see common/manifest.py): a rerun
    resumes it, another one is refused unless --overwrite, and a file distill.py did not write is never touched."""
    if os.path.isdir(args.out):
        raise UserError(f"--out {args.out} is a directory; give the JSONL file to write")
    check_out_dir(os.path.dirname(args.out) or ".")
    base = args.out[:-len(".jsonl")] if args.out.endswith(".jsonl") else args.out
    created = [args.out] + [base + s for s in (".dropped.jsonl", ".failed.jsonl", ".batch.json",
                                               ".batch.requests.jsonl")]
    teacher = None if args.direct_only else args.teacher
    fields = {"stage": "distill", "data": [file_id(f) for f in args.data], "teacher": teacher}
    if teacher:
        fields["flags"] = {k: getattr(args, k) for k in ("hint_answer", "min_score", "seed") + (
            ("error_rate",) if teacher == "synthetic" else
            ("model", "base_url", "max_tokens", "temperature", "image_detail"))}
    claim(base + ".manifest.json", fields, created, args.overwrite, act=act)


def parse_args(argv=None):
    ap = ArgumentParser(__doc__)
    pos, nonneg, secs = number(int, lo=1), number(int, lo=0), number(float, above=0)
    # data
    ap.add_argument("--data", nargs="+", required=True, help="QA record JSONL file(s)")
    ap.add_argument("--image-root", default=".", help="image paths in the records are relative to this")
    ap.add_argument("--out", required=True, help="SFT JSONL to append to (side files are written beside it)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the outputs of another distillation run at --out (only files distill.py wrote)")
    ap.add_argument("--with-direct", action="store_true", help="also write a direct-answer row per record")
    ap.add_argument("--direct-only", action="store_true",
                    help="write only the direct-answer rows (from the annotations; no teacher is asked)")
    ap.add_argument("--limit", type=pos, default=None, help="only the first N records")
    ap.add_argument("--min-score", type=number(float, lo=0, hi=1), default=None,
                    help="keep a row when its metric score reaches this (default 1; ANLS sets 0.5, VQA acc 0.3)")
    # teacher
    ap.add_argument("--teacher", choices=["openai", "synthetic"], help="who writes the rationales (not needed "
                                                                       "with --direct-only)")
    ap.add_argument("--model", default="gpt-4o-2024-05-13", help="teacher model (the paper's GPT-4o)")
    ap.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000/v1")
    ap.add_argument("--hint-answer", action="store_true", help="give the teacher the gold short answer as a hint")
    ap.add_argument("--max-tokens", type=pos, default=1024, help="teacher output limit")
    ap.add_argument("--temperature", type=number(float, lo=0, hi=2), default=0.0, help="teacher sampling temperature")
    ap.add_argument("--image-detail", default="auto", choices=["auto", "low", "high"], help="GPT-4o image detail")
    ap.add_argument("--error-rate", type=number(float, lo=0, hi=1), default=0.0,
                    help="synthetic teacher: share of rationales with a slip (the answer filter drops them)")
    ap.add_argument("--seed", type=int, default=0, help="synthetic teacher's random slips")
    # the API
    ap.add_argument("--concurrency", type=pos, default=16, help="requests in flight")
    ap.add_argument("--timeout", type=secs, default=120.0, help="seconds per request")
    ap.add_argument("--max-retries", type=nonneg, default=6, help="per request, on 429 / 5xx / timeouts")
    ap.add_argument("--backoff", type=number(float, lo=0), default=1.0, help="first retry wait (doubles, jittered)")
    ap.add_argument("--max-backoff", type=number(float, lo=0), default=60.0, help="longest retry wait, seconds")
    ap.add_argument("--batch-api", action="store_true", help="use the Batch API (half price, asynchronous)")
    ap.add_argument("--batch-size", type=number(int, lo=1, hi=50000), default=50000,
                    help="requests per batch (the API's limit is 50k)")
    ap.add_argument("--poll-interval", type=secs, default=30.0, help="seconds between batch status checks")
    ap.add_argument("--no-wait", action="store_true", help="batch: submit or check, then exit")
    # money
    ap.add_argument("--max-cost", type=number(float, lo=0), default=None,
                    help="stop sending requests once the spend (USD, this and earlier runs) would pass this")
    ap.add_argument("--dry-run", action="store_true", help="print the request count and estimated cost, send none")
    ap.add_argument("--price-in", type=number(float, lo=0), default=None,
                    help="USD per 1M input tokens (overrides the table)")
    ap.add_argument("--price-out", type=number(float, lo=0), default=None, help="USD per 1M output tokens")
    ap.add_argument("--est-output-tokens", type=pos, default=250, help="output tokens per answer, for estimates")
    ap.add_argument("--max-retry-time", type=number(float, above=0), default=300.0,
                    help="stop the run once no request has succeeded for this many seconds")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # ---- records: every line validated before any request is sent
    check_files(args.data, "--data")
    records = load_qa(args.data)
    if args.limit:
        records = records[:args.limit]

    def min_score(rec):
        return args.min_score if args.min_score is not None else MIN_SCORE.get(family(rec["dataset"]), 1.0)

    if not args.teacher and not args.direct_only:
        raise UserError("--teacher openai|synthetic is required (or --direct-only)")
    if args.teacher == "openai" and not args.dry_run and not os.environ.get("OPENAI_API_KEY"):
        raise UserError("OPENAI_API_KEY is not set (a local server that ignores keys still needs a dummy one)")
    if args.teacher == "synthetic":
        args.model = "synthetic"
    if args.dry_run:                                   # the count and the cost; nothing written, nothing sent
        claim_out(args, act=False)
        return dry_run(records, args)
    claim_out(args)
    if args.direct_only:                               # the paper's direct data: the annotations as answers
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        done = {i[:-len("_direct")] for i in done_ids(args.out)}
        with Appender(args.out) as w:
            rows = [direct_row(r) for r in records if r["id"] not in done]
            w.write(*rows)
        print(f"wrote {len(rows)} direct rows to {args.out} ({len(done)} already there)")
        return 0
    sink = Sink(args, min_score)
    pending = [r for r in records if r["id"] not in sink.done]
    # a kill between a record's row and its direct row: write the missing direct rows now
    if args.with_direct:
        for r in records:
            if r["id"] in sink.done and r["id"] not in sink.direct_done and r["id"] not in sink.bad_images:
                sink.out.write(*sink._direct(r))
    print(f"{len(records)} records, {len(records) - len(pending)} already done, {len(pending)} to go")
    rates = price(args) if args.teacher == "openai" else None
    if args.teacher == "openai" and rates is None:
        print(f"note: no price known for {args.model!r}; costs show as $0 (give --price-in/--price-out)")

    t0 = time.time()
    before = spent_so_far(sink, rates) if rates else 0.0
    status = {}
    if args.teacher == "synthetic":
        run_synthetic(pending, args, sink)
    elif args.batch_api:
        import openai
        try:
            status = run_batch(pending, args, sink)
        except openai.APIConnectionError as e:
            status = {"fatal": f"cannot connect to {api_url(args)} ({type(e).__name__}: {scrub(str(e))}); check "
                               "that a server listens there (--base-url)"}
    else:
        budget_left = None if args.max_cost is None else args.max_cost - before
        status = asyncio.run(run_live(pending, args, sink, rates, budget_left))
    sink.close()

    # ---- summary
    dt = time.time() - t0
    c = sink.counts
    done = sum(c.values()) - c["failed"]
    no_connect = status["health"].connect_failures if status.get("health") else 0
    print(f"kept {c['kept']} | filtered {c['filtered']} (answer mismatch) + {c['no marker']} (no marker) | "
          f"bad images {c['bad image']} | failed {c['failed']}"
          f"{f' ({no_connect} could not connect)' if no_connect else ''} (retried on rerun) | {dt:.1f}s, "
          f"{(done + c['failed']) / max(dt, 1e-9):.1f} req/s")
    if args.teacher == "openai":
        u = sink.usage
        print(f"tokens this run: {u['prompt_tokens']:,} in, {u['completion_tokens']:,} out; cost this run "
              f"${cost(u, rates):.2f}, all runs ${before + cost(u, rates):.2f}")
    print(f"wrote {sink.paths['out']} (audit: {sink.paths['dropped']})")
    if status.get("fatal"):
        print(f"error: {status['fatal']}; stopped (finished answers are kept: rerun the same command to resume)",
              file=sys.stderr)
        return 2
    if c["failed"] and not (c["kept"] + c["filtered"] + c["no marker"]):     # never a silent 0 with nothing done
        first = f" (first: {status['first_error']})" if status.get("first_error") else ""
        print(f"error: all {c['failed']} requests to {api_url(args)} failed{first}; nothing was written (see "
              f"{sink.paths['failed']})", file=sys.stderr)
        return 2
    if status.get("budget"):
        print(f"stopped at the --max-cost budget (${args.max_cost:.2f}); finished answers are kept, rerun with a "
              "higher --max-cost to continue", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    cli(main)
