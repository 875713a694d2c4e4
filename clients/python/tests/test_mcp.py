"""MCP against a live oncely server (see conftest.py), driven by the
official Python MCP SDK (``mcp``), which shares no code with the server's
rmcp. Both transports are tested, each as an agent would use it:

- stdio: an ``oncely mcp`` child, which calls the server over gRPC (the SDK
  starts it, with its arguments and environment given explicitly: the child
  inherits nothing);
- streamable HTTP: the server's own ``/mcp`` (``MCP_ADDR``), through an
  ``httpx2`` client that carries the headers (the Bearer key, an
  ``Idempotency-Key``).

Both ways of connecting are used: ``mcp.Client``'s default (``mode="auto"``,
which probes ``server/discover`` and speaks 2026-07-28 per request), and the
legacy ``ClientSession`` + ``initialize`` session (2025-11-25).

The SDK checks every successful tool result against the tool's output
schema, so each call that succeeds also checks the answer's shape. Each test
uses agent ids and actions of its own, so that it sees only its own tasks on
the shared server. The SDK needs Python 3.10 or newer: on older Pythons
(which the client package still supports) the module is skipped, and only
there.
"""

from __future__ import annotations

import sys

import pytest

if sys.version_info < (3, 10):
    pytest.skip("the mcp SDK (PyPI `mcp`) needs Python 3.10 or newer", allow_module_level=True)

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import mcp
from conftest import PATIENCE, KeyedServer, Server
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult, Tool

from oncely import Client as OncelyClient
from oncely import Task, Worker

TRANSPORTS = ("stdio", "http")
MODES = ("legacy", "auto")
"""How a test connects: ``legacy`` is ``ClientSession`` + ``initialize``,
``auto`` is ``mcp.Client``'s default (``server/discover``)."""
PROTOCOL_VERSIONS = {"legacy": "2025-11-25", "auto": "2026-07-28"}
"""The protocol version each way of connecting ends up speaking with
oncely (the newest each offers, with SDK 2.3.0 and rmcp 3.11)."""
TOOLS = {"create_task", "get_task", "wait_task", "cancel_task", "list_tasks"}
STATUSES = {"queued", "running", "succeeded", "failed", "cancelled"}
RUN_TIMEOUT = 240.0
"""The most one test's MCP conversation may take, on a busy machine (a
worker's result is awaited in waits of up to 60 s)."""
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's own default for MCP: SSE streams may stay quiet for long."""


def new_agent() -> str:
    """An agent id no other test uses."""
    return f"agent-{uuid.uuid4()}"


def new_action() -> str:
    """An action no other test uses (so no other test's worker takes it)."""
    return f"action-{uuid.uuid4()}"


def run(conversation: Coroutine[Any, Any, Any]) -> Any:
    """Runs an async conversation to its end in a fresh event loop (no
    pytest plugin), failing it after :data:`RUN_TIMEOUT` rather than hanging."""
    return asyncio.run(asyncio.wait_for(conversation, RUN_TIMEOUT))


@dataclass
class Refusal:
    """A tool error: the result's text, and the facts its structured content
    repeats for programs."""

    text: str
    reason: str
    code: str
    retryable: bool
    error: dict[str, Any]


