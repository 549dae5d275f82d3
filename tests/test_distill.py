"""distill.py against a loopback OpenAI-compatible server, and with the offline synthetic teacher."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

import distill
from common.cli import UserError
from helpers import ROOT, random_image
from fake_openai import FakeOpenAI, Reply, question_of

KEY = "sk-test-SECRET-0123456789"


def write_records(tmp_path, n, dataset="chartqa", bad_image_ids=()):
    (tmp_path / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        name = f"img/q{i}.png"
        if i in bad_image_ids:
            (tmp_path / name).write_text("not an image")
        else:
            random_image(20, 30, seed=i).save(tmp_path / name)
        lines.append(json.dumps({"id": f"q{i}", "image": name, "question": f"What is value {i}?",
                                 "answers": [str(i)], "choices": None, "dataset": dataset}))
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def gold_of(req):
    m = re.search(r"What is value (\d+)\?", question_of(req))
    return int(m.group(1)) if m else -1


def right(req, attempt):
    return Reply(text=f"The bar reads {gold_of(req)}.\n\n### Answer: {gold_of(req)}")


def run(tmp_path, server, *extra, records=None, out="out/sft.jsonl"):
    records = records or tmp_path / "records.jsonl"
    argv = ["--data", str(records), "--image-root", str(tmp_path), "--out", str(tmp_path / out), "--teacher", "openai",
            "--base-url", server.url, "--model", "gpt-4o-2024-05-13", "--backoff", "0.01", "--max-backoff", "0.05",
            *extra]
    return distill.main(argv)


def rows(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_filter_keeps_matching_answers_and_audits_the_rest(tmp_path, capsys):
    write_records(tmp_path, 8)

    def behave(req, attempt):
        g = gold_of(req)
        if g % 4 == 1:
            return Reply(text=f"Looks like {g + 1}.\n\n### Answer: {g + 1}")      # wrong answer
        if g % 4 == 2:
            return Reply(text=f"I think it is {g}.")                             # no marker
        return Reply(text=f"Reading the chart.\n\n**### Answer:** {g:,}")       # right, in markdown

    with FakeOpenAI(behave) as server:
        assert run(tmp_path, server, "--with-direct", "--hint-answer") == 0
    out, dropped = rows(tmp_path / "out/sft.jsonl"), rows(tmp_path / "out/sft.dropped.jsonl")
    cot = {r["id"]: r for r in out if not r["id"].endswith("_direct")}
    assert sorted(cot) == ["q0", "q3", "q4", "q7"]
    assert cot["q3"]["conversations"][1]["value"].endswith("\n\n### Answer: 3")
    assert cot["q3"]["conversations"][0]["value"] == (
        "<image>\nWhat is value 3?\nGenerate a reason first and then output a short answer.")
    assert sorted(r["id"] for r in out if r["id"].endswith("_direct")) == [f"q{i}_direct" for i in range(8)]
    reasons = {r["id"]: r["reason"] for r in dropped}
    assert reasons["q1"] == "answer does not match the annotation" and "marker" in reasons["q2"]
    req = server.requests[0]["body"]
    assert req["messages"][0]["content"].startswith("When provided with an image and a question")
    user = req["messages"][1]["content"]
    assert user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert "Don't include '%' sign" in user[1]["text"] and "(Reference answer:" in user[1]["text"]
    assert server.requests[0]["headers"].get("authorization") == f"Bearer {KEY}"
    assert KEY not in capsys.readouterr().out


def test_retries_honour_retry_after_then_succeed(tmp_path):
    write_records(tmp_path, 3)

    def behave(req, attempt):
        g = gold_of(req)
        if g == 0 and attempt <= 2:
            return Reply(status=429, headers={"Retry-After": "0.3"}, error={"message": "slow down",
                                                                          "code": "rate_limit_exceeded"})
        if g == 1 and attempt == 1:
            return Reply(status=503)
        if g == 2 and attempt == 1:
            return Reply(raw=b'{"choices": [ this is not json')
        return right(req, attempt)

    with FakeOpenAI(behave) as server:
        assert run(tmp_path, server) == 0
        times = [r["time"] for r in server.requests if r["question"].startswith("What is value 0")]
    assert len(times) == 3 and all(b - a >= 0.28 for a, b in zip(times, times[1:]))     # Retry-After obeyed
    assert sorted(r["id"] for r in rows(tmp_path / "out/sft.jsonl")) == ["q0", "q1", "q2"]
    assert server.attempts == {"What is value 0?": 3, "What is value 1?": 2, "What is value 2?": 2}


def test_timeouts_are_retried_and_give_up_cleanly(tmp_path):
    write_records(tmp_path, 2)

    def behave(req, attempt):
        if gold_of(req) == 0 and attempt == 1:
            return Reply(delay=2.0, text="late")               # times out
        if gold_of(req) == 1:
            return Reply(status=500)                             # never recovers
        return right(req, attempt)

    with FakeOpenAI(behave) as server:
        assert run(tmp_path, server, "--timeout", "0.5", "--max-retries", "2") == 0
    assert [r["id"] for r in rows(tmp_path / "out/sft.jsonl")] == ["q0"]
    failed = rows(tmp_path / "out/sft.failed.jsonl")
    assert [f["id"] for f in failed] == ["q1"] and "gave up after 2 retries" in failed[0]["error"]
    assert server.attempts["What is value 1?"] == 3


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_errors_stop_the_run_without_a_retry_storm(tmp_path, capsys, status):
    write_records(tmp_path, 40)
    with FakeOpenAI(lambda req, a: Reply(status=status, error={"message": f"Incorrect API key provided: {KEY}"})) \
            as server:
        code = run(tmp_path, server, "--concurrency", "4")
    assert code == 2
    assert len(server.requests) <= 4                             # the workers in flight, then nothing more
    err = capsys.readouterr()
    assert "stopped" in err.err and KEY not in err.out + err.err
    assert rows(tmp_path / "out/sft.jsonl") == []


def test_requests_overlap_under_concurrency(tmp_path):
    write_records(tmp_path, 16)
    with FakeOpenAI(right, latency=0.3) as server:
        assert run(tmp_path, server, "--concurrency", "8") == 0
    assert server.max_in_flight >= 6


def test_kill_9_mid_run_then_resume_writes_every_id_once(tmp_path):
    write_records(tmp_path, 30)
    proc, killed = None, []

    def kill_at_the_12th_request(req, attempt):     # the server pulls the trigger: no polling, no timing
        if len(server.requests) >= 12 and not killed:  # >=: two requests can be logged before either gets here
            killed.append(True)
            proc.send_signal(signal.SIGKILL)
        return right(req, attempt)

    with FakeOpenAI(kill_at_the_12th_request, latency=0.15) as server:
        argv = [sys.executable, "distill.py", "--data", str(tmp_path / "records.jsonl"), "--image-root",
                str(tmp_path), "--out", str(tmp_path / "out/sft.jsonl"), "--teacher", "openai", "--base-url",
                server.url, "--concurrency", "3", "--with-direct"]
        env = dict(os.environ, OPENAI_API_KEY=KEY)
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert proc.wait() == -signal.SIGKILL
        first = len(server.requests)
        assert rows(tmp_path / "out/sft.jsonl"), "nothing was written before the kill: nothing to resume"
        assert 4 <= first < 30
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    ids = [r["id"] for r in rows(tmp_path / "out/sft.jsonl")]
    assert sorted(ids) == sorted([f"q{i}" for i in range(30)] + [f"q{i}_direct" for i in range(30)])
    assert len(server.requests) <= 30 + 3                        # at most the requests in flight were redone


def test_bad_lines_fail_before_any_request(tmp_path):
    path = write_records(tmp_path, 3)
    lines = path.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n{not json\n")
    missing = tmp_path / "missing.jsonl"
    missing.write_text(lines[0] + "\n" + json.dumps({"id": "x", "image": None, "question": "q", "dataset": "chartqa"})
                       + "\n")
    with FakeOpenAI(right) as server:
        with pytest.raises(UserError, match=r"broken\.jsonl:2: not valid JSON"):
            run(tmp_path, server, records=broken)
        with pytest.raises(UserError, match=r"missing\.jsonl:2: missing field 'answers'"):
            run(tmp_path, server, records=missing)
    assert server.requests == []


def test_unreadable_image_fails_that_record_only(tmp_path):
    write_records(tmp_path, 4, bad_image_ids={1})
    os.remove(tmp_path / "img/q2.png")
    with FakeOpenAI(right) as server:
        assert run(tmp_path, server) == 0
    assert sorted(r["id"] for r in rows(tmp_path / "out/sft.jsonl")) == ["q0", "q3"]
    reasons = {r["id"]: r["reason"] for r in rows(tmp_path / "out/sft.dropped.jsonl")}
    assert reasons["q1"].startswith("image: ") and "not a readable image" in reasons["q1"]
    assert reasons["q2"].startswith("image: ")
    assert len(server.requests) == 2


def test_max_cost_stops_and_a_rerun_continues(tmp_path, capsys):
    write_records(tmp_path, 10)
    price = ["--price-in", "1000", "--price-out", "1000"]         # $0.12 per fake request (100 + 20 tokens)
    with FakeOpenAI(right) as server:
        assert run(tmp_path, server, *price, "--max-cost", "0.5", "--concurrency", "1",
                   "--est-output-tokens", "20") == 3
        kept = len(rows(tmp_path / "out/sft.jsonl"))
        assert 1 <= kept < 10
        assert "max-cost" in capsys.readouterr().err
        assert run(tmp_path, server, *price, "--max-cost", "100") == 0
    assert len(rows(tmp_path / "out/sft.jsonl")) == 10 and len(server.requests) == 10


def test_dry_run_sends_nothing(tmp_path, capsys):
    write_records(tmp_path, 5)
    with FakeOpenAI(right) as server:
        assert run(tmp_path, server, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "dry run: 5 requests" in out and "$" in out and server.requests == []


def test_batch_api_creates_polls_resumes_and_ingests(tmp_path):
    write_records(tmp_path, 6)

    def behave(req, attempt):
        return right(req, attempt) if gold_of(req) != 4 else Reply(text="### Answer: 99")

    with FakeOpenAI(behave) as server:
        assert run(tmp_path, server, "--batch-api", "--no-wait") == 0            # created, still in progress
        state = json.loads((tmp_path / "out/sft.batch.json").read_text())
        assert state["requests"] == 6 and rows(tmp_path / "out/sft.jsonl") == []
        assert run(tmp_path, server, "--batch-api", "--poll-interval", "0.01") == 0   # resumes the saved batch
        assert len(server.batches) == 1
    assert sorted(r["id"] for r in rows(tmp_path / "out/sft.jsonl")) == ["q0", "q1", "q2", "q3", "q5"]
    assert [r["id"] for r in rows(tmp_path / "out/sft.dropped.jsonl")] == ["q4"]
    assert not (tmp_path / "out/sft.batch.json").exists()


# ------------------------------------------------------------------------------------------------ synthetic teacher

def test_synthetic_teacher_end_to_end(tmp_path, capsys):
    from data.synthetic import generate
    generate(str(tmp_path / "syn"), 60, seed=3, level="easy", n_test=10)
    argv = ["--data", str(tmp_path / "syn/train.jsonl"), "--image-root", str(tmp_path / "syn"), "--teacher",
            "synthetic", "--with-direct"]
    assert distill.main(argv + ["--out", str(tmp_path / "clean.jsonl")]) == 0
    clean = rows(tmp_path / "clean.jsonl")
    assert len(clean) == 120 and rows(tmp_path / "clean.dropped.jsonl") == []     # error rate 0: all kept
    assert distill.main(argv + ["--out", str(tmp_path / "noisy.jsonl"), "--error-rate", "0.5", "--seed", "1"]) == 0
    noisy, dropped = rows(tmp_path / "noisy.jsonl"), rows(tmp_path / "noisy.dropped.jsonl")
    assert 10 <= len(dropped) <= 40 and len(noisy) == 120 - len(dropped)
    assert distill.main(argv + ["--out", str(tmp_path / "noisy.jsonl"), "--error-rate", "0.5", "--seed", "1"]) == 0
    assert rows(tmp_path / "noisy.jsonl") == noisy                                   # the same command resumes
    assert "60 already done" in capsys.readouterr().out
    # changed settings never resume into (and mix with) another run's rows; --overwrite replaces only its files
    with pytest.raises(UserError, match=r"flags\.error_rate: 0\.5 -> 0\.2.*--overwrite"):
        distill.main(argv + ["--out", str(tmp_path / "noisy.jsonl"), "--error-rate", "0.2", "--seed", "1"])
    assert rows(tmp_path / "noisy.jsonl") == noisy
    (tmp_path / "mine.txt").write_text("not ours")
    assert distill.main(argv + ["--out", str(tmp_path / "noisy.jsonl"), "--error-rate", "0.2", "--seed", "1",
                                "--overwrite"]) == 0
    assert len(rows(tmp_path / "noisy.jsonl")) > len(noisy) and (tmp_path / "mine.txt").read_text() == "not ours"
    # a file distill.py did not write is never appended to or emptied
    (tmp_path / "user.jsonl").write_text('{"id": "mine"}\n')
    with pytest.raises(UserError, match="not written by this stage"):
        distill.main(argv + ["--out", str(tmp_path / "user.jsonl"), "--overwrite"])
    assert (tmp_path / "user.jsonl").read_text() == '{"id": "mine"}\n'


# ------------------------------------------------------------------------------------------------ a server that is not there

def closed_port():
    """A loopback port with nothing listening (bound, then released)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("n", [30, 3])
