"""The controller's per-ingress outboxes (app/outbox.py): a step's events of several
requests leave as one item; a finished request's last events are still sent; a cancelled
request's unsent events are dropped; a subscription with nothing pending ends idle."""

from __future__ import annotations

import asyncio

from esp_serve.app.outbox import Outboxes
from esp_serve.app.protocol import TokenEvent


def test_one_item_per_wake_finish_kept_cancel_dropped_idle_end():
    async def scenario() -> None:
        boxes = Outboxes()
        boxes.add("a", "ingress-1")
        boxes.add("b", "ingress-1")
        boxes.add("c", "ingress-2")
        box = boxes.box("ingress-1")
        assert boxes.emit("a", TokenEvent(1)) and boxes.emit("b", TokenEvent(2))
        boxes.emit("a", TokenEvent(3, finish_reason="length"))
        boxes.emit("c", TokenEvent(9))  # another ingress's request: not in this item
        item = await asyncio.wait_for(box.next_ready(idle_s=5), 5)
        assert {rid: [e.token_id for e in evs] for rid, evs in item.items()} == {"a": [1, 3], "b": [2]}
        assert "a" not in boxes and len(boxes) == 2  # finished: gone once its end is queued
        assert not boxes.emit("a", TokenEvent(4))  # late events of a finished request
        boxes.emit("b", TokenEvent(5))
        assert boxes.discard("b") and not boxes.discard("b")  # cancelled: its events go too
        assert await asyncio.wait_for(box.next_ready(idle_s=0.05), 5) is None  # idle: ends
        boxes.drop_if_idle("ingress-1")
        assert boxes.requests_of("ingress-1") == [] and boxes.requests_of("ingress-2") == ["c"]

    asyncio.run(scenario())
