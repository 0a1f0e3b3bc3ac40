"""A real HTTPS server playing the Anthropic Messages API, for tests with the official SDKs.

It is not a mock of the client side: the SDKs (Python ``anthropic``, Node ``@anthropic-ai/sdk``)
talk to it over TLS through the real sidecar, exactly as to ``api.anthropic.com``. What it
answers is scripted per request by the test (``answer``: a function of the request body); an
answer is a Messages ``message`` (its ``content`` blocks and ``stop_reason``) and is sent

* as JSON when the request did not ask for ``stream``, with Content-Length;
* as an event stream otherwise, chunked, **one flushed write per event** a few milliseconds
  apart (so the sidecar reads them separately), text and tool input split into deltas of
  ``split`` characters - or as the raw events a test gives (adversarial shapes).

Message batches: ``GET /v1/messages/batches/<id>`` answers an ended batch whose
``results_url`` is ``.../results``, and that answers ``batch_results[<id>]`` (a list of
messages) as JSON Lines, one ``succeeded`` result per message (``custom_id`` ``req-<n>``).

``seen`` keeps every request (path, headers, JSON body); a request without the expected
``x-api-key`` gets the API's 401.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .pki import CertAuthority

__all__ = ["AnthropicAPI", "sse_event", "message_events"]

Answer = dict[str, Any] | list[bytes]


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


def _pieces(text: str, n: int) -> list[str]:
    return [text[i:i + n] for i in range(0, len(text), n)] or [""]


def message_events(message: dict[str, Any], split: int = 8) -> list[bytes]:
    """The event stream of ``message`` as the API sends it."""
    head = {k: v for k, v in message.items() if k not in ("content", "stop_reason")}
    events = [sse_event("message_start", {"type": "message_start", "message": {
        **head, "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1}}})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            events.append(sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                            "content_block": start}))
            for part in _pieces(json.dumps(block["input"]), split):
                events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                "delta": {"type": "input_json_delta",
                                                                          "partial_json": part}}))
        else:
            events.append(sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                                            "content_block": {"type": "text", "text": ""}}))
            for part in _pieces(block["text"], split):
                events.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                                "delta": {"type": "text_delta", "text": part}}))
        events.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(sse_event("message_delta", {"type": "message_delta",
                                              "delta": {"stop_reason": message.get("stop_reason", "end_turn"),
                                                        "stop_sequence": None},
                                              "usage": {"output_tokens": 20}}))
    events.append(sse_event("message_stop", {"type": "message_stop"}))
    return events


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away mid-answer is not the server's error


class AnthropicAPI:
    """``POST /v1/messages`` over HTTPS (its own CA), answered by ``answer(body)``."""

    def __init__(self, directory: Path, *, api_key: str, host: str = "127.0.0.1", split: int = 8,
                 delay: float = 0.003) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = CertAuthority(f"fake-anthropic-{uuid.uuid4().hex[:6]}")
        self.ca_file = self.ca.write_cert(directory / "anthropic-ca.crt")
        pair = self.ca.write_server_cert(directory, "anthropic", dns_names=("localhost",), ip_addresses=(host,))
        self.api_key = api_key
        self.split = split
        self.delay = delay
        self.answer: Callable[[dict[str, Any]], Answer] = lambda body: {
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn"}
        self.seen: list[dict[str, Any]] = []
        self.batch_results: dict[str, list[dict[str, Any]]] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw or b"{}")
                api.seen.append({"path": self.path, "body": body,
                                 "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.headers.get("x-api-key") != api.api_key:
                    self._json(401, {"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}})
                    return
                answer = api.answer(body)
                if isinstance(answer, dict):
                    answer = {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant",
                              "model": body.get("model", "claude-test"), **answer}
                if not body.get("stream"):
                    assert isinstance(answer, dict), "raw events need stream: true"
                    self._json(200, {**answer, "stop_sequence": None,
                                     "usage": {"input_tokens": 10, "output_tokens": 20}})
                    return
                events = answer if isinstance(answer, list) else message_events(answer, api.split)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream; charset=utf-8")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for event in events:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
                    self.wfile.flush()
                    time.sleep(api.delay)
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                api.seen.append({"path": self.path, "body": None,
                                 "headers": {k.lower(): v for k, v in self.headers.items()}})
                if self.headers.get("x-api-key") != api.api_key:
                    self._json(401, {"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}})
                    return
                parts = self.path.split("?", 1)[0].strip("/").split("/")  # v1 messages batches <id> [results]
                batch = parts[3] if len(parts) >= 4 and parts[:3] == ["v1", "messages", "batches"] else ""
                if batch not in api.batch_results:
                    self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "no batch"}})
                    return
                if len(parts) == 4:
                    host = self.headers.get("Host", "")
                    self._json(200, {"id": batch, "type": "message_batch", "processing_status": "ended",
                                     "request_counts": {"processing": 0, "succeeded": len(api.batch_results[batch]),
                                                        "errored": 0, "canceled": 0, "expired": 0},
                                     "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-02T00:00:00Z",
                                     "ended_at": "2026-01-01T00:01:00Z", "archived_at": None,
                                     "cancel_initiated_at": None,
                                     "results_url": f"https://{host}/v1/messages/batches/{batch}/results"})
                    return
                lines = []
                for n, message in enumerate(api.batch_results[batch]):
                    full = {"id": f"msg_b{n}", "type": "message", "role": "assistant", "model": "claude-test",
                            "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}, **message}
                    lines.append(json.dumps({"custom_id": f"req-{n}", "result": {"type": "succeeded",
                                                                                  "message": full}}))
                data = ("\n".join(lines) + "\n").encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/binary")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _json(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pair.cert_path, pair.key_path)
        self.server = _Server((host, 0), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.socket.getsockname()[1]
        self.url = f"https://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
