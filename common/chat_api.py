"""The OpenAI-compatible chat API, as distill.py (the teacher) and data/gpt_extract.py (MathVista's answer
extraction) call it: one request with retries and backoff (Retry-After honoured), a server-health check that stops a
run which cannot connect, the prices of the models, and the API key scrubbed from every message."""

import asyncio
import os
import random
import time

# $ per 1M (input, output) tokens, live API; the Batch API costs half
PRICES = {"gpt-4o-2024-05-13": (5.00, 15.00), "gpt-4o-2024-08-06": (2.50, 10.00), "gpt-4o-2024-11-20": (2.50, 10.00),
          "gpt-4o": (2.50, 10.00), "gpt-4o-mini": (0.15, 0.60), "gpt-4o-mini-2024-07-18": (0.15, 0.60),
          "gpt-4.1": (2.00, 8.00), "gpt-4.1-mini": (0.40, 1.60), "gpt-4-turbo-2024-04-09": (10.00, 30.00)}
class Fatal(Exception):
    """Stops the run: bad key, no access, unknown model. Retrying cannot help."""


class RecordFailed(Exception):
    """This record failed (after retries); the run goes on and a rerun tries it again."""


FIRST_REQUESTS = 10        # the first this many requests all failing to connect stop the run
CONNECT_TIMEOUT = 10.0     # seconds to open a connection: a host that never answers fails in this, not in --timeout
DEFAULT_URL = "https://api.openai.com/v1"


def cannot_connect(err):
    """A request that never reached the server: refused, unresolvable, unreachable, or a connect timeout (a read
    timeout means that the server is there, only slow)."""
    import openai                 # (here: a run that never calls the API needs no openai)
    if isinstance(err, openai.APITimeoutError):
        return type(err.__cause__).__name__ == "ConnectTimeout"
    return isinstance(err, openai.APIConnectionError)


class Health:
    """Whether the server answers at all. Counts the requests that could not connect, and stops the run (Fatal) when
    the first FIRST_REQUESTS requests all fail to connect, or when no request has succeeded for max_time seconds
    while requests kept failing. Until the server has answered once, a failed connection is not retried: a refused
    connection is refused again, and the backoff would cost each request about 46 s before it gave up."""

    def __init__(self, url, max_time):
        self.url, self.max_time = url, max_time
        self.answered = False                        # some HTTP response came back: the server is there
        self.connect_failures = 0                    # requests that failed for want of a connection
        self.last_ok = time.monotonic()              # the last success (or the start)

    def ok(self):
        self.answered, self.last_ok = True, time.monotonic()

    def time_left(self):
        return self.max_time - (time.monotonic() - self.last_ok)

    def connect_failed(self, err):
        self.connect_failures += 1
        if not self.answered and self.connect_failures >= FIRST_REQUESTS:
            raise Fatal(f"cannot connect to {self.url}: the first {self.connect_failures} requests all failed "
                        f"({type(err).__name__}: {scrub(str(err))}); check that a server listens there (--base-url)")

    def check(self, err):
        """After a failed try: stop when nothing has succeeded for max_time seconds."""
        if self.time_left() <= 0:
            raise Fatal(f"no request to {self.url} has succeeded for {self.max_time:g} s (--max-retry-time); last "
                        f"error: {type(err).__name__}: {scrub(str(err))}")


def scrub(text):
    key = os.environ.get("OPENAI_API_KEY")
    return text.replace(key, "***") if key else text


def retry_after(err):
    """Seconds the server asked us to wait (Retry-After / retry-after-ms), if any."""
    headers = getattr(getattr(err, "response", None), "headers", None) or {}
    try:
        if headers.get("retry-after-ms"):
            return float(headers["retry-after-ms"]) / 1000
        if headers.get("retry-after"):
            return float(headers["retry-after"])
    except ValueError:
        return None
    return None


async def chat(client, msgs, args, health=None):
    """One chat completion with retries: 429 / 5xx / timeouts / malformed bodies back off (Retry-After honoured);
    401 / 403 / 404 stop the run. args: model, max_tokens, temperature, timeout, max_retries, backoff, max_backoff.
    With a Health, failed connections are counted and can stop the run (see Health). Also used by MathVista's GPT
    answer extraction (data/gpt_extract.py)."""
    import openai
    last = None
    timeout = openai.Timeout(args.timeout, connect=min(args.timeout, CONNECT_TIMEOUT))
    for attempt in range(args.max_retries + 1):
        try:
            resp = await client.chat.completions.create(
                model=args.model, messages=msgs, max_tokens=args.max_tokens,
                temperature=args.temperature, timeout=timeout)
            if health:
                health.answered = True
            text = resp.choices[0].message.content
            if not isinstance(text, str) or not text.strip():
                raise RecordFailed("empty response")
            u = resp.usage
            if health:
                health.ok()
            return text, {"prompt_tokens": getattr(u, "prompt_tokens", 0) or 0,
                          "completion_tokens": getattr(u, "completion_tokens", 0) or 0}
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
            raise Fatal(f"{type(e).__name__} ({e.status_code}): {scrub(str(e))}") from None
        except openai.RateLimitError as e:
            if getattr(e, "code", None) == "insufficient_quota":
                raise Fatal(f"the account is out of quota: {scrub(str(e))}") from None
            last, wait = e, retry_after(e)
        except (openai.InternalServerError, openai.APITimeoutError, openai.APIConnectionError) as e:
            last, wait = e, retry_after(e)
            if health and cannot_connect(e) and not health.answered:
                health.connect_failed(e)              # Fatal at the FIRST_REQUESTS-th
                raise RecordFailed(f"cannot connect to {health.url}: {type(e).__name__}: {scrub(str(e))}") from None
        except openai.APIStatusError as e:            # other 4xx (400 bad request ...): this record only
            if health:
                health.answered = True
            raise RecordFailed(f"{e.status_code}: {scrub(str(e))}") from None
        except (openai.APIResponseValidationError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            last, wait = e, None                      # a malformed body: try again
        if health:
            health.answered = health.answered or not cannot_connect(last)
            health.check(last)                        # Fatal when nothing has succeeded for --max-retry-time
        if attempt == args.max_retries:
            break
        backoff = min(args.max_backoff, args.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        wait = wait if wait is not None else backoff
        await asyncio.sleep(min(wait, max(health.time_left(), 0.0) + 0.01) if health else wait)
    if health and cannot_connect(last):
        health.connect_failed(last)
    raise RecordFailed(f"gave up after {args.max_retries} retries: {type(last).__name__}: {scrub(str(last))}")
