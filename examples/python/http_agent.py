"""An example agent that calls oncely's JSON API with the standard library
alone (no gRPC, no oncely package): what an agent in a tool runtime that
only speaks HTTP does.

It follows the rules every agent should: one Idempotency-Key per logical
call, made before the first attempt and sent on every retry; transient
answers (a lost connection, 409 while the first attempt is in flight, 429,
503, 504) retried with exponential backoff and full jitter, never sooner
than Retry-After; any other 4xx raised at once. Then it waits for a worker
(see worker.py) to perform the task, printing
``result of task <id>: <result>``.

Usage: python http_agent.py [HOST:PORT] [--timeout SECONDS]
(default 127.0.0.1:50051 and 30 seconds). On a server with API keys, set
ONCELY_API_KEY to an ``agent`` key for the agent id ``http-agent`` (or an
``admin`` key). Exits non-zero if the server does not behave as the
idempotency contract says, or if the task did not succeed in time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
import uuid
from email.message import Message
from typing import Any

#: Answers worth another attempt with the same key (a 409 only with
#: Retry-After: the first request with the key is still in flight).
TRANSIENT = {409, 429, 502, 503, 504}


class Refused(Exception):
    """An answer that retrying cannot change: a 4xx (the request must
    change) or a 500 (a bug in the server)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        super().__init__(f"{status} {problem.get('reason')}: {problem.get('detail')}")
        self.status = status
        self.problem = problem


def call(base: str, method: str, path: str, body: Any = None, key: str | None = None,
         attempts: int = 6, timeout: float = 35.0) -> tuple[int, Message, Any]:
    """One logical call: the status, headers (names in any case) and JSON
    body of its answer, retrying transient failures with the same key."""
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    token = os.environ.get("ONCELY_API_KEY", "").strip()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(base + path, data=data, method=method, headers=headers)
        wait = None
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers, json.loads(response.read())
        except urllib.error.HTTPError as error:
            problem = json.loads(error.read() or b"{}")
            in_flight = error.code != 409 or error.headers.get("Retry-After") is not None
            if error.code not in TRANSIENT or not in_flight:
                raise Refused(error.code, problem) from None
            wait = float(error.headers.get("Retry-After") or 0)
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            pass  # the outcome is unknown: the same key makes a retry safe
        if attempt == attempts:
            break
        backoff = random.uniform(0, min(5.0, 0.2 * 2**attempt))
        time.sleep(max(backoff, wait or 0))
    sys.exit(f"{method} {path} failed {attempts} times; asking again with key {key} is safe")


def run(base: str, timeout: float) -> None:
    """Creates a task, asks again with its key, misuses the key, then waits."""
    request = {"agent_id": "http-agent", "action": "send_email",
               "parameters": {"to": "ada@example.com", "subject": "hello"}}
    key = str(uuid.uuid4())  # made once, before the first attempt
    status, headers, task = call(base, "POST", "/v1/tasks", request, key)
    if status != 201 or headers.get("Idempotent-Replayed") != "false":
        sys.exit(f"a new key was not created afresh: {status} {dict(headers)}")
    task_id = task["taskId"]
    print(f"created task {task_id} ({task['status']}) at {headers.get('Location')}")

    status, headers, again = call(base, "POST", "/v1/tasks", request, key)
    if again != task or headers.get("Idempotent-Replayed") != "true":
        sys.exit(f"expected a replay of {task_id}, got {again}")
    print("asked again with the same key: same task, replayed")

    try:
        call(base, "POST", "/v1/tasks", {**request, "action": "send_sms"}, key)
        sys.exit("a key reused for another request was accepted")
    except Refused as refused:
        if refused.status != 422 or refused.problem.get("reason") != "IDEMPOTENCY_KEY_REUSED":
            sys.exit(f"expected 422 IDEMPOTENCY_KEY_REUSED, got {refused}")
    print("the same key with another request: refused (422 IDEMPOTENCY_KEY_REUSED)")

    deadline = time.monotonic() + timeout
    while True:
        left = max(1, min(30, int(deadline - time.monotonic())))
        _, _, task = call(base, "POST", f"/v1/tasks/{task_id}:wait?timeout={left}s")
        if task["status"] not in ("TASK_STATUS_QUEUED", "TASK_STATUS_RUNNING") or time.monotonic() >= deadline:
            break
    if task["status"] != "TASK_STATUS_SUCCEEDED":
        sys.exit(f"task {task_id} is {task['status']} after {timeout:g}s (is a worker running?)")
    print(f"result of task {task_id}: {json.dumps(task.get('result', {}), sort_keys=True)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="An example agent that calls oncely's JSON API.")
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="the server (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for a worker to perform the task (default %(default)s)")
    args = parser.parse_args()
    try:
        run(f"http://{args.target}", args.timeout)
    except Refused as refused:
        sys.exit(f"refused: {refused}")


if __name__ == "__main__":
    main()
