"""A minimal OTLP/HTTP trace collector for tests: a loopback HTTP server on a thread
that decodes every `POST /v1/traces` (protobuf `ExportTraceServiceRequest`, what
app/telemetry.py's OTLP exporter sends) into plain span dicts. The replicas export to it
over real HTTP, so spans from several processes (ingress, controller) meet here."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _value(v) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def decode(body: bytes) -> list[dict]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    out = []
    for rspans in ExportTraceServiceRequest.FromString(body).resource_spans:
        resource = {kv.key: _value(kv.value) for kv in rspans.resource.attributes}
        for ss in rspans.scope_spans:
            for s in ss.spans:
                out.append(
                    {
                        "name": s.name,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex() or None,
                        "kind": s.kind,
                        "status": s.status.code,
                        "attributes": {kv.key: _value(kv.value) for kv in s.attributes},
                        "events": [e.name for e in s.events],
                        "resource": resource,
                    }
                )
    return out


class OTLPCollector:
    def __init__(self) -> None:
        self.spans: list[dict] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/v1/traces":
                    spans = decode(body)
                    with collector._lock:
                        collector.spans.extend(spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def wait_for(self, predicate: Callable[[list[dict]], bool], timeout_s: float = 30.0) -> list[dict]:
        """Poll until predicate(spans so far) holds (exporters batch every few seconds)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"spans not seen within {timeout_s}s; got {sorted({s['name'] for s in spans})}"
                )
            time.sleep(0.2)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
