"""The subscription's event channel (app/event_channel.py): both ends in one event loop,
over real loopback sockets."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from esp_serve.app.event_channel import EventServer, SubscriptionLost, receive, send_data, send_end
from esp_serve.app.protocol import TokenEvent


async def _collect(address) -> list:
    return [item async for item in receive(address)]


def test_items_arrive_in_order_and_end_cleanly():
    async def main() -> None:
        server = EventServer("127.0.0.1")
        await server.start()
        address, connected = server.expect()
        reading = asyncio.ensure_future(_collect(address))
        _, writer = await asyncio.wait_for(connected, 5)
        items = [{"a": [TokenEvent(k)]} for k in range(50)] + [{"b": [TokenEvent(1, finish_reason="stop")]}]
        items.append({"big": [TokenEvent(7)] * 20_000})  # larger than a socket buffer
        for item in items:
            await send_data(writer, item)
        await send_end(writer)
        assert await asyncio.wait_for(reading, 5) == items
        server.close()

    asyncio.run(main())


def test_a_close_without_end_is_a_lost_subscription():
    async def main() -> None:
        server = EventServer("127.0.0.1")
        await server.start()
        address, connected = server.expect()
        got: list = []

        async def read() -> None:
            async for item in receive(address):
                got.append(item)

        reading = asyncio.ensure_future(read())
        _, writer = await asyncio.wait_for(connected, 5)
        await send_data(writer, {"a": [TokenEvent(3)]})
        writer.close()  # the replica died
        with pytest.raises(SubscriptionLost):
            await asyncio.wait_for(reading, 5)
        assert got == [{"a": [TokenEvent(3)]}]
        server.close()

    asyncio.run(main())


def test_a_token_is_good_for_one_connection_only_and_a_wrong_one_gets_nothing():
    async def main() -> None:
        server = EventServer("127.0.0.1")
        await server.start()
        address, connected = server.expect()
        wrong = dataclasses.replace(address, token=bytes(32))
        with pytest.raises(SubscriptionLost):  # closed at once, nothing delivered
            await asyncio.wait_for(_collect(wrong), 5)
        assert not connected.done()
        first = asyncio.ensure_future(_collect(address))
        _, writer = await asyncio.wait_for(connected, 5)
        with pytest.raises(SubscriptionLost):  # the same token again
            await asyncio.wait_for(_collect(address), 5)
        await send_end(writer)
        assert await asyncio.wait_for(first, 5) == []
        server.close()

    asyncio.run(main())


def test_a_forgotten_subscription_refuses_its_late_connection():
    async def main() -> None:
        server = EventServer("127.0.0.1")
        await server.start()
        address, connected = server.expect()
        server.forget(address)  # the call ended before the ingress connected
        with pytest.raises(SubscriptionLost):
            await asyncio.wait_for(_collect(address), 5)
        assert not connected.done()
        server.close()

    asyncio.run(main())
