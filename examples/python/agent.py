"""An example agent that calls oncely from Python with the oncely package.

The package does what every agent should: one idempotency key per logical
call, made before the first attempt and sent on every retry; transient
failures (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED) retried with
exponential backoff and full jitter, never sooner than the server's RetryInfo
asks; INVALID_ARGUMENT, FAILED_PRECONDITION and every other error raised at
once as ``Rejected``.

Then it has a task performed by a worker and waits for its result: it
creates a ``send_email`` task and waits (``wait_task``) until a worker (see
worker.py) has completed it, printing ``result of task <id>: <result>``.

Usage: python agent.py [HOST:PORT] [--timeout SECONDS]
(default 127.0.0.1:50051 and 30 seconds)

Install the package first, from the repository root:
``pip install ./clients/python``, and start a worker (worker.py). Exits
non-zero if the server does not behave as the idempotency contract says, or
if the task did not succeed within the timeout.

On a server with API keys, set ``ONCELY_API_KEY`` to an ``agent`` key for
the agent id ``python-agent`` (``oncely keys create --name py-agent --role
agent --agent-id python-agent``) or an ``admin`` key: the Client sends it
on every call.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from oncely import Client, OncelyError, Rejected


def run(client: Client) -> None:
    """Creates a task, asks again with its key, then misuses the key."""
    parameters = {"to": "ada@example.com", "subject": "hello"}
    created = client.create_task("python-agent", "send_email", parameters)
    if created.replayed:
        sys.exit(f"a call with a new key was answered as a replay: {created}")
    print(
        f"created task {created.task.task_id} ({created.task.status}) with key {created.key}"
        f" in {created.attempts} attempt(s)"
    )

    # The same logical call again (say, after the agent restarted): same key.
    again = client.create_task("python-agent", "send_email", parameters, idempotency_key=created.key)
    if again.task.task_id != created.task.task_id or not again.replayed:
        sys.exit(f"expected a replay of {created.task.task_id}, got {again.task.task_id} replayed={again.replayed}")
    print("asked again with the same key: same task, replayed")

    # A different request under the same key is refused, not retried.
    try:
        client.create_task("python-agent", "send_sms", idempotency_key=created.key)
    except Rejected as refused:
        if refused.code != grpc.StatusCode.FAILED_PRECONDITION or refused.reason != "IDEMPOTENCY_KEY_REUSED":
            sys.exit(f"expected FAILED_PRECONDITION (IDEMPOTENCY_KEY_REUSED) for a reused key, got {refused}")
        print(f"reusing the key for another request is refused: {refused}")
    else:
        sys.exit("a reused key with a different request should be refused")


def perform(client: Client, timeout: float) -> None:
    """Creates a send_email task and waits for a worker to perform it."""
    created = client.create_task("python-agent", "send_email", {"to": "grace@example.com", "subject": "your result"})
    task_id = created.task.task_id
    print(f"created task {task_id} (send_email); waiting up to {timeout:g}s for a worker to perform it")
    task = client.wait_task(task_id, timeout=timeout)
    if task.status != "SUCCEEDED":
        hint = "" if task.finished else " (is a worker running? python examples/python/worker.py)"
        detail = f": {task.error_message}" if task.error_message else ""
        sys.exit(f"task {task_id} is {task.status} after {timeout:g}s, attempt {task.attempt}{detail}{hint}")
    print(f"result of task {task_id}: {json.dumps(task.result, sort_keys=True)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description="An example agent that calls oncely.",
        epilog="On a server with API keys, set ONCELY_API_KEY to an agent key for the agent id"
        " python-agent (or an admin key); the client sends it on every call.",
    )
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="the server (default %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for a worker to perform the task (default %(default)s)",
    )
    args = parser.parse_args()
    with Client(args.target) as client:
        try:
            run(client)
            perform(client, args.timeout)
        except OncelyError as error:
            sys.exit(f"unexpected error: {error}")


if __name__ == "__main__":
    main()