class Tools:
    """The tools of one MCP connection, with the checks every answer must
    pass: :meth:`ok` for a call that must succeed, :meth:`refused` for one
    that must be a tool error (``isError``, never a JSON-RPC error)."""

    def __init__(self, session: mcp.Client | ClientSession, protocol_version: str) -> None:
        self.session = session
        self.protocol_version = protocol_version

    async def list(self) -> dict[str, Tool]:
        tools = (await self.session.list_tools()).tools
        return {tool.name: tool for tool in tools}

    async def call(self, tool: str, **arguments: Any) -> CallToolResult:
        return await self.session.call_tool(tool, arguments)

    async def ok(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """The structured answer of a call that succeeded; its text content
        is the same JSON, for clients that read only text."""
        result = await self.call(tool, **arguments)
        assert not result.is_error, f"{tool}({arguments}) failed: {texts(result)}"
        assert isinstance(result.structured_content, dict), result
        assert [json.loads(text) for text in texts(result)] == [result.structured_content]
        return result.structured_content

    async def refused(self, tool: str, **arguments: Any) -> Refusal:
        """The tool error a call was answered with."""
        result = await self.call(tool, **arguments)
        assert result.is_error, f"{tool}({arguments}) was not refused: {result.structured_content}"
        [text] = texts(result)
        assert isinstance(result.structured_content, dict), result
        error = result.structured_content["error"]
        assert error["message"] == text
        assert isinstance(error["retryable"], bool)
        return Refusal(text, error["reason"], error["code"], error["retryable"], error)

    async def create(self, agent_id: str, action: str, **arguments: Any) -> dict[str, Any]:
        """``create_task`` that must succeed: its answer."""
        return await self.ok("create_task", agent_id=agent_id, action=action, **arguments)


def texts(result: CallToolResult) -> list[str]:
    """The text contents of a tool result (oncely answers only text)."""
    assert all(content.type == "text" for content in result.content), result.content
    return [content.text for content in result.content]  # type: ignore[union-attr]


@dataclass
class Endpoint:
    """How a test reaches a server's MCP tools, as one caller: over
    ``transport`` (``stdio`` or ``http``), with ``api_key`` (an agent key,
    for a server with keys) and, over HTTP, extra request ``headers``."""

    transport: str
    server: Server
    binary: Path
    log: Path
    """Where the ``oncely mcp`` children write their log (standard error)."""
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def stdio_parameters(self) -> StdioServerParameters:
        """How the SDK starts ``oncely mcp`` for this caller."""
        env = {} if self.api_key is None else {"ONCELY_API_KEY": self.api_key}
        return StdioServerParameters(
            command=str(self.binary), args=["mcp", "--server", f"http://{self.server.address}"], env=env
        )

    def http_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return "(nothing)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    @asynccontextmanager
    async def connect(self, mode: str = "auto") -> AsyncIterator[Tools]:
        """An MCP connection, ``mode`` ``legacy`` or ``auto`` (see
        :data:`MODES`); closed (the stdio child ended) on leaving."""
        try:
            if self.transport == "stdio":
                with self.log.open("a") as errlog:
                    async with session(stdio_client(self.stdio_parameters(), errlog=errlog), mode) as tools:
                        yield tools
            else:
                assert self.transport == "http", self.transport
                async with httpx2.AsyncClient(headers=self.http_headers(), timeout=HTTP_TIMEOUT) as http:
                    async with session(streamable_http_client(self.server.mcp_url, http_client=http), mode) as tools:
                        yield tools
        except BaseException:
            # Shown with the test's failure.
            if self.transport == "stdio":
                print(f"the log of `oncely mcp`:\n{self.log_tail()}")
            print(f"the server's log:\n{self.server.log_tail()}")
            raise


@asynccontextmanager
async def session(transport: AbstractAsyncContextManager[Any], mode: str) -> AsyncIterator[Tools]:
    """A session of the SDK over ``transport``, connected as ``mode`` says,
    checked to speak the protocol version that way of connecting should
    reach."""
    if mode == "legacy":
        async with transport as (read, write), ClientSession(read, write) as legacy:
            initialized = await legacy.initialize()
            assert initialized.server_info.name == "oncely"
            assert initialized.capabilities.tools is not None
            assert initialized.protocol_version == PROTOCOL_VERSIONS[mode]
            yield Tools(legacy, initialized.protocol_version)
    else:
        assert mode == "auto", mode
        async with mcp.Client(transport) as client:
            assert client.protocol_version == PROTOCOL_VERSIONS[mode]
            assert client.server_capabilities.tools is not None
            yield Tools(client, client.protocol_version)


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def endpoint(transport: str, mcp_server: Server, oncely_binary: Path, tmp_path: Path) -> Endpoint:
    """The shared server's MCP over ``transport``, without a key (the server
    has none)."""
    return Endpoint(transport, mcp_server, oncely_binary, tmp_path / "oncely-mcp.log")


@pytest.fixture
def agent_endpoint(transport: str, keyed_mcp_server: KeyedServer, oncely_binary: Path, tmp_path: Path) -> Endpoint:
    """A keyed server's MCP over ``transport``, as the agent key ``agent-7``
    (which acts for the agent ``agent-7`` only)."""
    return Endpoint(
        transport,
        keyed_mcp_server.server,
        oncely_binary,
        tmp_path / "oncely-mcp.log",
        api_key=keyed_mcp_server.tokens["agent-7"],
    )


def check_task(task: dict[str, Any], agent_id: str, action: str, parameters: dict[str, Any], status: str) -> None:
    """Checks what every task answer says of the task."""
    assert status in STATUSES
    assert (task["agent_id"], task["action"], task["parameters"], task["status"]) == (
        agent_id,
        action,
        parameters,
        status,
    )
    assert uuid.UUID(task["task_id"])
    assert task["finished"] == (status in {"succeeded", "failed", "cancelled"})
    assert task["create_time"].endswith("Z") and task["update_time"] >= task["create_time"]


# Tools and schemas.


@pytest.mark.parametrize("mode", MODES)
def test_the_tools_are_listed_with_their_annotations_and_schemas(endpoint: Endpoint, mode: str) -> None:
    async def conversation() -> dict[str, Tool]:
        async with endpoint.connect(mode) as tools:
            return await tools.list()

    tools = run(conversation())
    assert set(tools) == TOOLS
    hints = {
        name: (tool.annotations.read_only_hint, tool.annotations.destructive_hint, tool.annotations.idempotent_hint)
        for name, tool in tools.items()
        if tool.annotations is not None
    }
    assert hints == {
        # A new key is a new task: not idempotent by hint, though safe to
        # retry with its key (the description says so).
        "create_task": (False, False, False),
        "get_task": (True, False, True),
        "wait_task": (True, False, True),
        "list_tasks": (True, False, True),
        "cancel_task": (False, True, True),
    }
    assert "idempotency_key" in (tools["create_task"].description or "")

    def required(name: str) -> set[str]:
        schema = tools[name].input_schema
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        return set(schema.get("required", []))

    assert required("create_task") == {"agent_id", "action"}
    create = tools["create_task"].input_schema["properties"]
    assert create["parameters"]["type"] == "object"
    assert "string" in create["idempotency_key"]["type"]
    assert required("get_task") == required("cancel_task") == {"task_id"}
    assert required("wait_task") == {"task_id", "timeout_seconds"}
    timeout = tools["wait_task"].input_schema["properties"]["timeout_seconds"]
    assert (timeout["type"], timeout["minimum"], timeout["maximum"]) == ("integer", 0, 60)
    assert required("list_tasks") == {"agent_id"}
    # Every answer is an object with a schema (which the SDK checks results
    # against).
    for tool in tools.values():
        assert tool.output_schema is not None and tool.output_schema["type"] == "object", tool.name
    # replayed and key_source are in every create_task answer, but not in
    # the result an MCP task handle gives, which the same schema describes.
    create = tools["create_task"].output_schema
    assert create["required"] == ["task"]
    assert {"replayed", "key_source", "idempotency_key"} <= set(create["properties"])


# Idempotency.


@pytest.mark.parametrize("mode", MODES)
def test_one_key_is_one_task_and_its_retry_is_replayed(endpoint: Endpoint, mode: str) -> None:
    agent, action, key = new_agent(), new_action(), str(uuid.uuid4())
    arguments = {"parameters": {"to": "ada@example.com", "n": 1}, "idempotency_key": key}

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with endpoint.connect(mode) as tools:
            first = await tools.create(agent, action, **arguments)
            again = await tools.create(agent, action, **arguments)
            got = await tools.ok("get_task", task_id=first["task"]["task_id"])
        # A retry on a new connection (the agent restarted, say).
        async with endpoint.connect(mode) as tools:
            retried = await tools.create(agent, action, **arguments)
            listed = await tools.ok("list_tasks", agent_id=agent)
        return first, again, got, retried, listed

    first, again, got, retried, listed = run(conversation())
    check_task(first["task"], agent, action, arguments["parameters"], "queued")
    assert first["task"]["attempt"] == 0 and "result" not in first["task"]
    assert (first["replayed"], first["key_source"], first["idempotency_key"]) == (False, "argument", key)
    for replay in (again, retried):
        assert (replay["replayed"], replay["key_source"], replay["idempotency_key"]) == (True, "argument", key)
        assert replay["task"] == first["task"]
    assert got == {"task": first["task"]}
    assert [task["task_id"] for task in listed["tasks"]] == [first["task"]["task_id"]]
    assert "next_page_token" not in listed


def test_a_key_reused_with_other_arguments_is_a_conflict(endpoint: Endpoint) -> None:
    agent, action, key = new_agent(), new_action(), str(uuid.uuid4())

    async def conversation() -> tuple[Any, ...]:
        async with endpoint.connect() as tools:
            first = await tools.create(agent, action, parameters={"n": 1}, idempotency_key=key)
            other_parameters = await tools.refused(
                "create_task", agent_id=agent, action=action, parameters={"n": 2}, idempotency_key=key
            )
            other_action = await tools.refused(
                "create_task", agent_id=agent, action=new_action(), parameters={"n": 1}, idempotency_key=key
            )
            # The first request's exact arguments are still its retry.
            retried = await tools.create(agent, action, parameters={"n": 1}, idempotency_key=key)
            listed = await tools.ok("list_tasks", agent_id=agent)
        return first, other_parameters, other_action, retried, listed

    first, other_parameters, other_action, retried, listed = run(conversation())
    for conflict in (other_parameters, other_action):
        assert conflict.text.startswith("conflict:"), conflict.text
        assert "idempotency_key" in conflict.text
        assert (conflict.reason, conflict.code, conflict.retryable) == (
            "IDEMPOTENCY_KEY_REUSED",
            "FAILED_PRECONDITION",
            False,
        )
    assert retried["replayed"] and retried["task"] == first["task"]
    assert [task["task_id"] for task in listed["tasks"]] == [first["task"]["task_id"]]


def test_without_a_key_a_repeated_create_is_replayed_by_fingerprint(endpoint: Endpoint) -> None:
    agent, action = new_agent(), new_action()

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with endpoint.connect() as tools:
            first = await tools.create(agent, action, parameters={"to": "ada@example.com"})
            other = await tools.create(agent, action, parameters={"to": "bob@example.com"})
        async with endpoint.connect("legacy") as tools:
            repeated = await tools.create(agent, action, parameters={"to": "ada@example.com"})
            listed = await tools.ok("list_tasks", agent_id=agent)
        return first, other, repeated, listed

    first, other, repeated, listed = run(conversation())
    assert (first["replayed"], first["key_source"]) == (False, "fingerprint")
    assert "idempotency_key" not in first
    # Other arguments are another request.
    assert (other["replayed"], other["key_source"]) == (False, "fingerprint")
    assert other["task"]["task_id"] != first["task"]["task_id"]
    # The same arguments within the dedup window are a retry.
    assert (repeated["replayed"], repeated["key_source"]) == (True, "fingerprint")
    assert "idempotency_key" not in repeated
    assert repeated["task"] == first["task"]
    assert {task["task_id"] for task in listed["tasks"]} == {first["task"]["task_id"], other["task"]["task_id"]}


def test_the_idempotency_key_header_keys_the_creates_of_its_requests(mcp_server: Server, oncely_binary: Path) -> None:
    """Over HTTP, an ``Idempotency-Key`` header on the POST keys a create
    that names no key of its own (the argument wins over the header)."""
    agent, action, key = new_agent(), new_action(), str(uuid.uuid4())

    def endpoint(header: str) -> Endpoint:
        return Endpoint("http", mcp_server, oncely_binary, Path("/dev/null"), headers={"Idempotency-Key": header})

    async def conversation() -> tuple[Any, ...]:
        async with endpoint(key).connect() as tools:
            first = await tools.create(agent, action, parameters={"n": 1})
            again = await tools.create(agent, action, parameters={"n": 1})
            conflict = await tools.refused("create_task", agent_id=agent, action=action, parameters={"n": 2})
            argument = str(uuid.uuid4())
            by_argument = await tools.create(agent, action, parameters={"n": 2}, idempotency_key=argument)
        # The header written as a structured-field string is the same key.
        async with endpoint(f'"{key}"').connect("legacy") as tools:
            quoted = await tools.create(agent, action, parameters={"n": 1})
        return first, again, conflict, argument, by_argument, quoted

    first, again, conflict, argument, by_argument, quoted = run(conversation())
    assert (first["replayed"], first["key_source"], first["idempotency_key"]) == (False, "transport", key)
    for replay in (again, quoted):
        assert (replay["replayed"], replay["key_source"], replay["idempotency_key"]) == (True, "transport", key)
        assert replay["task"] == first["task"]
    assert conflict.text.startswith("conflict:") and "Idempotency-Key header" in conflict.text
    assert conflict.reason == "IDEMPOTENCY_KEY_REUSED"
    assert (by_argument["replayed"], by_argument["key_source"], by_argument["idempotency_key"]) == (
        False,
        "argument",
        argument,
    )
    assert by_argument["task"]["task_id"] != first["task"]["task_id"]


def test_both_transports_keep_one_idempotency_contract(
    keyed_mcp_server: KeyedServer, oncely_binary: Path, tmp_path: Path
) -> None:
    """A create retried over the other transport, as the same agent key, is
    the same request: by its key, and by its fingerprint without one."""
    token = keyed_mcp_server.tokens["agent-7"]
    log = tmp_path / "oncely-mcp.log"
    stdio = Endpoint("stdio", keyed_mcp_server.server, oncely_binary, log, api_key=token)
    http = Endpoint("http", keyed_mcp_server.server, oncely_binary, log, api_key=token)
    action, key = new_action(), str(uuid.uuid4())

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with stdio.connect() as over_stdio, http.connect("legacy") as over_http:
            keyed = await over_stdio.create("agent-7", action, parameters={"n": 1}, idempotency_key=key)
            keyed_again = await over_http.create("agent-7", action, parameters={"n": 1}, idempotency_key=key)
            printed = await over_http.create("agent-7", action, parameters={"n": 2})
            printed_again = await over_stdio.create("agent-7", action, parameters={"n": 2})
        return keyed, keyed_again, printed, printed_again

    keyed, keyed_again, printed, printed_again = run(conversation())
    assert (keyed["replayed"], keyed_again["replayed"]) == (False, True)
    assert keyed_again["task"] == keyed["task"]
    assert (printed["replayed"], printed_again["replayed"]) == (False, True)
    assert printed["key_source"] == printed_again["key_source"] == "fingerprint"
    assert printed_again["task"] == printed["task"]
    assert printed["task"]["task_id"] != keyed["task"]["task_id"]


# Arguments.


def test_invalid_arguments_are_tool_errors_naming_the_argument(endpoint: Endpoint) -> None:
    agent = new_agent()
    task_id = str(uuid.uuid4())
    calls: list[tuple[str, dict[str, Any], str]] = [
        ("create_task", {"action": "send_email"}, "missing field `agent_id`"),
        ("create_task", {"agent_id": agent}, "missing field `action`"),
        ("create_task", {"agent_id": agent, "action": "a", "parameters": [1, 2]}, "invalid argument parameters"),
        ("create_task", {"agent_id": agent, "action": "a", "parameters": "x"}, "invalid argument parameters"),
        ("create_task", {"agent_id": agent, "action": "a", "priority": 1}, "unknown field `priority`"),
        ("create_task", {"agent_id": 7, "action": "a"}, "invalid argument agent_id"),
        ("get_task", {}, "missing field `task_id`"),
        ("cancel_task", {"task_id": 1}, "invalid argument task_id"),
        ("wait_task", {"task_id": task_id}, "missing field `timeout_seconds`"),
        ("wait_task", {"task_id": task_id, "timeout_seconds": -1}, "invalid argument timeout_seconds"),
        ("wait_task", {"task_id": task_id, "timeout_seconds": 61}, "invalid argument timeout_seconds"),
        ("list_tasks", {"agent_id": agent, "page_size": "ten"}, "invalid argument page_size"),
    ]

    async def conversation() -> tuple[list[Refusal], dict[str, Any]]:
        async with endpoint.connect() as tools:
            refusals = [await tools.refused(tool, **arguments) for tool, arguments, _ in calls]
            listed = await tools.ok("list_tasks", agent_id=agent)
        return refusals, listed

    refusals, listed = run(conversation())
    for (tool, arguments, names), refusal in zip(calls, refusals):
        assert names in refusal.text, (tool, arguments, refusal.text)
        assert f"for {tool}" in refusal.text, refusal.text
        assert (refusal.reason, refusal.code, refusal.retryable) == ("INVALID_ARGUMENTS", "INVALID_ARGUMENT", False)
    assert refusals[2].text.startswith("invalid argument parameters for create_task: "), refusals[2].text
    # Nothing was created.
    assert listed == {"tasks": []}


# Waiting, cancelling, listing.


def test_wait_task_returns_the_result_a_worker_returned(endpoint: Endpoint) -> None:
    agent, action = new_agent(), new_action()
    performed: list[Task] = []

    def handler(task: Task) -> dict[str, Any]:
        performed.append(task)
        return {"sent_to": task.parameters["to"], "message_id": f"m-{task.task_id}"}

    async def conversation() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        async with endpoint.connect() as tools:
            created = await tools.create(agent, action, parameters={"to": "ada@example.com"})
            waits = []
            # Each wait returns when the task finishes, or after its timeout
            # with the task unfinished: wait again, on a busy machine.
            deadline = time.monotonic() + 3 * PATIENCE
            while not waits or not waits[-1]["task"]["finished"]:
                assert time.monotonic() < deadline, f"the task did not finish: {waits[-1]}"
                waits.append(await tools.ok("wait_task", task_id=created["task"]["task_id"], timeout_seconds=60))
            got = await tools.ok("get_task", task_id=created["task"]["task_id"])
        return created, waits, got

    with OncelyClient(endpoint.server.address) as client:
        worker = Worker(client, "mcp-test-worker", [action], handler, lease_duration=60, poll_wait=1)
        stop = threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,))
        thread.start()
        try:
            created, waits, got = run(conversation())
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive(), "the worker did not stop"

    task_id = created["task"]["task_id"]
    done = waits[-1]["task"]
    check_task(done, agent, action, {"to": "ada@example.com"}, "succeeded")
    assert done["task_id"] == task_id and done["attempt"] == 1
    assert done["result"] == {"sent_to": "ada@example.com", "message_id": f"m-{task_id}"}
    assert "error_message" not in done
    assert got == {"task": done}
    assert [task.task_id for task in performed] == [task_id]


