"""A small fault-injecting HTTP proxy on loopback, in front of the S3 server or a Ray job server: it forwards every
request, except those its plan says to answer with an error status or to drop (close the connection without
answering). A plan can aim at one endpoint only (``only``) and answer with a given body (e.g. Ray's own text)."""

from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERROR_BODY = {
    403: ("AccessDenied", "Access Denied"),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}


@dataclass
class FaultPlan:
    """What the proxy does: the next ``fail`` requests get ``status``; the next ``drop`` connections are cut;
    with ``every`` > 0, every ``every``-th request gets ``status``; ``always`` answers everything with it.

    ``only`` (``"POST /api/jobs/"``) limits all of that to the requests of one method and path; the others are
    forwarded and not counted. ``body`` is the fault's text (plain text, as Ray's job server answers), instead
    of an S3 error document. ``forward_first`` sends a failed request upstream before answering with the fault:
    the server acted, the client hears a failure. ``seen`` holds the bodies of the requests the plan applied to.
    """

    status: int = 503
    fail: int = 0
    drop: int = 0
    every: int = 0
    always: bool = False
    only: str | None = None
    body: str | None = None
    forward_first: bool = False
    requests: int = 0
    failed: int = 0
    dropped: int = 0
    seen: list[bytes] = field(default_factory=list, repr=False)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def applies_to(self, method: str, path: str) -> bool:
        return self.only is None or f"{method} {path}" == self.only

    def decide(self, body: bytes = b"") -> str:
        with self.lock:
            self.requests += 1
            self.seen.append(body)
            if self.drop > 0:
                self.drop -= 1
                self.dropped += 1
                return "drop"
            if self.always or self.fail > 0 or (self.every and self.requests % self.every == 0):
                self.fail = max(0, self.fail - 1)
                self.failed += 1
                return "fail"
            return "forward"


class FaultProxy:
    """``with FaultProxy(upstream) as proxy: proxy.url ...``; change ``proxy.plan`` at any time."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        self.upstream = urlparse(upstream)
        self.plan = plan or FaultPlan()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _handle(self) -> None:
                body = self._body()
                plan = proxy.plan
                action = plan.decide(body) if plan.applies_to(self.command, self.path) else "forward"
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "fail":
                    if plan.forward_first:
                        self._forward(body, answer=False)
                    self._error(plan.status, plan.body)
                    return
                self._forward(body, answer=True)

            def _forward(self, body: bytes, answer: bool) -> None:
                upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = [(k, v) for k, v in self.headers.items() if k.lower() not in ("connection", "expect")]
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for key, value in headers:
                        upstream.putheader(key, value)
                    upstream.endheaders()
                    if body:
                        upstream.send(body)
                    reply = upstream.getresponse()
                    data = reply.read()
                    if not answer:
                        return
                    self.send_response(reply.status, reply.reason)
                    for key, value in reply.getheaders():
                        if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(key, value)
                    # HEAD answers carry the object's length, not the (empty) body's
                    length = reply.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    upstream.close()

            def _body(self) -> bytes:
                """The request body as it came on the wire; a chunked upload (the S3 client streams them,
                with its checksum as a trailer) keeps its framing, so it can be forwarded unchanged."""
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    raw = []
                    while True:
                        line = self.rfile.readline()
                        raw.append(line)
                        size = int(line.split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while True:
                                trailer = self.rfile.readline()
                                raw.append(trailer)
                                if trailer in (b"\r\n", b"\n", b""):
                                    return b"".join(raw)
                        raw.append(self.rfile.read(size))
                        raw.append(self.rfile.readline())
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _error(self, status: int, text: str | None) -> None:
                if text is not None:
                    data, content_type = text.encode(), "text/plain; charset=utf-8"
                else:
                    code, message = _ERROR_BODY.get(status, ("Error", "error"))
                    data = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                            f"<Message>{message}</Message><RequestId>fault-proxy</RequestId></Error>").encode()
                    content_type = "application/xml"
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FaultProxy":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
