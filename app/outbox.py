"""The controller's side of the group-wide token stream: one `Outbox` per ingress replica.

The engine loop routes each request's events into the outbox of the ingress that
submitted it (`Outboxes.emit`); that ingress's one `subscribe` stream (app/controller.py)
takes everything ready at once (`Outbox.take`) and sends it as ONE item: per engine step
one message per ingress, not one per token per request. A message costs both ends (Ray
serializes, Serve wraps and routes each stream item), so that is what brings the
per-token host cost down at many streams.

Pure asyncio (no Ray): unit-testable alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from esp_serve.app.protocol import TokenEvent

# what one subscription item carries: request id -> its events since the last item
Ready = dict[str, list[TokenEvent]]


class Outbox:
    """One ingress's unfinished requests on this group, and the events not yet sent."""

    def __init__(self) -> None:
        self.requests: set[str] = set()
        self.ready: Ready = {}
        self.changed = asyncio.Event()
        self._wake_queued = False

    def wake_soon(self) -> None:
        """Wake the subscription on the loop's next turn, not now: the engine loop, woken
        in the same step, then plans and dispatches the next step before the events of
        this one are serialized and sent (the send is off the step's critical path)."""
        if not self._wake_queued:
            self._wake_queued = True
            asyncio.get_running_loop().call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_queued = False
        self.changed.set()

    def take(self) -> Ready:
        ready, self.ready = self.ready, {}
        self.changed.clear()
        return ready

    async def next_ready(self, idle_s: float) -> Ready | None:
        """The events ready next; None when the ingress has had no unfinished request and
        nothing to receive for `idle_s` (its subscription may end: Serve then sees no
        ongoing call on this replica and can drain it)."""
        while not self.ready:
            if self.requests:
                await self.changed.wait()
            else:
                try:
                    await asyncio.wait_for(self.changed.wait(), idle_s)
                except asyncio.TimeoutError:
                    if not self.requests and not self.ready:
                        return None
            self.changed.clear()
        return self.take()


class Outboxes:
    """The outboxes of every ingress replica with requests on this group."""

    def __init__(self) -> None:
        self._by_ingress: dict[str, Outbox] = {}
        self._owner: dict[str, Outbox] = {}  # unfinished request -> its ingress's outbox

    def __len__(self) -> int:
        """Unfinished requests."""
        return len(self._owner)

    def __contains__(self, rid: object) -> bool:
        return rid in self._owner

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._owner))

    def box(self, ingress_id: str) -> Outbox:
        box = self._by_ingress.get(ingress_id)
        if box is None:
            box = self._by_ingress[ingress_id] = Outbox()
        return box

    def add(self, rid: str, ingress_id: str) -> None:
        box = self.box(ingress_id)
        box.requests.add(rid)
        self._owner[rid] = box

    def emit(self, rid: str, event: TokenEvent) -> bool:
        """Queue `event` for its request's ingress; a finishing event ends the request
        here. False when the request is unknown (cancelled meanwhile)."""
        box = self._owner.get(rid)
        if box is None:
            return False
        box.ready.setdefault(rid, []).append(event)
        box.wake_soon()
        if event.finish_reason is not None:  # its events stay until they are taken
            self._end(rid)
        return True

    def discard(self, rid: str) -> bool:
        """Forget an unfinished request (cancelled: its unsent events go too); False if
        it was not unfinished."""
        box = self._end(rid)
        if box is None:
            return False
        box.ready.pop(rid, None)
        return True

    def _end(self, rid: str) -> Outbox | None:
        box = self._owner.pop(rid, None)
        if box is not None:
            box.requests.discard(rid)
            box.changed.set()  # an idle subscription may end now
        return box

    def requests_of(self, ingress_id: str) -> list[str]:
        box = self._by_ingress.get(ingress_id)
        return list(box.requests) if box is not None else []

    def drop_if_idle(self, ingress_id: str) -> None:
        """Forget an ingress's outbox once it holds nothing."""
        box = self._by_ingress.get(ingress_id)
        if box is not None and not box.requests and not box.ready:
            del self._by_ingress[ingress_id]
