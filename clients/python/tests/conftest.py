"""Fixtures that run the real oncely server for the tests.

Each server is the binary named by ``ONCELY_BIN`` (default:
``target/debug/oncely`` at the repository root), started with a fresh SQLite
database in a temporary folder, and stopped afterwards. It binds port 0 and
the tests read the address it got from its log, so no port is picked and
released for it to race for. A missing binary fails the tests: they never
pass by skipping.

``keyed_server`` is such a server with API keys, made with the binary's
``keys create`` before it starts. ``ONCELY_API_KEY`` is removed from the
environment of every test, so a key of the shell never leaks in.

A server started with ``mcp=True`` also serves MCP over streamable HTTP
(``MCP_ADDR``, port 0 as well, its address read from the log the same way):
``mcp_server`` is one shared by the tests, ``keyed_mcp_server`` one with the
keys of ``keyed_server``.

The tests run on busy machines: they wait for evidence (:func:`eventually`,
with a generous deadline) rather than sleep, and assert what holds however
the threads and processes are scheduled.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_BINARY = REPO_ROOT / "target" / "debug" / "oncely"
START_TIMEOUT = 60.0
"""How long a server may take to start (a debug build, on a busy machine)."""
PATIENCE = 30.0
"""How long a test waits for evidence of something that normally takes well
under a second."""

SERVING_MESSAGE = "serving tasks.v1.TaskService, tasks.v1.WorkerService and tasks.v1.Admin"
"""The message of the server's info event that names the address it bound
(field ``addr``)."""
MCP_SERVING_MESSAGE = "serving MCP (streamable HTTP) at /mcp"
"""The message of the info event (in ``oncely::startup::mcp``) that names
the address MCP's listener bound (field ``addr``), when ``MCP_ADDR`` is set."""
MCP_PATH = "/mcp"
LOG_FILTER = "warn,oncely::startup=info"
"""The servers' ``RUST_LOG``: warnings, and the start-up events (among them
the ones that name the addresses)."""
ADDRESS_IN_USE = "Address already in use"


