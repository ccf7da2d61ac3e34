"""The ingress's side of the group-wide token stream (app/protocol.py has the calls).

`GroupStreams.submit` sends a request to the controller deployment (routed by KV headroom
and prefix affinity, app/routing.py) and returns its `RequestStream`; the first admitted
request on a controller replica starts this ingress's ONE subscription to that replica
(pinned to it), whose items - every request's new events of one engine step, on the
event channel the call names (app/event_channel.py) - are fanned out here to the request
streams. A `RequestStream` reads like the per-request controller
stream it replaces (app/streaming.py consumes it): it yields lists of `TokenEvent` and
`cancel()` aborts the request on its replica.

No request is lost silently: when a subscription breaks (its replica died or was
replaced, or an item could not be read), every request pending on it ends with an error
event (app/streaming.py:stream_error says which) and is cancelled on the replica, in case
the replica still runs it.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import uuid
from typing import Any

from esp_serve.app.event_channel import ChannelAddress, SubscriptionLost, receive
from esp_serve.app.protocol import Admission, GenerateRequest, Pin, TokenEvent
from esp_serve.app.streaming import stream_error

log = logging.getLogger("ray.serve")

# a broken event channel waits this long for the subscription call's own error (a dead
# replica's RayActorError, or what the call raised) before reporting it as lost
LEASE_ERROR_WAIT_S = 2.0


async def _drain(lease: Any) -> None:
    async for _ in lease:
        pass


async def _call_error(lease: Any, lost: SubscriptionLost) -> Exception:
    """The event channel broke: the subscription call's own error (a dead replica's
    RayActorError, or what the call raised) if it comes within LEASE_ERROR_WAIT_S,
    else `lost`."""
    try:
        await asyncio.wait_for(_drain(lease), LEASE_ERROR_WAIT_S)
    except asyncio.TimeoutError:
        return lost
    except Exception as err:  # noqa: BLE001 - the cause, whatever it is
        return err
    return lost


class RequestStream:
    """One request's events as its subscription delivers them: `async for events in it`
    gives every event ready at each wake-up (a list), the last carrying finish_reason."""

    def __init__(self, request_id: str, owner: GroupStreams) -> None:
        self.request_id = request_id
        self.replica_id = ""  # the controller replica that admitted it
        self.ended = False  # its last event arrived, or it was cancelled
        self._owner = owner
        self._ready: list[TokenEvent] = []
        self._waiter: asyncio.Future[None] | None = None

    def push(self, events: list[TokenEvent]) -> None:
        self._ready.extend(events)
        if events and events[-1].finish_reason is not None:
            self.ended = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> list[TokenEvent]:
        while not self._ready:
            if self.ended:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        ready, self._ready = self._ready, []
        return ready

    def cancel(self) -> None:
        """Abort the request on its replica (frees its KV); a no-op once it ended."""
        self._owner.cancel(self)


class GroupStreams:
    """This ingress replica's subscriptions, one per controller replica, and the streams
    of its unfinished requests."""

    def __init__(self, controller: Any) -> None:
        self.controller = controller
        self._subscriber = controller.options(stream=True)
        self.ingress_id = uuid.uuid4().hex
        self._streams: dict[str, RequestStream] = {}  # unfinished requests
        self._on_replica: dict[str, set[str]] = {}  # replica -> its unfinished requests
        self._subscriptions: dict[str, asyncio.Task[None]] = {}

    async def submit(self, request: GenerateRequest) -> tuple[Admission, RequestStream]:
        """Submit a request and wait for its admission. Registered before the submit is
        sent, so that no event can arrive for a request not known here yet; cancelled
        while waiting (admission timeout), the request is cancelled once admitted."""
        rid = request.request_id
        stream = self._streams[rid] = RequestStream(rid, self)
        response = self.controller.submit.remote(dataclasses.replace(request, ingress_id=self.ingress_id))
        try:
            admission: Admission = await response
        except BaseException:
            self._streams.pop(rid, None)
            stream.ended = True
            asyncio.ensure_future(self._cancel_when_admitted(rid, response))
            raise
        if not admission.accepted:
            self._streams.pop(rid, None)
            stream.ended = True
            return admission, stream
        stream.replica_id = admission.replica_id
        self._on_replica.setdefault(admission.replica_id, set()).add(rid)
        if admission.replica_id not in self._subscriptions:
            self._subscribe(admission.replica_id)
        return admission, stream

    async def _cancel_when_admitted(self, rid: str, response: Any) -> None:
        try:
            admission: Admission = await response
        except Exception:  # noqa: BLE001 - never admitted
            return
        if admission.accepted:
            self._send_cancel(admission.replica_id, rid)

    def cancel(self, stream: RequestStream) -> None:
        if stream.ended:
            return
        stream.ended = True
        self._release(stream)
        if stream.replica_id:
            self._send_cancel(stream.replica_id, stream.request_id)

    def _send_cancel(self, replica_id: str, rid: str) -> None:
        """`controller.cancel`, issued outside the calling request's context: a client's
        disconnect cancels its ingress request, and Serve then cancels that request's
        child calls still pending assignment -- a cancel made from its cleanup would be
        one of them, and the generation would run on to its end."""
        send = functools.partial(self.controller.cancel.remote, Pin(replica_id), rid)
        try:
            asyncio.get_running_loop().call_soon(send, context=contextvars.Context())
        except RuntimeError:  # no running loop: no request context either
            send()

    def _release(self, stream: RequestStream) -> None:
        self._streams.pop(stream.request_id, None)
        self._on_replica.get(stream.replica_id, set()).discard(stream.request_id)

    def _subscribe(self, replica_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._follow(replica_id))
        self._subscriptions[replica_id] = task

    async def _follow(self, replica_id: str) -> None:
        """Fan one subscription's items out to the request streams until it ends: the
        Serve call yields the address of its event channel (app/event_channel.py), whose
        frames carry the items; the call ends after the channel's END."""
        error: Exception | None = None
        lease = None
        try:
            lease = self._subscriber.subscribe.remote(Pin(replica_id), self.ingress_id)
            address: ChannelAddress = await lease.__anext__()
            try:
                async for ready in receive(address):
                    self._deliver(ready)
            except SubscriptionLost as lost:
                raise await _call_error(lease, lost) from lost
            await _drain(lease)  # ends with the controller's side of the call
            lease = None
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - the replica died or is gone
            error = err
        finally:
            self._subscriptions.pop(replica_id, None)
            if lease is not None:  # the channel broke first: end the call too (if the
                lease.cancel()  # replica still runs it, it aborts this ingress's requests)
        pending = [self._streams[r] for r in self._on_replica.get(replica_id, ()) if r in self._streams]
        if not pending:
            self._on_replica.pop(replica_id, None)
        elif error is None:  # it ended idle just as new requests came: follow them
            self._subscribe(replica_id)
        else:
            log.error("subscription to controller replica %s failed: %r", replica_id, error)
            message = stream_error(error)
            for stream in pending:
                self.cancel(stream)
                stream.push([TokenEvent(None, finish_reason="error", error=message)])

    def _deliver(self, ready: dict[str, list[TokenEvent]]) -> None:
        for rid, events in ready.items():
            stream = self._streams.get(rid)
            if stream is None:
                continue  # cancelled meanwhile
            stream.push(events)
            if stream.ended:
                self._release(stream)