def test_nothing_listening_stops_at_once_naming_the_url(tmp_path, capsys, n):
    """Connection refused on every request, with the default retry settings (a backoff that would wait about 46 s per
    request): 30 records stop at the first 10 failures, 3 records end with 'all failed'; exit 2 within seconds, one
    error line naming the URL, never the key."""
    import time
    write_records(tmp_path, n)
    url = f"http://127.0.0.1:{closed_port()}/v1"
    t0 = time.monotonic()
    code = distill.main(["--data", str(tmp_path / "records.jsonl"), "--image-root", str(tmp_path), "--out",
                         str(tmp_path / "out/sft.jsonl"), "--teacher", "openai", "--base-url", url])
    assert code == 2 and time.monotonic() - t0 < 10
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0], cap.err
    assert ("cannot connect" if n > 10 else f"all {n} requests") in errors[0]
    assert KEY not in cap.out + cap.err
    assert rows(tmp_path / "out/sft.jsonl") == []
    assert "could not connect" in cap.out


def test_a_server_failing_for_max_retry_time_stops_the_run(tmp_path, capsys):
    """Three answers, then 503 on every request: no success for --max-retry-time stops the run (exit 2), however
    many retries are left; the three rows are kept."""
    write_records(tmp_path, 10)

    def behave(req, attempt):
        return right(req, attempt) if len(server.requests) <= 3 else Reply(status=503)

    with FakeOpenAI(behave) as server:
        code = run(tmp_path, server, "--max-retry-time", "0.5", "--max-retries", "1000", "--concurrency", "1")
    assert code == 2
    err = capsys.readouterr().err
    assert "--max-retry-time" in err and server.url in err
    assert len(rows(tmp_path / "out/sft.jsonl")) == 3
