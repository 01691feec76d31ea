"""At delivery the worker resolves, judges every address, and connects only to an address it judged.

So no connection to a refused address is ever opened: a listening socket there sees nothing, and
the error for an open port is the error for a closed one.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import urllib3

from dispatcher.netguard import NetworkGuard
from tests.conftest import WEBHOOK_SECRET, free_port
from workers.errors import PermanentDeliveryError
from workers.http import HttpClient
from workers.webhook import WebhookSender

DATA = {"url": "", "body": "{}", "headers": {}}


def send(guard: NetworkGuard, url: str) -> tuple[int, str]:
    return WebhookSender(HttpClient(guard, 2.0), WEBHOOK_SECRET).send("msg_" + uuid.uuid4().hex, DATA | {"url": url})


def fixed_resolver(*addresses: str):
    """Stands in for DNS (which cannot be pointed at loopback here): every name resolves to `addresses`."""
    calls: list[str] = []

    def resolve(host, port, *args, **kwargs):
        calls.append(host)
        return [info for address in addresses for info in socket.getaddrinfo(address, port, *args, **kwargs)]

    resolve.calls = calls  # type: ignore[attr-defined]
    return resolve


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening socket on loopback that nobody accepts on: a connection would wait in its backlog."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=16)
    sock.setblocking(False)
    with sock:
        yield sock


def assert_no_connection(sock: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        sock.accept()[0].close()


@pytest.mark.parametrize(
    ("host", "resolver"),
    [
        pytest.param("127.0.0.1", socket.getaddrinfo, id="literal"),
        pytest.param("localhost", socket.getaddrinfo, id="localhost"),
        pytest.param("rebound.example", fixed_resolver("127.0.0.1"), id="name-rebound-to-loopback"),
        pytest.param("mixed.example", fixed_resolver("93.184.215.14", "127.0.0.1"), id="public-and-loopback"),
        pytest.param("mapped.example", fixed_resolver("::ffff:127.0.0.1"), id="ipv4-mapped-loopback"),
    ],
)
def test_no_connection_to_a_refused_address_is_ever_opened(listener, host, resolver):
    port = listener.getsockname()[1]

    with pytest.raises(PermanentDeliveryError, match=r"network guard.*not a public address"):
        send(NetworkGuard(resolver=resolver), f"http://{host}:{port}/hook")

    assert_no_connection(listener)


def test_open_and_closed_refused_ports_give_the_same_error(listener):
    guard = NetworkGuard()
    errors = []
    for port in (listener.getsockname()[1], free_port()):
        with pytest.raises(PermanentDeliveryError) as caught:
            send(guard, f"http://127.0.0.1:{port}/hook")
        errors.append((type(caught.value), str(caught.value), caught.value.status_code))

    assert errors[0] == errors[1]
    assert_no_connection(listener)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = f"host={self.headers['host']}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_an_allowed_address_is_connected_to_with_the_host_name_kept():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    resolver = fixed_resolver("127.0.0.1")
    try:
        port = server.server_address[1]
        guard = NetworkGuard([ipaddress.ip_network("127.0.0.0/8")], resolver=resolver)

        assert send(guard, f"http://hooks.example:{port}/hook") == (200, f"host=hooks.example:{port}")
    finally:
        server.shutdown()
        server.server_close()
    assert resolver.calls == ["hooks.example"]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for hooks.example (key and certificate in one PEM file)."""
    directory = tmp_path_factory.mktemp("tls")
    pem = directory / "hooks.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", "/CN=hooks.example", "-addext", "subjectAltName=DNS:hooks.example",
         "-keyout", str(pem), "-out", str(directory / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    pem.write_text(pem.read_text() + (directory / "cert.pem").read_text())
    return pem


@pytest.mark.parametrize(("name", "verified"), [("hooks.example", True), ("other.example", False)])
def test_tls_checks_the_certificate_against_the_host_name_not_the_address(certificate, name, verified):
    import ssl

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        guard = NetworkGuard([ipaddress.ip_network("127.0.0.0/8")], resolver=fixed_resolver("127.0.0.1"))
        client = HttpClient(guard, 2.0)
        client.pool.connection_pool_kw["ca_certs"] = str(certificate)  # trust the test's own CA
        url = f"https://{name}:{port}/hook"
        if verified:
            assert client.post(url, b"{}", {}).status == 200
        else:
            with pytest.raises(urllib3.exceptions.SSLError, match=r"other\.example|hostname|match"):
                client.post(url, b"{}", {})
        client.close()
    finally:
        server.shutdown()
        server.server_close()
