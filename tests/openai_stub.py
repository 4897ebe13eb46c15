"""A real HTTP server on loopback that speaks OpenAI chat-completions, for tests.

Answers come from ``rule(request_json) -> text | (text, finish_reason)``. Failures are
injected into the next requests in order (``inject("500", "429", ...)``):

    "500"   HTTP 500 with an OpenAI-style error body
    "429"   HTTP 429 with ``Retry-After: <retry_after>``
    "400"   HTTP 400 "model not found" (not retryable)
    "drop"  the connection is closed without any answer
    "slow"  the answer comes after ``slow_s`` seconds (longer than the client's timeout)

The server counts requests and the largest number it was serving at once.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List


class OpenAIStub:
    def __init__(self, rule: Callable[[dict], object], delay: float = 0.0, retry_after: float = 1.0,
                 slow_s: float = 2.0):
        self.rule = rule
        self.delay = delay  # every normal answer waits this long (to make requests overlap)
        self.retry_after = retry_after
        self.slow_s = slow_s
        self.requests: List[dict] = []  # bodies of answered (non-failed) requests
        self.auth_headers: List[str] = []
        self.failures_served: List[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._failures: deque = deque()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def inject(self, *kinds: str) -> None:
        with self._lock:
            self._failures.extend(kinds)

    def __enter__(self) -> "OpenAIStub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _release(self) -> None:
                # A request stops being in flight before its reply is written: once the client
                # has the reply it may send the next request before this handler finishes.
                with stub._lock:
                    if not self._released:
                        self._released = True
                        stub.in_flight -= 1

            def _send(self, status: int, obj: dict, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                self._release()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with stub._lock:
                    stub.in_flight += 1
                    self._released = False
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    failure = stub._failures.popleft() if stub._failures else None
                    stub.auth_headers.append(self.headers.get("Authorization", ""))
                    if failure:
                        stub.failures_served.append(failure)
                try:
                    if not self.path.endswith("/chat/completions"):
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                    elif failure:
                        self._fail(failure, body)
                    else:
                        time.sleep(stub.delay)
                        self._answer(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass
                finally:
                    self._release()

            def _fail(self, failure: str, body: dict) -> None:
                if failure == "500":
                    self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                elif failure == "429":
                    self._send(429, {"error": {"message": "rate limited"}},
                               {"Retry-After": f"{stub.retry_after:g}"})
                elif failure == "400":
                    self._send(400, {"error": {"message": f"The model '{body.get('model')}' does not exist",
                                               "type": "invalid_request_error"}})
                elif failure == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                elif failure == "slow":
                    time.sleep(stub.slow_s)
                    self._answer(body)
                else:
                    raise ValueError(f"unknown failure kind {failure!r}")

            def _answer(self, body: dict) -> None:
                out = stub.rule(body)
                text, finish = out if isinstance(out, tuple) else (out, "stop")
                with stub._lock:
                    stub.requests.append(body)
                self._send(200, {
                    "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                })

        return Handler
