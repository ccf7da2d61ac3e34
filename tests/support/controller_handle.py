"""A scripted controller deployment handle for ingress-side tests of the group-wide token
stream (app/group_stream.py): `submit` admits on one replica, `subscribe` replays the
items a test pushes (an exception item breaks the subscription, as a dead replica does),
`cancel` is recorded."""

from __future__ import annotations

import asyncio
from typing import Any

from esp_serve.app.protocol import Admission, GenerateRequest, Pin

REPLICA = "replica-a"


class _Call:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class ScriptedController:
    def __init__(self) -> None:
        self.submitted: list[GenerateRequest] = []
        self.cancelled: list[tuple[str, str]] = []
        self.subscriptions: list[tuple[str, str]] = []
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.submit = _Call(self._submit)
        self.cancel = _Call(lambda pin, rid: self.cancelled.append((pin.replica_id, rid)))
        self.subscribe = _Call(self._subscribe)

    def options(self, **_: Any) -> ScriptedController:
        return self

    async def _submit(self, request: GenerateRequest) -> Admission:
        self.submitted.append(request)
        return Admission(True, replica_id=REPLICA)

    async def _subscribe(self, pin: Pin, ingress_id: str) -> Any:
        self.subscriptions.append((pin.replica_id, ingress_id))
        while True:
            item = await self.items.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                return
            yield item
