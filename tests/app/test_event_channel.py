"""The subscription's event channel (app/event_channel.py): both ends in one event loop,
over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

import pytest

from esp_serve.app.event_channel import EventServer, SubscriptionLost, receive, send_data, send_end
from esp_serve.app.protocol import TokenEvent


@contextlib.asynccontextmanager
async def subscription():
    """A started EventServer with one subscription expected: (server, address, the
    future of its connection)."""
    server = EventServer("127.0.0.1")
    await server.start()
    address, connected = server.expect()
    try:
        yield server, address, connected
    finally:
        server.close()


async def _read_into(got: list, address) -> None:
    async for item in receive(address):
        got.append(item)


async def _collect(address) -> list:
    got: list = []
    await _read_into(got, address)
    return got


def test_items_arrive_in_order_and_end_cleanly():
    async def main() -> None:
        async with subscription() as (_, address, connected):
            reading = asyncio.ensure_future(_collect(address))
            _, writer = await asyncio.wait_for(connected, 5)
            items = [{"a": [TokenEvent(k)]} for k in range(50)] + [
                {"b": [TokenEvent(1, finish_reason="stop")]}
            ]
            items.append({"big": [TokenEvent(7)] * 20_000})  # larger than a socket buffer
            for item in items:
                await send_data(writer, item)
            await send_end(writer)
            assert await asyncio.wait_for(reading, 5) == items

    asyncio.run(main())


def test_a_close_without_end_is_a_lost_subscription():
    async def main() -> None:
        async with subscription() as (_, address, connected):
            got: list = []
            reading = asyncio.ensure_future(_read_into(got, address))
            _, writer = await asyncio.wait_for(connected, 5)
            await send_data(writer, {"a": [TokenEvent(3)]})
            writer.close()  # the replica died
            with pytest.raises(SubscriptionLost):
                await asyncio.wait_for(reading, 5)
            assert got == [{"a": [TokenEvent(3)]}]

    asyncio.run(main())


def test_a_token_is_good_for_one_connection_only_and_a_wrong_one_gets_nothing():
    async def main() -> None:
        async with subscription() as (_, address, connected):
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

    asyncio.run(main())


def test_a_forgotten_subscription_refuses_its_late_connection():
    async def main() -> None:
        async with subscription() as (server, address, connected):
            server.forget(address)  # the call ended before the ingress connected
            with pytest.raises(SubscriptionLost):
                await asyncio.wait_for(_collect(address), 5)
            assert not connected.done()

    asyncio.run(main())
