"""A fault-injecting HTTP proxy between boto3 and a local S3 endpoint (127.0.0.1 only).

Every request is read whole, then either forwarded to the upstream endpoint and its response relayed, or hit by a
fault drawn from a seeded generator:
    500         an S3 `InternalError` reply; the request never reaches the store
    503         an S3 `SlowDown` reply (throttling); the request never reaches the store
    reset       the connection is reset before anything is forwarded
    reset-after the request is forwarded (the store applies it), then the client's connection is reset without a reply
    truncate    the upstream reply is relayed up to half its body, then the connection is reset
Requests are signed for the proxy's host:port and forwarded with that Host header, so signatures still verify.
"""

import dataclasses
import http.client
import http.server
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable

KINDS = ('500', '503', 'reset', 'reset-after', 'truncate')
XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
       '<Message>injected by the fault proxy</Message></Error>')

@dataclasses.dataclass
class FaultPlan:
    rate: float = 0.0                           # probability that a request is hit
    kinds: tuple[str, ...] = KINDS              # faults drawn from, uniformly
    seed: int = 0
    only: Callable[[str, str], bool] = lambda method, path: True  # which requests may be hit
    blackout: str | None = None                 # a kind that hits every request that `only` selects
    delay_put: float = 0.0                      # seconds each PUT waits before it is forwarded (widens upload windows)
    limit: int | None = None                    # at most this many faults in all

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    server: '_Server'
    # A read of the client's request that waits longer gives up and drops the connection (the client retries). Seen
    # once in CI: a PUT body that stopped short of its Content-Length held this thread and its client (waiting for
    # the reply) for good.
    timeout = 30

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            out = b''
            while True:
                line = self.rfile.readline()
                size = int(line.split(b';')[0], 16)
                chunk = self.rfile.read(size + 2)
                out += line + chunk
                if size == 0:
                    return out + self._trailers()
        return self.rfile.read(int(self.headers.get('Content-Length') or 0))

    def _trailers(self) -> bytes:
        out = b''
        while (line := self.rfile.readline()) not in (b'\r\n', b'\n', b''):
            out += line
        return out + b'\r\n'

    def _reset(self) -> None:
        """Close with an RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        self.close_connection, self._was_reset = True, True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        self.connection.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], body: bytes, cut: int | None = None) -> None:
        self.send_response_only(status)
        for k, v in headers:
            if k.lower() not in ('transfer-encoding', 'connection', 'content-length'):
                self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        self.wfile.flush()
        if cut is not None:
            self._reset()

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.command == 'PUT' and self.server.plan.delay_put:
            threading.Event().wait(self.server.plan.delay_put)
        conn = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                conn.putheader(k, v)
            conn.endheaders(body)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), (b'' if self.command == 'HEAD' else resp.read())
        finally:
            conn.close()

    def _handle(self) -> None:
        body = self._body()
        fault = self.server.draw(self.command, self.path)
        if fault in ('500', '503'):
            code = 'InternalError' if fault == '500' else 'SlowDown'
            payload = b'' if self.command == 'HEAD' else XML.format(code=code).encode()
            self._reply(int(fault), [('Content-Type', 'application/xml')], payload)
        elif fault == 'reset':
            self._reset()
        else:
            status, headers, payload = self._forward(body)
            if fault == 'reset-after':
                self._reset()
            else:
                cut = len(payload) // 2 if fault == 'truncate' and len(payload) > 1 else None
                self._reply(status, headers, payload, cut)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

    def finish(self) -> None:
        if not getattr(self, '_was_reset', False):
            super().finish()

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], plan: FaultPlan) -> None:
        super().__init__(('127.0.0.1', 0), _Handler)
        self.upstream, self.plan, self.rng, self.lock = upstream, plan, random.Random(plan.seed), threading.Lock()
        self.counts: Counter = Counter()

    def draw(self, method: str, path: str) -> str | None:
        with self.lock:
            self.counts['requests'] += 1
            fault = None
            if self.plan.only(method, path) and (self.plan.limit is None
                                                 or sum(self.counts[k] for k in KINDS) < self.plan.limit):
                fault = self.plan.blackout or (self.rng.choice(self.plan.kinds)
                                               if self.rng.random() < self.plan.rate else None)
            if fault:
                self.counts[fault] += 1
            return fault

    def handle_error(self, request, client_address) -> None:
        pass                                    # resets on purpose; clients that hang up

class FaultProxy:
    """`with FaultProxy('http://127.0.0.1:8333', FaultPlan(rate=0.2)) as proxy:` point boto3 at proxy.url."""

    def __init__(self, upstream_url: str, plan: FaultPlan) -> None:
        host, port = upstream_url.removeprefix('http://').rstrip('/').split(':')
        self.server = _Server((host, int(port)), plan)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'
        self._thread = threading.Thread(target=self.server.serve_forever, name='fault-proxy', daemon=True)

    @property
    def plan(self) -> FaultPlan:
        return self.server.plan

    @property
    def counts(self) -> Counter:
        return self.server.counts

    def injected(self) -> int:
        return sum(v for k, v in self.counts.items() if k in KINDS)

    def __enter__(self) -> 'FaultProxy':
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