def test_a_task_no_worker_takes_is_cancelled(endpoint: Endpoint) -> None:
    agent, action = new_agent(), new_action()

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with endpoint.connect() as tools:
            created = await tools.create(agent, action, parameters={"amount": 5})
            task_id = created["task"]["task_id"]
            waited = await tools.ok("wait_task", task_id=task_id, timeout_seconds=0)
            cancelled = await tools.ok("cancel_task", task_id=task_id)
            again = await tools.ok("cancel_task", task_id=task_id)
            got = await tools.ok("get_task", task_id=task_id)
            waited_after = await tools.ok("wait_task", task_id=task_id, timeout_seconds=60)
        return created, waited, cancelled, again, got, waited_after

    created, waited, cancelled, again, got, waited_after = run(conversation())
    check_task(waited["task"], agent, action, {"amount": 5}, "queued")
    check_task(cancelled["task"], agent, action, {"amount": 5}, "cancelled")
    assert cancelled["task"]["task_id"] == created["task"]["task_id"]
    assert cancelled["task"]["attempt"] == 0 and "result" not in cancelled["task"]
    # Cancelling again changes nothing; a wait answers at once.
    assert again == got == waited_after == cancelled


def test_list_tasks_pages_in_creation_order(endpoint: Endpoint) -> None:
    """Oldest first, as ListTasks over gRPC (test_client.py)."""
    agent, action = new_agent(), new_action()

    async def conversation() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        async with endpoint.connect("legacy") as tools:
            ids = [
                (await tools.create(agent, action, parameters={"n": n}, idempotency_key=str(uuid.uuid4())))["task"][
                    "task_id"
                ]
                for n in range(3)
            ]
            first = await tools.ok("list_tasks", agent_id=agent, page_size=2)
            second = await tools.ok("list_tasks", agent_id=agent, page_size=2, page_token=first["next_page_token"])
        return ids, first, second

    ids, first, second = run(conversation())
    assert [task["task_id"] for task in first["tasks"]] == ids[0:2]
    assert [task["task_id"] for task in second["tasks"]] == ids[2:3]
    assert "next_page_token" not in second
    assert {task["status"] for task in first["tasks"] + second["tasks"]} == {"queued"}


