"""A scripted controller deployment handle for ingress-side tests of the group-wide token
stream (app/group_stream.py): `submit` admits on one replica, `subscribe` replays items
(`{request_id: [TokenEvent, ...]}`; an exception item breaks the subscription, as a dead
replica does; None ends it idle), `cancel` is recorded. Items come from `script(request)`
at each submit, or from a test putting them on `items`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from esp_serve.app.protocol import Admission, GenerateRequest, ModelInfo, Pin, TokenEvent

REPLICA = "replica-a"
MODEL_INFO = ModelInfo("builtin", 258, 1024, (257,))

# request -> what its subscription delivers: lists of its events, or an exception
Script = Callable[[GenerateRequest], list[Any]]


class _Call:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


def tokens(n: int, token_id: int = 104, finish: str | None = "length") -> list[TokenEvent]:
    """`n` tokens, the last ending the request with `finish` (None: it never ends)."""
    events = [TokenEvent(token_id, num_output_tokens=i + 1) for i in range(n)]
    if finish is not None:
        events[-1] = TokenEvent(token_id, num_output_tokens=n, finish_reason=finish)
    return events


class ScriptedController:
    def __init__(self, script: Script | None = None) -> None:
        self.script = script
        self.requests: list[GenerateRequest] = []
        self.cancelled: list[tuple[str, str]] = []
        self.subscriptions: list[tuple[str, str]] = []
        self.items: asyncio.Queue[Any] | None = None
        self.submit = _Call(self._submit)
        self.cancel = _Call(lambda pin, rid: self.cancelled.append((pin.replica_id, rid)))
        self.subscribe = _Call(self._subscribe)
        self.model_info = _Call(self._model_info)

    def options(self, **_: Any) -> ScriptedController:
        return self

    def queue(self) -> asyncio.Queue[Any]:
        if self.items is None:  # made on the loop that uses it
            self.items = asyncio.Queue()
        return self.items

    async def _model_info(self) -> ModelInfo:
        return MODEL_INFO

    async def _submit(self, request: GenerateRequest) -> Admission:
        self.requests.append(request)
        for item in self.script(request) if self.script else ():
            self.queue().put_nowait(item if isinstance(item, BaseException) else {request.request_id: item})
        return Admission(True, replica_id=REPLICA)

    async def _subscribe(self, pin: Pin, ingress_id: str) -> Any:
        self.subscriptions.append((pin.replica_id, ingress_id))
        while True:
            item = await self.queue().get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item