def wait_until(condition: Callable[[], Any], timeout: float = PATIENCE, pause: float = 0.02) -> bool:
    """Polls ``condition()`` until it returns something true (then True) or
    ``timeout`` seconds have passed (then False). For threads other than the
    test's own, which must not fail the test themselves."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
    return True


def eventually(condition: Callable[[], Any], what: str, timeout: float = PATIENCE) -> None:
    """Waits until ``condition()`` returns something true; fails the test,
    saying ``what`` was awaited, after ``timeout`` seconds."""
    if not wait_until(condition, timeout):
        pytest.fail(f"waited {timeout}s for {what}")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on when asked. Another
    process may take it at any moment: use it for an address where nothing
    is expected to answer (a test that only sees calls fail there), or to
    start a server on a port known beforehand with ``start_server(port=...)``,
    which waits while the port is in use."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bound_address(log: str, message: str = SERVING_MESSAGE) -> str | None:
    """The address a server's JSON log says it serves on (the ``addr`` of its
    event with ``message``), if it says so yet (a line still being written
    is skipped)."""
    for line in log.splitlines():
        if not line.startswith("{"):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("message") == message:
            return str(event["addr"])
    return None


class Server:
    """One oncely server process, with its own SQLite database.

    It binds ``port``, by default 0 (any free port); :attr:`address` is what
    it bound, read from its log. A given port that is in use is tried again
    until the start deadline. With ``tls_ca``, the server is expected to
    serve TLS (``TLS_CERT``, ``TLS_KEY`` in ``env``) with a certificate that
    CA signed; a server that asks clients for a certificate (mTLS,
    ``TLS_CLIENT_CA``) needs ``tls_identity``, the (certificate, key) PEM
    files it is checked to be serving with. ``env`` may set ``RUST_LOG`` as long as it keeps the info
    events of ``oncely::startup``; the log is always JSON.

    With ``mcp=True`` (or ``MCP_ADDR`` in ``env``) it also serves MCP over
    streamable HTTP, by default on any free port of 127.0.0.1;
    :attr:`mcp_address` is what that listener bound, read from the log, and
    :attr:`mcp_url` the URL of its ``/mcp``. Without, both are None.
    """

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        env: Mapping[str, str],
        *,
        port: int = 0,
        tls_ca: Path | None = None,
        tls_identity: tuple[Path, Path] | None = None,
        mcp: bool = False,
    ) -> None:
        if env.get("LOG_FORMAT", "json") != "json":
            raise ValueError("the tests read the server's address from its JSON log: LOG_FORMAT must be json")
        self.database = workdir / "oncely.db"
        self.log = workdir / "server.log"
        self.tls_ca = tls_ca
        self.tls_identity = tls_identity
        # Only these settings: none leak in from the environment the tests run in.
        environment = {
            "PATH": os.environ.get("PATH", os.defpath),
            "DATABASE_URL": f"sqlite://{self.database}",
            "LISTEN_ADDR": f"127.0.0.1:{port}",
            "LOG_FORMAT": "json",
            "RUST_LOG": LOG_FILTER,
            **({"MCP_ADDR": "127.0.0.1:0"} if mcp else {}),
            **env,
        }
        serves_mcp = bool(environment.get("MCP_ADDR"))
        self.mcp_address: str | None = None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            with self.log.open("wb") as log:
                self.process = subprocess.Popen([str(binary)], env=environment, stdout=log, stderr=subprocess.STDOUT)
            try:
                address = self._wait_for_address(deadline)
                if address is not None:
                    self.address = address
                    if serves_mcp:
                        self.mcp_address = self._wait_for_address(deadline, MCP_SERVING_MESSAGE)
                        if self.mcp_address is None:
                            pytest.fail(
                                f"the oncely server exited with {self.process.returncode} while starting:\n"
                                f"{self.log_tail()}"
                            )
                    self._wait_until_serving(deadline)
                    return
            except BaseException:
                self.stop()
                raise
            # The process exited before serving. A port chosen beforehand
            # may have been taken meanwhile (by anything on this machine):
            # wait for it to be free again.
            if port and ADDRESS_IN_USE in self.log_tail() and time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            pytest.fail(f"the oncely server exited with {self.process.returncode} while starting:\n{self.log_tail()}")

    def _wait_for_address(self, deadline: float, message: str = SERVING_MESSAGE) -> str | None:
        """The address the server's log names (in its event with
        ``message``) once it serves; None when the process exits first."""
        while True:
            address = bound_address(self.log.read_text(errors="replace"), message)
            if address is not None:
                return address
            if self.process.poll() is not None:
                return None
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"the oncely server did not log its address ({message!r}, at info level in"
                    f" oncely::startup) after {START_TIMEOUT}s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    @property
    def mcp_url(self) -> str:
        """The URL of the server's MCP endpoint (streamable HTTP); fails the
        test when the server was started without MCP."""
        if self.mcp_address is None:
            pytest.fail("this server was started without MCP (start it with mcp=True)")
        scheme = "http" if self.tls_ca is None else "https"
        return f"{scheme}://{self.mcp_address}{MCP_PATH}"

    def _wait_until_serving(self, deadline: float) -> None:
        request = health_pb2.HealthCheckRequest(service="tasks.v1.TaskService")
        # Retry the connection quickly while the server starts.
        options = [("grpc.max_reconnect_backoff_ms", 100)]
        if self.tls_ca is None:
            channel = grpc.insecure_channel(self.address, options=options)
        else:
            certificate, key = (None, None) if self.tls_identity is None else self.tls_identity
            credentials = grpc.ssl_channel_credentials(
                root_certificates=self.tls_ca.read_bytes(),
                private_key=None if key is None else key.read_bytes(),
                certificate_chain=None if certificate is None else certificate.read_bytes(),
            )
            channel = grpc.secure_channel(self.address, credentials, options=options)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    pytest.fail(
                        f"the oncely server exited with {self.process.returncode} while starting:\n{self.log_tail()}"
                    )
                try:
                    answer = health.Check(request, timeout=5)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        pytest.fail(f"the oncely server was not SERVING on {self.address} after {START_TIMEOUT}s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


StartServer = Callable[..., Server]


@pytest.fixture(autouse=True)
def no_api_key_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients made without ``api_key=`` send no key, whatever the shell the
    tests run in has set."""
    monkeypatch.delenv("ONCELY_API_KEY", raising=False)