# API keys.


def test_an_agent_key_cannot_reach_another_agents_tasks(
    agent_endpoint: Endpoint, keyed_mcp_server: KeyedServer
) -> None:
    """Another agent's task is answered as one that does not exist (as over
    gRPC), and a create for another agent is refused."""
    with OncelyClient(keyed_mcp_server.address, api_key=keyed_mcp_server.tokens["admin"]) as admin:
        theirs = admin.create_task("agent-8", "send_email", {"to": "bob@example.com"}).task

        async def conversation() -> tuple[Any, ...]:
            async with agent_endpoint.connect() as tools:
                mine = await tools.create("agent-7", "send_email", parameters={"to": "ada@example.com"})
                reads = [
                    await tools.refused("get_task", task_id=theirs.task_id),
                    await tools.refused("wait_task", task_id=theirs.task_id, timeout_seconds=1),
                    await tools.refused("cancel_task", task_id=theirs.task_id),
                ]
                listing = await tools.refused("list_tasks", agent_id="agent-8")
                create = await tools.refused("create_task", agent_id="agent-8", action="send_email")
                create_keyed = await tools.refused(
                    "create_task", agent_id="agent-8", action="send_email", idempotency_key=str(uuid.uuid4())
                )
            return mine, reads, listing, create, create_keyed

        mine, reads, listing, create, create_keyed = run(conversation())
        # The cancel did nothing.
        assert admin.get_task(theirs.task_id).status == "QUEUED"
        assert [task.task_id for task in admin.list_tasks("agent-8").tasks] == [theirs.task_id]

    assert (mine["replayed"], mine["task"]["agent_id"]) == (False, "agent-7")
    for refusal in reads:
        assert (refusal.reason, refusal.code, refusal.retryable) == ("NOT_FOUND", "NOT_FOUND", False)
        assert refusal.text == f"no task has id {theirs.task_id}"
    assert (listing.reason, listing.code) == ("NOT_FOUND", "NOT_FOUND")
    assert "agent-8" in listing.text
    for refusal in (create, create_keyed):
        assert (refusal.reason, refusal.code, refusal.retryable) == ("PERMISSION_DENIED", "PERMISSION_DENIED", False)
        assert '"agent-8"' in refusal.text


