"""ASGI middleware: request ids, a JSON access log, Prometheus metrics, a body-size limit.

Pure ASGI (not BaseHTTPMiddleware) so streaming bodies are counted as they arrive and a
too-large body is refused without being buffered.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ember.api.errors import BodyTooLarge, envelope, too_large_envelope

log = logging.getLogger("ember.api.access")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}$")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ember_api_requests_total",
            "HTTP requests",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ember_api_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=self.registry,
        )


class EdgeMiddleware:
    """Everything that wraps every request, in one pass."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if _REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        sent_start = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent_start
            if message["type"] == "http.response.start":
                status = message["status"]
                sent_start = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        if (
            "\x00" in scope["path"]
            or b"%00" in scope["query_string"]
            or b"\x00" in scope["query_string"]
            or any("\x00" in v for v in headers.values())
        ):
            # No name, id, cursor or key can hold a NUL, and Postgres text cannot store one.
            await self._reply(
                send_wrapper,
                422,
                envelope(
                    "request.invalid",
                    "the request path, query or headers contain a NUL character",
                    hint="remove the NUL (%00) from the request",
                ),
            )
            self._record(scope, status, started, request_id)
            return

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._too_large(send_wrapper)
            self._record(scope, status, started, request_id)
            return

        received = 0

        async def receive_wrapper() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        except BodyTooLarge:  # raised outside FastAPI's routing (which answers it itself)
            if not sent_start:
                await self._too_large(send_wrapper)
        finally:
            self._record(scope, status, started, request_id)

    async def _too_large(self, send: Send) -> None:
        await self._reply(send, 413, too_large_envelope(self.max_body))

    async def _reply(self, send: Send, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _record(self, scope: Scope, status: int, started: float, request_id: str) -> None:
        elapsed = time.perf_counter() - started
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        method = scope["method"]
        self.metrics.requests.labels(method, template, str(status)).inc()
        self.metrics.latency.labels(method, template).observe(elapsed)
        entry: dict[str, Any] = {
            "request_id": request_id,
            "method": method,
            "path": scope["path"],
            "route": template,
            "status": status,
            "duration_ms": round(elapsed * 1000, 2),
        }
        log.info(json.dumps(entry, sort_keys=True))
