"""MCP over TLS, driven by the official Python MCP SDK (``mcp``), as in
test_mcp.py, against servers with a certificate of a test CA (made with
openssl, as in test_tls.py):

- streamable HTTP: the server's ``/mcp`` is served over the same TLS as its
  gRPC port (``TLS_CERT``, ``TLS_KEY``, and ``TLS_CLIENT_CA`` for mTLS),
  reached with an ``httpx2`` client whose ``verify`` is an SSL context that
  trusts the test CA (and holds a client certificate, for mTLS). Plaintext
  and clients that do not trust the CA are refused; so are clients without
  a certificate of that CA when the server asks for one.
- stdio: ``oncely mcp --server https://...`` calls the server's gRPC port
  over TLS, trusting ``--ca-file`` (``ONCELY_CA_FILE``) and presenting
  ``--client-cert``/``--client-key`` (``ONCELY_CLIENT_CERT``,
  ``ONCELY_CLIENT_KEY``) to an mTLS server. The SDK starts it with its
  arguments and environment given explicitly: the child inherits nothing.

The SDK needs Python 3.10 or newer: on older Pythons the module is skipped,
and only there (test_tls.py's other tests still run).
"""

from __future__ import annotations

import sys

import pytest

if sys.version_info < (3, 10):
    pytest.skip("the mcp SDK (PyPI `mcp`) needs Python 3.10 or newer", allow_module_level=True)

import json
import socket
import ssl
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
from conftest import LOG_FILTER, PATIENCE, Server, StartServer, eventually
from mcp import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from test_mcp import HTTP_TIMEOUT, TOOLS, Tools, leaves, new_action, new_agent, run, session
from test_tls import make_certificates

from oncely import Client as OncelyClient

HOW = ("flags", "environment")
"""How ``oncely mcp`` is given its TLS files: flags, or the environment
variables a desktop agent's configuration would set."""


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """A CA, a server certificate and a client certificate it signed (see
    :func:`test_tls.make_certificates`), in a folder of their own."""
    folder = tmp_path / "certificates"
    folder.mkdir()
    return make_certificates(folder)


def tls_settings(certificates: Path) -> dict[str, str]:
    return {"TLS_CERT": str(certificates / "server.pem"), "TLS_KEY": str(certificates / "server.key")}


def client_identity(certificates: Path) -> tuple[Path, Path]:
    return certificates / "client.pem", certificates / "client.key"


@pytest.fixture
def tls_server(start_server: StartServer, certificates: Path) -> Server:
    """A server over TLS that serves MCP too, on its own port, over the same
    TLS."""
    return start_server(tls_ca=certificates / "ca.pem", mcp=True, **tls_settings(certificates))


@pytest.fixture
def mtls_server(start_server: StartServer, certificates: Path) -> Server:
    """A server over TLS that asks every client, on both ports, for a
    certificate the test CA signed (``TLS_CLIENT_CA``). It logs why each
    handshake it refused failed (see :func:`handshake_failures`)."""
    return start_server(
        tls_ca=certificates / "ca.pem",
        tls_identity=client_identity(certificates),
        mcp=True,
        TLS_CLIENT_CA=str(certificates / "ca.pem"),
        RUST_LOG=f"{LOG_FILTER},{HANDSHAKE_LOG}=debug",
        **tls_settings(certificates),
    )


HANDSHAKE_LOG = "oncely::startup::tls"
"""Where the server logs (at debug level) each TLS handshake that failed."""
HANDSHAKE_FAILED = "a TLS handshake failed"


def handshake_failures(server: Server) -> list[str]:
    """Why the handshakes ``server`` refused failed, as its log says (the
    ``error`` of its debug events in :data:`HANDSHAKE_LOG`)."""
    failures = []
    for line in server.log.read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("message") == HANDSHAKE_FAILED:
            failures.append(str(event.get("error")))
    return failures


