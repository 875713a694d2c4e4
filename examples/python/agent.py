"""An example agent that calls oncely correctly from Python.

One logical call gets one idempotency key, generated before the first
attempt and sent on every retry. Transient failures (UNAVAILABLE,
DEADLINE_EXCEEDED, ABORTED, broken connections) are retried with exponential
backoff and full jitter, waiting at least as long as the server's RetryInfo
asks; INVALID_ARGUMENT, FAILED_PRECONDITION and every other error are not.

Usage: python agent.py [HOST:PORT]   (default 127.0.0.1:50051)

The gRPC stubs are generated from ../../proto at start-up, so they always
match the server's API.
"""

import importlib
import os
import random
import sys
import tempfile
import time
import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "..", "..", "proto")

RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ABORTED,
}


def generate_stubs():
    """Compiles proto/tasks/v1/tasks.proto into a temporary folder and
    imports the modules."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="oncely-stubs-")
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main([
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        "tasks/v1/tasks.proto",
    ])
    if code != 0:
        sys.exit(f"cannot compile {PROTO_DIR}/tasks/v1/tasks.proto")
    sys.path.insert(0, out)
    return (
        importlib.import_module("tasks.v1.tasks_pb2"),
        importlib.import_module("tasks.v1.tasks_pb2_grpc"),
    )


class Rejected(Exception):
    """The server refused the request; retrying it unchanged cannot help."""

    def __init__(self, code, details):
        super().__init__(f"{code.name}: {details}")
        self.code = code


class GaveUp(Exception):
    """Every attempt failed transiently, or time ran out."""


def retry_delay(error):
    """The delay the server's RetryInfo asks for, in seconds, or 0."""
    status = rpc_status.from_call(error)
    if status is None:
        return 0.0
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return 0.0


def create_task(stub, request, key=None, max_attempts=6, initial_backoff=0.1,
                max_backoff=5.0, attempt_timeout=10.0, total_timeout=60.0):
    """Creates a task exactly once. Returns (task, replayed, key, attempts)."""
    key = key or str(uuid.uuid4())
    deadline = time.monotonic() + total_timeout
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        try:
            task, call = stub.CreateTask.with_call(
                request,
                metadata=[("idempotency-key", key)],
                timeout=max(0.001, min(attempt_timeout, remaining)),
            )
            headers = dict(call.initial_metadata())
            return task, headers.get("idempotent-replayed") == "true", key, attempt
        except grpc.RpcError as error:
            if error.code() not in RETRYABLE:
                raise Rejected(error.code(), error.details()) from error
            ceiling = min(max_backoff, initial_backoff * 2 ** (attempt - 1))
            wait = max(random.uniform(0, ceiling), retry_delay(error))
            if attempt >= max_attempts or time.monotonic() + wait >= deadline:
                raise GaveUp(f"{attempt} attempts, last {error.code().name}: {error.details()}") from error
            time.sleep(wait)


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051"
    tasks_pb2, tasks_pb2_grpc = generate_stubs()
    with grpc.insecure_channel(target) as channel:
        stub = tasks_pb2_grpc.TaskServiceStub(channel)
        request = tasks_pb2.CreateTaskRequest(agent_id="python-agent", action="send_email")
        request.parameters.update({"to": "ada@example.com", "subject": "hello"})

        task, replayed, key, attempts = create_task(stub, request)
        print(f"created task {task.task_id} with key {key} in {attempts} attempt(s), replayed={replayed}")

        # The same logical call again (say, after the agent restarted): same key.
        again, replayed_again, _, _ = create_task(stub, request, key=key)
        if again.task_id != task.task_id or not replayed_again:
            sys.exit(f"expected a replay of {task.task_id}, got {again.task_id} replayed={replayed_again}")
        print("asked again with the same key: same task, replayed")

        # A different request under the same key is refused, not retried.
        other = tasks_pb2.CreateTaskRequest(agent_id="python-agent", action="send_sms")
        try:
            create_task(stub, other, key=key)
            sys.exit("a reused key with a different request should be refused")
        except Rejected as refused:
            if refused.code != grpc.StatusCode.FAILED_PRECONDITION:
                sys.exit(f"expected FAILED_PRECONDITION for a reused key, got {refused}")
            print(f"reusing the key for another request is refused: {refused}")


if __name__ == "__main__":
    main()
