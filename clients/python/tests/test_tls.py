"""The client over TLS: a server with a certificate of a test CA (made
with openssl), reached with ``https://`` and the CA, and refused in
plaintext or without the CA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import pytest
from conftest import StartServer

from oncely import Client, GaveUp, OncelyError, RetryPolicy


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> Path:
    """A CA (``ca.pem``) and, signed by it, a server certificate for
    127.0.0.1 (``server.pem``, ``server.key``) and a client certificate for
    mTLS (``client.pem``, ``client.key``), in ``folder``."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "1", "-subj", "/CN=oncely test CA", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=agent.example")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", subject, cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)
    return folder


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    """The certificates of :func:`make_certificates`, in tmp_path."""
    return make_certificates(tmp_path)


@pytest.fixture
def tls_server(start_server: StartServer, certificates: Path) -> str:
    """A TLS server, SERVING; returns its ``host:port``."""
    server = start_server(
        tls_ca=certificates / "ca.pem",
        TLS_CERT=str(certificates / "server.pem"),
        TLS_KEY=str(certificates / "server.key"),
    )
    return server.address


def test_the_client_speaks_tls_to_an_https_address(tls_server: str, certificates: Path) -> None:
    patient = RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.2, total_timeout=20)
    with Client(f"https://{tls_server}", tls_ca=certificates / "ca.pem", retry_policy=patient) as client:
        created = client.create_task("agent-7", "send_email", {"to": "ada@example.com"})
        assert client.get_task(created.task.task_id) == created.task

    # One attempt each; they fail at once, and the generous deadline keeps
    # a slow handshake from failing them some other way.
    once = RetryPolicy(max_attempts=1, attempt_timeout=30)
    with Client(f"http://{tls_server}", retry_policy=once) as plaintext:
        with pytest.raises(OncelyError):
            plaintext.create_task("agent-7", "send_email")
    with Client(f"https://{tls_server}", retry_policy=once) as untrusting:
        with pytest.raises(GaveUp) as refused:
            untrusting.create_task("agent-7", "send_email")
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE


def test_an_https_address_never_falls_back_to_plaintext(server) -> None:
    """Against a plaintext server, an ``https://`` client fails rather than
    speak plaintext, and creates nothing."""
    once = RetryPolicy(max_attempts=1, attempt_timeout=30)
    agent = "agent-no-downgrade"
    with Client(f"https://{server.address}", retry_policy=once) as secure:
        with pytest.raises(OncelyError):
            secure.create_task(agent, "send_email")
    with Client(server.address) as plain:
        assert plain.list_tasks(agent).tasks == ()


def test_a_ca_is_only_for_https_targets(certificates: Path) -> None:
    with pytest.raises(ValueError, match="https"):
        Client("127.0.0.1:50051", tls_ca=certificates / "ca.pem")



def test_the_json_api_is_served_over_tls_too(tls_server: str, certificates: Path) -> None:
    import json
    import ssl
    import urllib.request
    import uuid

    context = ssl.create_default_context(cafile=str(certificates / "ca.pem"))
    # As urllib3, requests and curl --http1.1 do: HTTP/1.1 only, by ALPN.
    context.set_alpn_protocols(["http/1.1"])
    request = urllib.request.Request(
        f"https://{tls_server}/v1/tasks",
        data=json.dumps({"agent_id": "agent-7", "action": "send_email"}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        assert response.status == 201
        assert json.loads(response.read())["agentId"] == "agent-7"