def refused_for(server: Server, cause: str) -> None:
    """Waits for ``server`` to log a handshake refused for ``cause`` (the
    log is written beside the client's failure, not before it)."""
    eventually(lambda: any(cause in failure for failure in handshake_failures(server)), f"a handshake refused: {cause}")


def trusting(certificates: Path, identity: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """An SSL context that trusts the test CA (only), with ``identity``'s
    client certificate if given."""
    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    if identity is not None:
        context.load_cert_chain(*identity)
    return context


@asynccontextmanager
async def over_https(server: Server, verify: ssl.SSLContext, mode: str = "auto") -> AsyncIterator[Tools]:
    """An MCP session over streamable HTTP to the server's ``/mcp``, with an
    httpx2 client that verifies with ``verify``."""
    try:
        async with httpx2.AsyncClient(verify=verify, timeout=HTTP_TIMEOUT) as http:
            async with session(streamable_http_client(server.mcp_url, http_client=http), mode) as tools:
                yield tools
    except BaseException:
        # Shown with the test's failure.
        print(f"the server's log:\n{server.log_tail()}")
        raise


def refused_connection(server: Server, verify: ssl.SSLContext, url: str | None = None) -> list[BaseException]:
    """Connects as :func:`over_https` does, expecting the connection to be
    refused; the errors it failed with (out of the SDK's exception groups)."""

    async def conversation() -> None:
        async with httpx2.AsyncClient(verify=verify, timeout=HTTP_TIMEOUT) as http:
            async with session(streamable_http_client(url or server.mcp_url, http_client=http), "auto") as tools:
                pytest.fail(f"connected, and listed {sorted(await tools.list())}")

    with pytest.raises(BaseException) as raised:  # noqa: PT011 - the SDK wraps it in exception groups
        run(conversation())
    return list(leaves(raised.value))


def bridge(server: Server, binary: Path, how: str, files: dict[str, Path], *more: str) -> StdioServerParameters:
    """How the SDK starts ``oncely mcp`` calling ``server`` over
    ``https://``, given ``files`` (``ca``, ``cert``, ``key``) as flags or as
    environment variables (``how``)."""
    flags = {"ca": "--ca-file", "cert": "--client-cert", "key": "--client-key"}
    variables = {"ca": "ONCELY_CA_FILE", "cert": "ONCELY_CLIENT_CERT", "key": "ONCELY_CLIENT_KEY"}
    args = ["mcp", "--server", f"https://{server.address}", *more]
    env: dict[str, str] = {}
    for name, path in files.items():
        if how == "flags":
            args += [flags[name], str(path)]
        else:
            assert how == "environment", how
            env[variables[name]] = str(path)
    return StdioServerParameters(command=str(binary), args=args, env=env)


@asynccontextmanager
async def over_stdio(server: Server, parameters: StdioServerParameters, log: Path) -> AsyncIterator[Tools]:
    """An MCP session with an ``oncely mcp`` child started with
    ``parameters``, which writes its log to ``log``."""
    try:
        with log.open("a") as errlog:
            async with session(stdio_client(parameters, errlog=errlog), "auto") as tools:
                yield tools
    except BaseException:
        print(f"the log of `oncely mcp`:\n{log.read_text(errors='replace') if log.exists() else '(nothing)'}")
        print(f"the server's log:\n{server.log_tail()}")
        raise


async def create_twice(tools: Tools, agent: str, action: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Creates a task with a new idempotency_key, then retries the create
    with the same key and arguments; both answers."""
    key = str(uuid.uuid4())
    first = await tools.create(agent, action, parameters={"to": "ada@example.com"}, idempotency_key=key)
    again = await tools.create(agent, action, parameters={"to": "ada@example.com"}, idempotency_key=key)
    return first, again


def check_replayed(first: dict[str, Any], again: dict[str, Any], agent: str) -> None:
    assert (first["replayed"], first["key_source"]) == (False, "argument")
    assert (again["replayed"], again["key_source"]) == (True, "argument")
    assert again["idempotency_key"] == first["idempotency_key"]
    assert again["task"]["task_id"] == first["task"]["task_id"]
    assert again["task"] == first["task"]
    assert (first["task"]["agent_id"], first["task"]["status"]) == (agent, "queued")


def tasks_over_grpc(server: Server, certificates: Path, agent: str) -> list[str]:
    """The ids of ``agent``'s tasks, asked over gRPC with TLS (no client
    certificate: not for an mTLS server)."""
    with OncelyClient(f"https://{server.address}", tls_ca=certificates / "ca.pem") as client:
        return [task.task_id for task in client.list_tasks(agent).tasks]


def messages(errors: list[BaseException]) -> str:
    return " | ".join(f"{type(error).__name__}: {error}" for error in errors)


# Streamable HTTP over TLS.


def test_mcp_over_https_lists_the_tools_and_replays_a_keyed_create(tls_server: Server, certificates: Path) -> None:
    assert tls_server.mcp_url.startswith("https://"), tls_server.mcp_url
    agent, action = new_agent(), new_action()
    verify = trusting(certificates)

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with over_https(tls_server, verify) as tools:
            assert set(await tools.list()) == TOOLS
            first, again = await create_twice(tools, agent, action)
        # The legacy session (initialize) over TLS, as another connection.
        async with over_https(tls_server, verify, "legacy") as tools:
            assert set(await tools.list()) == TOOLS
            retried = await tools.create(
                agent, action, parameters={"to": "ada@example.com"}, idempotency_key=first["idempotency_key"]
            )
        return first, again, retried

    first, again, retried = run(conversation())
    check_replayed(first, again, agent)
    assert (retried["replayed"], retried["task"]) == (True, first["task"])
    # One task, the same one gRPC sees.
    assert tasks_over_grpc(tls_server, certificates, agent) == [first["task"]["task_id"]]


def test_the_mcp_port_offers_h2_and_http_1_1_by_alpn(tls_server: Server, certificates: Path) -> None:
    """As the gRPC port does: HTTP/2 first, and HTTP/1.1 for the clients
    that name only it (httpx2 without its h2 extra, as the test above)."""
    host, port = tls_server.mcp_address.rsplit(":", 1)  # type: ignore[union-attr]

    def negotiated(offered: list[str]) -> str | None:
        context = trusting(certificates)
        context.set_alpn_protocols(offered)
        with socket.create_connection((host, int(port)), timeout=PATIENCE) as plain:
            with context.wrap_socket(plain, server_hostname=host) as tls:
                return tls.selected_alpn_protocol()

    assert negotiated(["h2", "http/1.1"]) == "h2"
    assert negotiated(["http/1.1", "h2"]) == "h2"
    assert negotiated(["http/1.1"]) == "http/1.1"


def test_mcp_over_tls_never_answers_plaintext_nor_a_client_that_does_not_trust_the_ca(
    tls_server: Server, certificates: Path
) -> None:
    plaintext_url = tls_server.mcp_url.replace("https://", "http://", 1)
    plaintext = refused_connection(tls_server, trusting(certificates), url=plaintext_url)
    # The server answers a plaintext request with a TLS alert, which is no HTTP.
    assert any(isinstance(error, httpx2.TransportError) for error in plaintext), messages(plaintext)

    # The system's roots only: the test CA is unknown.
    untrusting = refused_connection(tls_server, ssl.create_default_context())
    assert any(isinstance(error, httpx2.ConnectError) for error in untrusting), messages(untrusting)
    assert "CERTIFICATE_VERIFY_FAILED" in messages(untrusting)

    # The listener serves on after both.
    async def listed() -> dict[str, Any]:
        async with over_https(tls_server, trusting(certificates)) as tools:
            return await tools.list()

    assert set(run(listed())) == TOOLS


def test_mcp_over_mtls_serves_only_clients_with_a_certificate_of_the_ca(
    mtls_server: Server, certificates: Path, tmp_path: Path
) -> None:
    agent, action = new_agent(), new_action()

    # The client trusts the server, but has no certificate of its own. With
    # TLS 1.3 its handshake ends before the server checks the client's: the
    # server's alert (certificate required) comes with the first read, or
    # the connection is reset before the alert is read (httpx2's ReadError).
    without = refused_connection(mtls_server, trusting(certificates))
    assert any(isinstance(error, (ssl.SSLError, httpx2.TransportError)) for error in without), messages(without)
    refused_for(mtls_server, "peer sent no certificates")

    # A client certificate, but of another CA (of the same name: its
    # signature is what gives it away).
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    make_certificates(stranger)
    unknown = refused_connection(mtls_server, trusting(certificates, client_identity(stranger)))
    assert any(isinstance(error, (ssl.SSLError, httpx2.TransportError)) for error in unknown), messages(unknown)
    refused_for(mtls_server, "invalid peer certificate")

    async def conversation() -> tuple[dict[str, Any], ...]:
        async with over_https(mtls_server, trusting(certificates, client_identity(certificates))) as tools:
            assert set(await tools.list()) == TOOLS
            first, again = await create_twice(tools, agent, action)
            listed = await tools.ok("list_tasks", agent_id=agent)
        return first, again, listed

    first, again, listed = run(conversation())
    check_replayed(first, again, agent)
    assert [task["task_id"] for task in listed["tasks"]] == [first["task"]["task_id"]]


# stdio: `oncely mcp` calling a TLS server over gRPC.


@pytest.mark.parametrize("how", HOW)
def test_oncely_mcp_calls_a_tls_server_trusting_its_ca_file(
    how: str, tls_server: Server, certificates: Path, oncely_binary: Path, tmp_path: Path
) -> None:
    agent, action = new_agent(), new_action()
    log = tmp_path / "oncely-mcp.log"
    trusted = bridge(tls_server, oncely_binary, how, {"ca": certificates / "ca.pem"})
    # The system's roots only; one attempt, since it cannot succeed.
    untrusting = bridge(tls_server, oncely_binary, how, {}, "--attempts", "1")

    async def conversation() -> tuple[Any, ...]:
        async with over_stdio(tls_server, trusted, log) as tools:
            assert set(await tools.list()) == TOOLS
            first, again = await create_twice(tools, agent, action)
        async with over_stdio(tls_server, untrusting, log) as tools:
            refused = await tools.refused("create_task", agent_id=agent, action=new_action())
        return first, again, refused

    first, again, refused = run(conversation())
    check_replayed(first, again, agent)
    assert (refused.code, refused.retryable) == ("UNAVAILABLE", True), refused
    assert "UnknownIssuer" in refused.text, refused.text
    assert tasks_over_grpc(tls_server, certificates, agent) == [first["task"]["task_id"]]


@pytest.mark.parametrize("how", HOW)
def test_oncely_mcp_calls_an_mtls_server_with_its_client_certificate(
    how: str, mtls_server: Server, certificates: Path, oncely_binary: Path, tmp_path: Path
) -> None:
    agent, action = new_agent(), new_action()
    log = tmp_path / "oncely-mcp.log"
    cert, key = client_identity(certificates)
    identified = bridge(mtls_server, oncely_binary, how, {"ca": certificates / "ca.pem", "cert": cert, "key": key})
    # No certificate; one attempt, since it cannot succeed.
    anonymous = bridge(mtls_server, oncely_binary, how, {"ca": certificates / "ca.pem"}, "--attempts", "1")

    async def conversation() -> tuple[Any, ...]:
        async with over_stdio(mtls_server, anonymous, log) as tools:
            refused = await tools.refused("create_task", agent_id=agent, action=action)
        async with over_stdio(mtls_server, identified, log) as tools:
            first, again = await create_twice(tools, agent, action)
            listed = await tools.ok("list_tasks", agent_id=agent)
        return refused, first, again, listed

    refused, first, again, listed = run(conversation())
    refused_for(mtls_server, "peer sent no certificates")
    # Refused before reaching the service: nothing was created then.
    assert refused.text, refused
    check_replayed(first, again, agent)
    assert [task["task_id"] for task in listed["tasks"]] == [first["task"]["task_id"]]