def test_oncely_mcp_answers_tool_errors_for_keys_that_cannot_call(
    keyed_mcp_server: KeyedServer, oncely_binary: Path, tmp_path: Path
) -> None:
    """Over stdio there is no HTTP status to refuse with: each call comes
    back a tool error saying what is wrong with the key."""
    log = tmp_path / "oncely-mcp.log"

    def endpoint(api_key: str | None) -> Endpoint:
        return Endpoint("stdio", keyed_mcp_server.server, oncely_binary, log, api_key=api_key)

    async def conversation() -> tuple[Refusal, ...]:
        async with endpoint(None).connect() as tools:
            without = await tools.refused("list_tasks", agent_id="agent-7")
        async with endpoint("oncely_" + "A" * 43).connect() as tools:
            unknown = await tools.refused("get_task", task_id=str(uuid.uuid4()))
        async with endpoint(keyed_mcp_server.tokens["mailer"]).connect() as tools:
            worker = await tools.refused("create_task", agent_id="agent-7", action="send_email")
        return without, unknown, worker

    without, unknown, worker = run(conversation())
    assert (without.reason, without.code, without.retryable) == ("API_KEY_INVALID", "UNAUTHENTICATED", False)
    assert "requires an API key" in without.text
    assert (unknown.reason, unknown.code, unknown.retryable) == ("API_KEY_INVALID", "UNAUTHENTICATED", False)
    assert (worker.reason, worker.code) == ("PERMISSION_DENIED", "PERMISSION_DENIED")


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "test", "version": "1"}},
}


