"""A small OpenAI-compatible HTTP server on loopback, for tests and bench/distill_throughput.py.

Endpoints: POST /v1/chat/completions, POST /v1/files (multipart), GET /v1/files/{id}/content, POST /v1/batches,
GET /v1/batches/{id}. What a chat request gets back is decided by `behave(request, attempt)`, which returns a
Reply; the default answers every question with its reference answer. It records every request and the largest
number of requests it had in flight at once.
"""

import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    request_queue_size = 256          # the default 5 drops simultaneous connects (1 s SYN retries)


@dataclass
class Reply:
    text: str | None = "Reasoning.\n\n### Answer: 1"
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None              # a body sent as is (malformed JSON, say)
    error: dict | None = None             # an OpenAI error object for non-200 replies


def completion(text, prompt_tokens=100, completion_tokens=20):
    return {"id": "chatcmpl-" + uuid.uuid4().hex[:8], "object": "chat.completion", "created": int(time.time()),
            "model": "fake", "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def question_of(request):
    """The question text inside a distill.py request (between 'Question:' and the output format)."""
    for m in request.get("messages", []):
        content = m.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        for p in parts:
            if p.get("type") == "text":
                hit = re.search(r"Question(?: #)?:?\s*\n?(.*?)\n(?:#|###########)", p["text"], re.DOTALL)
                if hit:
                    return hit.group(1).strip()
    return ""


class FakeOpenAI:
    def __init__(self, behave=None, latency=0.0):
        self.behave = behave or (lambda req, attempt: Reply())
        self.latency = latency
        self.requests, self.attempts = [], {}
        self.in_flight = self.max_in_flight = 0
        self.files, self.batches = {}, {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                # headers and body leave in separate writes: without this, Nagle + delayed ACK add ~40 ms to each
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def send(self, status, body, headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, str(v))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.endswith("/chat/completions"):
                    return server._chat(self, json.loads(body), {k.lower(): v for k, v in self.headers.items()})
                if self.path.endswith("/files"):
                    return server._upload(self, body, self.headers.get("Content-Type", ""))
                if self.path.endswith("/batches"):
                    return server._create_batch(self, json.loads(body))
                self.send(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self):
                m = re.search(r"/files/([^/]+)/content$", self.path)
                if m:
                    return self.send(200, server.files[m.group(1)])
                m = re.search(r"/batches/([^/]+)$", self.path)
                if m:
                    return server._retrieve_batch(self, m.group(1))
                self.send(404, {"error": {"message": f"no route {self.path}"}})

        self.httpd = _Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- chat
    def _reply(self, req, headers=None):
        q = question_of(req)
        with self.lock:
            self.requests.append({"body": req, "headers": headers or {}, "question": q, "time": time.time()})
            attempt = self.attempts[q] = self.attempts.get(q, 0) + 1
        return self.behave(req, attempt)

    def _chat(self, h, req, headers):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            r = self._reply(req, headers)
            time.sleep(self.latency + r.delay)
            if r.raw is not None:
                return h.send(r.status, r.raw, r.headers)
            if r.status != 200:
                return h.send(r.status, {"error": r.error or {"message": f"status {r.status}", "type": "error"}},
                              r.headers)
            return h.send(200, completion(r.text), r.headers)
        except (BrokenPipeError, ConnectionResetError):     # the client gave up (a timeout)
            pass
        finally:
            with self.lock:
                self.in_flight -= 1

    # ---- files and batches
    def _upload(self, h, body, content_type):
        boundary = content_type.split("boundary=")[-1].strip('"').encode()
        data = b""
        for part in body.split(b"--" + boundary):
            if b'name="file"' in part:
                data = part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
        fid = "file-" + uuid.uuid4().hex[:8]
        self.files[fid] = data
        h.send(200, {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                     "filename": "requests.jsonl", "purpose": "batch", "status": "processed"})

    def _batch_obj(self, bid):
        b = self.batches[bid]
        return {"id": bid, "object": "batch", "endpoint": "/v1/chat/completions", "input_file_id": b["input"],
                "completion_window": "24h", "status": b["status"], "output_file_id": b.get("output"),
                "created_at": b["created"]}

    def _create_batch(self, h, req):
        bid = "batch_" + uuid.uuid4().hex[:8]
        self.batches[bid] = {"input": req["input_file_id"], "status": "validating", "created": int(time.time()),
                             "polls": 0}
        h.send(200, self._batch_obj(bid))

    def _retrieve_batch(self, h, bid):
        b = self.batches[bid]
        b["polls"] += 1
        if b["status"] != "completed" and b["polls"] >= 2:      # "in_progress" once, then done
            lines = []
            for line in self.files[b["input"]].decode().splitlines():
                item = json.loads(line)
                r = self._reply(item["body"])
                body = completion(r.text) if r.status == 200 else {"error": r.error}
                lines.append(json.dumps({"id": "req-" + item["custom_id"], "custom_id": item["custom_id"],
                                         "response": {"status_code": r.status, "body": body}, "error": None}))
            out = "file-" + uuid.uuid4().hex[:8]
            self.files[out] = ("\n".join(lines) + "\n").encode()
            b.update(status="completed", output=out)
        elif b["status"] == "validating":
            b["status"] = "in_progress"
        h.send(200, self._batch_obj(bid))


if __name__ == "__main__":                               # a stand-alone server (bench/distill_throughput.py)
    import argparse
    import sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.2)
    a = ap.parse_args()
    with FakeOpenAI(lambda req, attempt: Reply(text="The bar reads 1.\n\n### Answer: 1"), latency=a.latency) as srv:
        print(srv.url, flush=True)
        sys.stdin.read()                                  # serve until the parent closes our stdin
