"""The Python client of oncely: side effects that happen exactly once, for
agents that retry.

    from oncely import Client

    with Client("127.0.0.1:50051") as client:
        created = client.create_task("agent-7", "send_email", {"to": "ada@example.com"})
        print(created.task.task_id, created.replayed)

:meth:`Client.create_task` sends one idempotency key on every attempt of a
call and retries only what may pass next time; see :class:`Client` and
:class:`RetryPolicy` for the rules, :class:`Rejected` and :class:`GaveUp`
for the errors. :meth:`Client.wait_task` waits for a task's result. On a
server with API keys, pass ``api_key=`` or set ``ONCELY_API_KEY``.

Workers lease tasks and complete or fail them with :meth:`Client.lease_tasks`
and the calls after it; :class:`Worker` runs that loop around a handler:

    def send_email(task):
        ...  # the side effect, idempotent by task.task_id
        return {"sent": True}

    oncely.Worker(client, "mailer-1", ["send_email"], send_email).run(stop_event)
"""

from importlib import metadata

from ._auth import API_KEY_ENV
from ._client import Client
from ._errors import GaveUp, OncelyError, Rejected
from ._models import FINISHED_STATUSES, Created, Lease, Task, TaskPage
from ._retry import TRANSIENT_CODES, RetryPolicy, backoff_delay, is_transient, new_idempotency_key
from ._worker import Handler, PermanentError, Worker

__version__ = metadata.version(__name__)
"""The installed version of the package."""

__all__ = [
    "API_KEY_ENV",
    "FINISHED_STATUSES",
    "TRANSIENT_CODES",
    "Client",
    "Created",
    "GaveUp",
    "Handler",
    "Lease",
    "OncelyError",
    "PermanentError",
    "Rejected",
    "RetryPolicy",
    "Task",
    "TaskPage",
    "Worker",
    "__version__",
    "backoff_delay",
    "is_transient",
    "new_idempotency_key",
]
