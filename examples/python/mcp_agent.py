"""An example agent that reaches oncely through MCP, with the official Python
``mcp`` SDK (2.x; Python 3.10 or newer): what an agent whose tools are MCP
servers does.

It reads an MCP client configuration, the ``{"mcpServers": {"oncely":
{...}}}`` JSON desktop clients use (the README's snippets), and connects as
such a client would: a ``command`` (with ``args`` and ``env``) is spawned and
spoken to over stdio; a ``url`` (with ``headers``) is streamable HTTP. Then
it follows the rules every agent should: one ``idempotency_key`` per logical
call, generated before the first attempt and sent on every retry; a tool
error marked ``retryable`` retried with backoff and the same key; any other
tool error raised at once. It checks the contract (a retry with the key is
the same task, marked replayed; the same key with other arguments is a
conflict), then waits with ``wait_task`` for a worker (see worker.py) to
perform the task, printing ``result of task <id>: <result>``.

Usage: python mcp_agent.py CONFIG.json [--server NAME] [--timeout SECONDS]
(server ``oncely``, 60 seconds). Install the SDK first: ``pip install
"mcp==2.3.0"``. Exits non-zero if the server does not behave as the
contract says, or if the task did not succeed in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from typing import Any

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

AGENT_ID = "mcp-agent"


class Refused(Exception):
    """A tool error that retrying cannot change."""


def connect(config: dict[str, Any], name: str) -> tuple[Client, httpx2.AsyncClient | None]:
    """The MCP client for server ``name`` of ``config``, and the HTTP client
    it uses (to close), if any."""
    server = config["mcpServers"][name]
    if "command" in server:
        params = StdioServerParameters(
            command=server["command"], args=server.get("args", []), env=server.get("env")
        )
        return Client(params), None
    http = httpx2.AsyncClient(
        headers=server.get("headers", {}), timeout=httpx2.Timeout(30.0, read=120.0)
    )
    return Client(streamable_http_client(server["url"], http_client=http)), http


async def call(client: Client, tool: str, arguments: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Calls ``tool``; retries a retryable tool error with the same arguments
    (so the same key) until ``deadline``; returns the structured answer."""
    attempt = 0
    while True:
        attempt += 1
        result = await client.call_tool(tool, arguments)
        if not result.is_error:
            return result.structured_content
        error = (result.structured_content or {}).get("error", {})
        text = result.content[0].text if result.content else str(error)
        if not error.get("retryable") or time.monotonic() > deadline:
            raise Refused(f"{tool}: {text}")
        ceiling = min(2.0, 0.1 * 2**attempt)
        wait = max(random.uniform(0, ceiling), error.get("retry_after_seconds", 0))
        print(f"{tool}: {text}; retrying in {wait:.2f}s", file=sys.stderr)
        await asyncio.sleep(wait)


async def run(config: dict[str, Any], name: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    client, http = connect(config, name)
    try:
        async with client:
            tools = {tool.name for tool in (await client.list_tools()).tools}
            wanted = {"create_task", "get_task", "wait_task", "cancel_task", "list_tasks"}
            if not wanted <= tools:
                print(f"missing tools: {sorted(wanted - tools)}", file=sys.stderr)
                return 1

            # One key for this logical call, made before the first attempt.
            request = {
                "agent_id": AGENT_ID,
                "action": "send_email",
                "parameters": {"to": "ada@example.com", "subject": "hello from MCP"},
                "idempotency_key": str(uuid.uuid4()),
            }
            first = await call(client, "create_task", request, deadline)
            again = await call(client, "create_task", request, deadline)
            task_id = first["task"]["task_id"]
            print(f"created task {task_id}; replayed={first['replayed']}; key_source={first['key_source']}")
            if first["replayed"] or not again["replayed"] or again["task"]["task_id"] != task_id:
                print("a retry with the key was not the same task, marked replayed", file=sys.stderr)
                return 1
            try:
                other = dict(request, parameters={"to": "someone-else@example.com"})
                await call(client, "create_task", other, deadline)
                print("the key was taken for another request", file=sys.stderr)
                return 1
            except Refused as refused:
                if "conflict" not in str(refused):
                    raise
                print(f"the key with other arguments: {refused}")

            while time.monotonic() < deadline:
                waited = await call(
                    client, "wait_task", {"task_id": task_id, "timeout_seconds": 10}, deadline
                )
                task = waited["task"]
                if task["finished"]:
                    if task["status"] != "succeeded":
                        print(f"task {task_id} ended {task['status']}: {task.get('error_message')}", file=sys.stderr)
                        return 1
                    print(f"result of task {task_id}: {json.dumps(task['result'], sort_keys=True)}")
                    return 0
            print(f"task {task_id} did not finish within {timeout}s", file=sys.stderr)
            return 1
    finally:
        if http is not None:
            await http.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="an MCP client configuration (JSON with mcpServers)")
    parser.add_argument("--server", default="oncely", help="the server's name in mcpServers")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the result")
    args = parser.parse_args()
    with open(args.config, encoding="utf-8") as file:
        config = json.load(file)
    try:
        return asyncio.run(run(config, args.server, args.timeout))
    except Refused as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
