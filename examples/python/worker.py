"""An example worker: performs oncely's ``send_email`` tasks with the oncely
package's Worker helper.

"Sending" an email appends a line ``<task_id>\\t<to>`` to a file (default
``sent-emails.txt``). The side effect is idempotent by the task id, as every
worker's must be: oncely delivers a task at least once (a worker that crashes
after sending and before completing leaves the task to be leased again), so
before appending, the worker looks for a line of the same task id and does
not send twice. A real worker passes the task id as the idempotency key of
its mail API instead.

Usage: python worker.py [HOST:PORT] [--file PATH] [--once N | --stop-after-idle SECONDS]

It runs until interrupted (Ctrl-C or SIGTERM: it finishes the task in hand
first), until it has performed N tasks (``--once N``), or until it had
nothing to do for SECONDS (``--stop-after-idle``). Install the package first,
from the repository root: ``pip install ./clients/python``.

On a server with API keys, set ``ONCELY_API_KEY`` to a ``worker`` key for
``send_email`` (``oncely keys create --name mailer --role worker --action
send_email``) or an ``admin`` key: the Client sends it on every call, and a
refused key stops the worker with exit code 1.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from oncely import Client, PermanentError, Task, Worker

ACTION = "send_email"
log = logging.getLogger("worker")


class Mailbox:
    """The side effect: lines ``<task_id>\\t<to>`` in a file, at most one
    per task id, however often a task is delivered and however many workers
    share the file (an exclusive ``flock`` covers the look and the
    append)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def send(self, task_id: str, to: str) -> bool:
        """Appends the line for ``task_id`` unless the file has one; returns
        whether it did."""
        with self.path.open("a+", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                file.seek(0)
                if any(line.split("\t", 1)[0] == task_id for line in file.read().splitlines()):
                    return False
                file.write(f"{task_id}\t{to}\n")
                file.flush()
                os.fsync(file.fileno())
                return True
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)


class Activity:
    """Counts the tasks performed and when the worker was last busy, for
    ``--once`` and ``--stop-after-idle``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.performed = 0
        self.in_hand = 0
        self.last_busy = time.monotonic()

    def started(self) -> None:
        with self.lock:
            self.in_hand += 1
            self.last_busy = time.monotonic()

    def ended(self) -> int:
        with self.lock:
            self.in_hand -= 1
            self.performed += 1
            self.last_busy = time.monotonic()
            return self.performed

    def idle_for(self) -> float:
        with self.lock:
            return 0.0 if self.in_hand else time.monotonic() - self.last_busy


def make_handler(mailbox: Mailbox, activity: Activity, stop: threading.Event, once: int | None) -> Any:
    """The Worker's handler: sends the email of one task."""

    def send_email(task: Task) -> dict[str, Any]:
        activity.started()
        try:
            to = task.parameters.get("to")
            if not isinstance(to, str) or not to:
                # Retrying cannot fix the parameters: fail the task for good.
                raise PermanentError(f"parameter 'to' must be a non-empty string, not {to!r}")
            sent = mailbox.send(task.task_id, to)
            print(
                f"task {task.task_id} (attempt {task.attempt}):"
                f" {'sent to' if sent else 'already sent, not again, to'} {to}",
                flush=True,
            )
            return {"to": to, "sent_now": sent}
        finally:
            if activity.ended() == once:
                stop.set()  # the Worker completes this task, then stops

    return send_email


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Performs oncely's send_email tasks.",
        epilog="On a server with API keys, set ONCELY_API_KEY to a worker key for send_email (or an admin key);"
        " the client sends it on every call.",
    )
    parser.add_argument("target", nargs="?", default="127.0.0.1:50051", help="the server (default %(default)s)")
    parser.add_argument(
        "--file", type=Path, default=Path("sent-emails.txt"), help="where emails are 'sent' (default %(default)s)"
    )
    stop_when = parser.add_mutually_exclusive_group()
    stop_when.add_argument("--once", type=int, metavar="N", help="exit after performing N tasks")
    stop_when.add_argument(
        "--stop-after-idle", type=float, metavar="SECONDS", help="exit after SECONDS without a task to perform"
    )
    parser.add_argument("--worker-id", default=f"python-worker-{socket.gethostname()}-{os.getpid()}")
    parser.add_argument("--concurrency", type=int, default=1, help="tasks at once (default %(default)s)")
    parser.add_argument(
        "--poll-wait", type=float, default=5.0, help="seconds one lease call waits (default %(default)s)"
    )
    args = parser.parse_args()
    if args.once is not None and args.once < 1:
        parser.error("--once needs a number of tasks of at least 1")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    activity = Activity()
    if args.stop_after_idle is not None:

        def watch_idle() -> None:
            while not stop.wait(0.2):
                if activity.idle_for() >= args.stop_after_idle:
                    log.info("idle for %.1fs: stopping", args.stop_after_idle)
                    stop.set()

        threading.Thread(target=watch_idle, daemon=True).start()

    handler = make_handler(Mailbox(args.file), activity, stop, args.once)
    with Client(args.target) as client:
        worker = Worker(
            client, args.worker_id, [ACTION], handler, concurrency=args.concurrency, poll_wait=args.poll_wait
        )
        print(f"{args.worker_id}: performing {ACTION} tasks from {args.target} into {args.file}", flush=True)
        try:
            worker.run(stop)
        except Exception as error:  # noqa: BLE001 - reported, and the exit code says it
            print(f"the worker stopped: {error}", file=sys.stderr)
            return 1
    print(f"{args.worker_id}: stopped after {activity.performed} task(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
