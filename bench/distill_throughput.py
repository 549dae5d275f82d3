"""distill.py throughput against a loopback OpenAI-compatible server that answers each request in 200 ms.

    python bench/distill_throughput.py [--n 640] [--concurrency 32]

With 32 requests in flight the ideal is 32 / 0.2 s = 160 requests/s; prints the measured rate as a fraction of it.
Goal: >= 0.8. Records carry a small PNG each, so image loading and base64 encoding are part of the cost.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import distill  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=640)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--latency", type=float, default=0.2)
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    from PIL import Image
    with tempfile.TemporaryDirectory() as d:
        Image.new("RGB", (64, 48), (200, 100, 50)).save(os.path.join(d, "chart.png"))
        with open(os.path.join(d, "records.jsonl"), "w") as f:
            for i in range(args.n):
                f.write(json.dumps({"id": f"q{i}", "image": "chart.png", "question": f"What is value {i}?",
                                    "answers": ["1"], "choices": None, "dataset": "chartqa"}) + "\n")
        # the server runs in its own process, so its work does not share our interpreter's GIL
        srv = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fake_openai.py"), "--latency",
                                str(args.latency)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        url = srv.stdout.readline().strip()
        try:
            t = time.perf_counter()
            code = distill.main(["--data", os.path.join(d, "records.jsonl"), "--image-root", d, "--out",
                                 os.path.join(d, "out.jsonl"), "--teacher", "openai", "--base-url", url,
                                 "--concurrency", str(args.concurrency)])
            dt = time.perf_counter() - t
        finally:
            srv.stdin.close()
            srv.wait()
        n_out = sum(1 for _ in open(os.path.join(d, "out.jsonl")))
        assert code == 0 and n_out == args.n
    ideal = args.concurrency / args.latency
    rate = args.n / dt
    print(f"{args.n} requests, {args.concurrency} in flight, "
          f"{args.latency * 1e3:.0f} ms each: {rate:.1f} req/s = {rate / ideal:.2f} of the ideal {ideal:.0f}/s "
          f"(goal >= 0.8)")


if __name__ == "__main__":
    main()