def post(url: str, headers: dict[str, str], body: dict[str, Any] = INITIALIZE) -> tuple[int, Any, bytes]:
    """POSTs a JSON-RPC message to ``url`` with the standard library alone;
    the status, headers and body of the answer."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **headers},
    )
    try:
        with urllib.request.urlopen(request, timeout=PATIENCE) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def json_rpc_error(body: bytes) -> dict[str, Any]:
    """The error of a JSON-RPC error answer (id null: no request was read)."""
    answer = json.loads(body)
    assert (answer["jsonrpc"], answer["id"]) == ("2.0", None), answer
    assert answer["error"]["code"] == -32001
    return dict(answer["error"])


def test_http_without_a_valid_agent_key_is_refused_before_any_json_rpc(keyed_mcp_server: KeyedServer) -> None:
    url = keyed_mcp_server.server.mcp_url

    def bearer(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keyed_mcp_server.tokens[name]}"}

    for headers in ({}, {"Authorization": "Bearer oncely_" + "A" * 43}, {"Authorization": "Basic YWRhOnB3"}):
        status, answer_headers, body = post(url, headers)
        assert status == 401, (headers, body)
        assert answer_headers["WWW-Authenticate"].startswith("Bearer"), answer_headers
        assert answer_headers["Content-Type"] == "application/json"
        assert "key" in json_rpc_error(body)["message"]

    for name, role in (("mailer", "worker"), ("admin", "admin")):
        status, answer_headers, body = post(url, bearer(name))
        assert status == 403, (name, body)
        assert "WWW-Authenticate" not in answer_headers
        message = json_rpc_error(body)["message"]
        assert f'"{name}"' in message and "agent keys" in message, message

    # The agent key is let in.
    status, answer_headers, body = post(url, bearer("agent-7"))
    assert status == 200, body
    assert answer_headers["Mcp-Session-Id"]
    assert b'"protocolVersion":"2025-11-25"' in body


def test_the_sdk_shows_the_servers_refusal_of_a_missing_key(keyed_mcp_server: KeyedServer, oncely_binary: Path) -> None:
    """The 401's JSON-RPC body reaches the MCP client as an error naming the
    problem (not a bare HTTP failure)."""
    endpoint = Endpoint("http", keyed_mcp_server.server, oncely_binary, Path("/dev/null"))

    async def conversation() -> None:
        async with endpoint.connect():
            pytest.fail("connected without a key")

    with pytest.raises(BaseException) as raised:  # noqa: PT011 - the SDK wraps it in exception groups
        run(conversation())
    errors = [error for error in leaves(raised.value) if isinstance(error, mcp.MCPError)]
    assert [error.error.code for error in errors] == [-32001], raised.value
    assert "requires an API key" in errors[0].error.message


def leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups, or the exception."""
    inner = getattr(error, "exceptions", None)
    if inner is None:
        yield error
        return
    for each in inner:
        yield from leaves(each)


def test_http_without_keys_lets_any_caller_in_but_not_other_origins(mcp_server: Server) -> None:
    """A server without keys serves MCP to any local caller; a browser page
    of another origin is refused all the same."""
    status, _, body = post(mcp_server.mcp_url, {})
    assert status == 200, body

    status, _, body = post(mcp_server.mcp_url, {"Origin": "http://evil.example"})
    assert status == 403, body
    assert "origin" in json_rpc_error(body)["message"]
