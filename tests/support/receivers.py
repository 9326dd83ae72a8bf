"""Local HTTP receivers that stand in for Slack, PagerDuty and Grafana, recording every request.

Used by the tests and the latency bench (and usable by the lead's end-to-end bench). Each
receiver listens on 127.0.0.1 only. ``down()`` closes the listening socket (clients get
connection refused, as with a dead endpoint); ``up()`` listens again on the same port.
``status`` makes it answer with an error code instead (e.g. 503).

:class:`PagerDutyReceiver` also models Events API v2 incident semantics: a trigger whose
``dedup_key`` already has an open incident adds to it; only a trigger for a key with no open
incident opens a new one; a resolve closes it. Tests count ``incidents_opened``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import socket
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from agentwatch.broker import free_port


@dataclass(frozen=True)
class ReceivedRequest:
    received_at: float  # time.time() when the body was read
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # decoded JSON, or the raw text when not JSON


@dataclass
class _Incident:
    dedup_key: str
    opened_at: float
    triggers: int = 1
    open: bool = True


class RecordingReceiver:
    """A threaded HTTP server that records JSON POSTs and answers like the real service."""

    def __init__(self, port: int | None = None, *, delay_s: float = 0.0,
                 tls: bool = False) -> None:
        self.port = port or free_port()
        self.delay_s = delay_s
        self.tls = tls
        self.ca_path: str | None = None
        self._ssl_context: ssl.SSLContext | None = None
        if tls:
            self.ca_path, self._ssl_context = _self_signed_context()
        self.status: int | None = None  # force this status (e.g. 503) while set
        self.requests: list[ReceivedRequest] = []
        self.rejected = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[Any] = set()
        self._thread: threading.Thread | None = None
        self.on_request: Callable[[ReceivedRequest], None] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # -- what the fake service answers; subclasses override

    def respond(self, request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        return 200, {"Content-Type": "text/plain"}, b"ok"

    # -- lifecycle

    def up(self) -> "RecordingReceiver":
        if self._server is not None:
            return self
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                with receiver.lock:
                    receiver._connections.add(self.connection)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with receiver.lock:
                        receiver._connections.discard(self.connection)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                request = ReceivedRequest(time.time(), "POST", self.path,
                                          {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver.lock:
                    forced = receiver.status
                    if forced is not None:
                        receiver.rejected += 1
                        status, headers, payload = forced, {"Content-Type": "text/plain"}, b"down"
                    else:
                        receiver.requests.append(request)
                        status, headers, payload = receiver.respond(request)
                if forced is None and receiver.on_request is not None:
                    receiver.on_request(request)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        if self._ssl_context is not None:
            # Handshake in the per-connection thread, not in accept(): one slow client must not
            # stall the listener.
            server.socket = self._ssl_context.wrap_socket(server.socket, server_side=True,
                                                          do_handshake_on_connect=False)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"receiver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def down(self) -> None:
        """Stop listening and drop kept-alive connections: clients see a dead endpoint."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread = None
        with self.lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "RecordingReceiver":
        return self.up()

    def __exit__(self, *exc: Any) -> None:
        self.down()

    def snapshot(self) -> list[ReceivedRequest]:
        with self.lock:
            return list(self.requests)


class SlackReceiver(RecordingReceiver):
    """Answers like a Slack incoming webhook (200 ``ok``)."""


class PagerDutyReceiver(RecordingReceiver):
    """Answers like Events API v2 ``POST /v2/enqueue`` and tracks incidents by dedup_key.

    TLS by default: the official ``pagerduty`` client accepts only ``https://`` base URLs;
    give the client ``ca_path`` as its CA bundle.
    """

    def __init__(self, port: int | None = None, *, delay_s: float = 0.0, tls: bool = True) -> None:
        super().__init__(port, delay_s=delay_s, tls=tls)
        self.incidents: dict[str, list[_Incident]] = {}
        self.incidents_opened = 0

    def respond(self, request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        body = request.body if isinstance(request.body, dict) else {}
        if request.path != "/v2/enqueue" or not body.get("routing_key") or body.get(
                "event_action") not in ("trigger", "acknowledge", "resolve"):
            return 400, {"Content-Type": "application/json"}, json.dumps(
                {"status": "invalid event", "message": "Event object is invalid"}).encode()
        action = body["event_action"]
        dedup_key = body.get("dedup_key") or f"generated-{len(self.requests)}"
        history = self.incidents.setdefault(dedup_key, [])
        current = history[-1] if history and history[-1].open else None
        if action == "trigger":
            if current is None:
                history.append(_Incident(dedup_key, request.received_at))
                self.incidents_opened += 1
            else:
                current.triggers += 1
        elif action == "resolve" and current is not None:
            current.open = False
        return 202, {"Content-Type": "application/json"}, json.dumps(
            {"status": "success", "message": "Event processed", "dedup_key": dedup_key}).encode()

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        return [r.body for r in self.snapshot()
                if isinstance(r.body, dict) and (action is None or r.body.get("event_action") == action)]


class GrafanaReceiver(RecordingReceiver):
    """Answers like Grafana ``POST /api/annotations``."""

    def respond(self, request: ReceivedRequest) -> tuple[int, dict[str, str], bytes]:
        if request.path != "/api/annotations":
            return 404, {"Content-Type": "application/json"}, b'{"message":"not found"}'
        return 200, {"Content-Type": "application/json"}, json.dumps(
            {"id": len(self.requests), "message": "Annotation added"}).encode()


def _self_signed_context() -> tuple[str, ssl.SSLContext]:
    """A throwaway key + certificate for 127.0.0.1; returns (CA file path, server context)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agentwatch-test-receiver")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder = tempfile.mkdtemp(prefix="agentwatch-receiver-tls-")
    cert_path = f"{folder}/cert.pem"
    key_path = f"{folder}/key.pem"
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return cert_path, context


def wait_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


@dataclass
class ReceiverSet:
    slack: SlackReceiver = field(default_factory=SlackReceiver)
    pagerduty: PagerDutyReceiver = field(default_factory=PagerDutyReceiver)
    grafana: GrafanaReceiver = field(default_factory=GrafanaReceiver)

    def up(self) -> "ReceiverSet":
        for r in (self.slack, self.pagerduty, self.grafana):
            r.up()
        return self

    def down(self) -> None:
        for r in (self.slack, self.pagerduty, self.grafana):
            r.down()
