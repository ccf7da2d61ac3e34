"""The bytes of an ingress's subscription: one TCP connection from the ingress to its
controller replica, alongside the Serve call that leases it.

An ingress subscribes to a controller replica with a Serve streaming call
(`ESPController.subscribe`): Serve counts it as an ongoing request, routes it to the
pinned replica, cancels it when the ingress goes away and waits for it before draining
the replica. That call now yields ONE item, the address of this channel and a token; the
per-step items ({request_id: [TokenEvent, ...]}) travel on the socket, and the call ends
when the channel does. A Ray streaming item costs both processes a core worker round
(task return, gRPC, the next-item thread) per engine step; a frame on a socket costs a
pickle and a write.

Frames (controller -> ingress): header (kind u8, length u32) + payload
    DATA: a pickled `Ready` dict
    END:  the subscription ended idle (no payload); the connection closes after it
A connection that closes without END is a failure (the replica died): the ingress fails
the requests pending on it.

`EventServer` (controller) listens on its node's address; each subscription gets a fresh
32-byte token, good for one connection, which the ingress presents first.

Pure asyncio, no Ray: tests/app/test_event_channel.py runs both ends in one loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import secrets
import socket
import struct
from collections.abc import AsyncIterator
from typing import Any

FRAME_HEADER = struct.Struct("!BI")  # kind, payload length
DATA, END = 1, 2
TOKEN_BYTES = 32
TOKEN_WAIT_S = 10.0  # a connection that does not present a token within this is closed
MAX_FRAME_BYTES = 1 << 30  # refuses garbage lengths only


class SubscriptionLost(ConnectionError):
    """The controller's end closed without ending the subscription (its replica died)."""


@dataclasses.dataclass(frozen=True)
class ChannelAddress:
    """What `subscribe` yields: where to connect, and the one-use token to present."""

    host: str
    port: int
    token: bytes


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class EventServer:
    """The controller's listening socket; `expect()` registers one subscription."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._server: asyncio.base_events.Server | None = None
        self._expected: dict[bytes, asyncio.Future[Connection]] = {}

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._on_connect, self.host, 0)

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    def expect(self) -> tuple[ChannelAddress, asyncio.Future[Connection]]:
        """A fresh token and the future of the connection that will present it."""
        token = secrets.token_bytes(TOKEN_BYTES)
        future: asyncio.Future[Connection] = asyncio.get_running_loop().create_future()
        self._expected[token] = future
        return ChannelAddress(self.host, self.port, token), future

    def forget(self, address: ChannelAddress) -> None:
        """The subscription ended before its connection came (or after): the token dies."""
        self._expected.pop(address.token, None)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            token = await asyncio.wait_for(reader.readexactly(TOKEN_BYTES), TOKEN_WAIT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        future = self._expected.pop(token, None)
        if future is None or future.done():
            writer.close()  # unknown, used or expired token
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        future.set_result((reader, writer))

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for future in self._expected.values():
            future.cancel()
        self._expected.clear()


async def send_data(writer: asyncio.StreamWriter, ready: Any) -> None:
    payload = pickle.dumps(ready, protocol=pickle.HIGHEST_PROTOCOL)
    writer.write(FRAME_HEADER.pack(DATA, len(payload)) + payload)
    await writer.drain()  # raises once the ingress is gone; waits if it reads slowly


async def send_end(writer: asyncio.StreamWriter) -> None:
    writer.write(FRAME_HEADER.pack(END, 0))
    await writer.drain()


async def receive(address: ChannelAddress, timeout_s: float = 30.0) -> AsyncIterator[Any]:
    """The ingress's end: connect, present the token, yield each DATA payload until END;
    `SubscriptionLost` if the connection closes first."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(address.host, address.port), timeout_s)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(address.token)
        while True:
            try:
                kind, length = FRAME_HEADER.unpack(await reader.readexactly(FRAME_HEADER.size))
                if length > MAX_FRAME_BYTES:
                    raise SubscriptionLost(f"a {length}-byte event frame")
                payload = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, ConnectionError) as err:
                raise SubscriptionLost(f"the controller's event channel closed: {err!r}") from err
            if kind == END:
                return
            yield pickle.loads(payload)
    finally:
        writer.close()
