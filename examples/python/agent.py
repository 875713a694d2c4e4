"""An example agent that calls oncely from Python with the oncely package.

The package does what every agent should: one idempotency key per logical
call, made before the first attempt and sent on every retry; transient
failures (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, CANCELLED) retried with
exponential backoff and full jitter, never sooner than the server's RetryInfo
asks; INVALID_ARGUMENT, FAILED_PRECONDITION and every other error raised at
once as ``Rejected``.

Usage: python agent.py [HOST:PORT]   (default 127.0.0.1:50051)

Install the package first, from the repository root:
``pip install ./clients/python``. Exits non-zero if the server does not
behave as the idempotency contract says.
"""

from __future__ import annotations

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


def main() -> None:
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    with Client(target) as client:
        try:
            run(client)
        except OncelyError as error:
            sys.exit(f"unexpected error: {error}")


if __name__ == "__main__":
    main()