def run_keys(binary: Path, database: Path, *args: str) -> str:
    """Runs ``oncely keys ARGS`` on ``database`` and returns its stdout
    (for ``create``, the token: the single line printed there)."""
    environment = {"PATH": os.environ.get("PATH", os.defpath), "DATABASE_URL": f"sqlite://{database}"}
    done = subprocess.run(
        [str(binary), "keys", *args], env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        pytest.fail(f"`oncely keys {args[0]}` exited with {done.returncode}:\n{done.stderr}")
    return done.stdout


def create_key(binary: Path, database: Path, name: str, role: str, *scope: str) -> str:
    """Creates a key with ``oncely keys create`` (``scope``: more of its
    arguments, such as ``--agent-id``, ``agent-7``) and returns its token."""
    lines = run_keys(binary, database, "create", "--name", name, "--role", role, *scope).splitlines()
    assert len(lines) == 1 and lines[0].startswith("oncely_"), "expected the token alone on stdout"
    return lines[0]


@dataclass
class KeyedServer:
    """A server with API keys; :attr:`tokens` maps each key's name to its
    token."""

    binary: Path
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.server.address

    def create_key(self, name: str, role: str, *scope: str) -> str:
        """Creates a key (see :func:`create_key`) and returns its token; the
        running server knows it after its next key refresh (2 s by
        default)."""
        self.tokens[name] = create_key(self.binary, self.server.database, name, role, *scope)
        return self.tokens[name]

    def revoke_key(self, name: str) -> None:
        """Revokes a key; a running server refuses it after its next key
        refresh (2 s by default)."""
        run_keys(self.binary, self.server.database, "revoke", name)


KEYS: Sequence[tuple[str, str, tuple[str, ...]]] = (
    ("admin", "admin", ()),
    ("agent-7", "agent", ("--agent-id", "agent-7")),
    ("mailer", "worker", ("--action", "send_email")),
    ("doomed-agent", "agent", ("--agent-id", "agent-7")),
    ("doomed-worker", "worker", ("--action", "send_email")),
)
"""The keys of ``keyed_server``: (name, role, scope). The ``doomed-`` ones
are there to be revoked."""


def start_keyed_server(binary: Path, workdir: Path, *, mcp: bool = False) -> KeyedServer:
    """Creates the keys of :data:`KEYS` in a database in ``workdir``, then
    starts a server on it (serving MCP too with ``mcp=True``)."""
    tokens = {name: create_key(binary, workdir / "oncely.db", name, role, *scope) for name, role, scope in KEYS}
    return KeyedServer(binary, Server(binary, workdir, {}, mcp=mcp), tokens)


@pytest.fixture
def keyed_server(oncely_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """A server of the test's own whose database holds the keys of
    :data:`KEYS`, created before it starts, so every call but health needs
    one."""
    running = start_keyed_server(oncely_binary, tmp_path_factory.mktemp("keyed-server"))
    yield running
    running.server.stop()


@pytest.fixture
def keyed_mcp_server(oncely_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """A server like ``keyed_server`` that also serves MCP over streamable
    HTTP (its ``server.mcp_url``), where only agent keys are let in."""
    running = start_keyed_server(oncely_binary, tmp_path_factory.mktemp("keyed-mcp-server"), mcp=True)
    yield running
    running.server.stop()


@pytest.fixture(scope="session")
def oncely_binary() -> Path:
    """The server binary; fails (never skips) when it is not built."""
    binary = Path(os.environ.get("ONCELY_BIN", DEFAULT_BINARY)).resolve()
    if not binary.is_file():
        pytest.fail(
            f"the oncely server binary is not at {binary}: run `cargo build` at the"
            " repository root (or point ONCELY_BIN at a built binary)"
        )
    return binary


@pytest.fixture(scope="session")
def server(oncely_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the default settings, shared by the tests; each test
    uses agent ids of its own."""
    running = Server(oncely_binary, tmp_path_factory.mktemp("server"), {})
    yield running
    running.stop()


@pytest.fixture(scope="session")
def mcp_server(oncely_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the default settings that also serves MCP over
    streamable HTTP (:attr:`Server.mcp_url`), shared by the tests; each
    test uses agent ids and actions of its own."""
    running = Server(oncely_binary, tmp_path_factory.mktemp("mcp-server"), {}, mcp=True)
    yield running
    running.stop()


@pytest.fixture
def start_server(oncely_binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartServer]:
    """Starts servers of the test's own, with extra environment variables,
    optionally on a given port, over TLS (with a client certificate of its
    own for mTLS) and serving MCP (see :class:`Server`): ``start_server(port=..., IN_FLIGHT_WAIT="200ms")``.
    Returns once the server is SERVING; all are stopped after the test."""
    started: list[Server] = []

    def start(
        port: int = 0,
        tls_ca: Path | None = None,
        tls_identity: tuple[Path, Path] | None = None,
        mcp: bool = False,
        **env: str,
    ) -> Server:
        running = Server(
            oncely_binary,
            tmp_path_factory.mktemp("server"),
            env,
            port=port,
            tls_ca=tls_ca,
            tls_identity=tls_identity,
            mcp=mcp,
        )
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@dataclass
class RecordedCall:
    """One attempt of a call, as the client sent it."""

    request: Any
    start: float
    """When it left the client (``time.monotonic()``)."""
    end: float | None = None
    """When its answer (or failure) came back; None while in flight."""
    code: grpc.StatusCode | None = None
    """How it ended; None while in flight."""


class AttemptCounter(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records each call of a channel as it leaves the client and as it
    ends, so a test can count a client's attempts, the waits between them
    and what they asked for. Methods are named without their service
    (``CreateTask``, ``RenewLease``): the names are unique across
    oncely's services."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, list[RecordedCall]] = {}

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        method = client_call_details.method.rsplit("/", 1)[-1]
        call = RecordedCall(request, time.monotonic())
        with self._lock:
            self._calls.setdefault(method, []).append(call)
        outcome = continuation(client_call_details, request)

        def ended(done: Any) -> None:
            with self._lock:
                call.end, call.code = time.monotonic(), done.code()

        outcome.add_done_callback(ended)
        return outcome

    def calls(self, method: str = "CreateTask") -> list[RecordedCall]:
        """The attempts of ``method`` so far, in the order they were sent
        (copies)."""
        with self._lock:
            return [RecordedCall(c.request, c.start, c.end, c.code) for c in self._calls.get(method, [])]

    def starts(self, method: str = "CreateTask") -> list[float]:
        """When each attempt of ``method`` started."""
        return [call.start for call in self.calls(method)]

    def count(self, method: str = "CreateTask") -> int:
        """How many attempts of ``method`` were sent."""
        return len(self.calls(method))


CountedChannel = Callable[..., tuple[grpc.Channel, AttemptCounter]]


@pytest.fixture
def counted_channel() -> Iterator[CountedChannel]:
    """Makes channels that record their calls: ``channel, counter =
    counted_channel(address)``, with ``options=`` for the channel's options
    (such as a client's own, from ``oncely._wire.channel_options``). All are
    closed after the test."""
    channels: list[grpc.Channel] = []

    def make(address: str, options: Sequence[tuple[str, Any]] = ()) -> tuple[grpc.Channel, AttemptCounter]:
        counter = AttemptCounter()
        channel = grpc.intercept_channel(grpc.insecure_channel(address, options=list(options)), counter)
        channels.append(channel)
        return channel, counter

    yield make
    for channel in channels:
        channel.close()
