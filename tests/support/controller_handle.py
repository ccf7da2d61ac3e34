"""A scripted controller deployment handle for ingress-side tests of the group-wide token
stream (app/group_stream.py): `submit` admits on one replica, `subscribe` replays items
(`{request_id: [TokenEvent, ...]}`) on a real event channel (app/event_channel.py), as
the controller does; an exception item breaks the subscription as a dead replica does
(the channel closes without END, then the call raises it); None ends it idle),
`cancel` is recorded. Items come from `script(request)`
at each submit, or from a test putting them on `items`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from esp_serve.app.event_channel import EventServer, send_data, send_end
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

    def _subscribe(self, pin: Pin, ingress_id: str) -> Any:
        self.subscriptions.append((pin.replica_id, ingress_id))
        return _Lease(self._serve_channel)

    async def _serve_channel(self, address_out: asyncio.Future[Any]) -> None:
        events = EventServer("127.0.0.1")
        await events.start()
        address, connected = events.expect()
        address_out.set_result(address)
        _, writer = await asyncio.wait_for(connected, 10)
        try:
            while True:
                item = await self.queue().get()
                if isinstance(item, BaseException):
                    writer.close()  # no END: the replica died
                    raise item
                if item is None:
                    await send_end(writer)
                    return
                await send_data(writer, item)
        finally:
            writer.close()
            events.close()


class _Lease:
    """The subscribe call as Serve runs it: the replica drives the generator on its own
    (not as the caller reads), so the channel is served by a task; the call yields the
    address, then ends when the channel does (raising what broke it)."""

    def __init__(self, serve: Callable[[asyncio.Future[Any]], Any]) -> None:
        self._address: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._task = asyncio.ensure_future(serve(self._address))
        self._sent_address = False

    def __aiter__(self) -> _Lease:
        return self

    def cancel(self) -> None:
        self._task.cancel()
        self._task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def __anext__(self) -> Any:
        if not self._sent_address:
            self._sent_address = True
            return await self._address
        await self._task
        raise StopAsyncIteration
