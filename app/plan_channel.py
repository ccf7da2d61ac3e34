"""The per-step path between the controller and an instance: one TCP connection per rank.

Every engine step sends each instance it concerns one pickled sub-plan and waits for its
pickled results. As a Ray actor call that costs both processes far more than the bytes
(the call's task spec, its gRPC submission and reply, Ray's worker threads, the return
object): measured at one stream, the instances' Ray machinery took more CPU per token
than their forward pass. Here a sub-plan is one length-prefixed frame on a socket the
instance serves from a thread, and its results one frame back, in order (the instance
runs sub-plans in the order they arrive, so the n-th answer is the n-th sub-plan's).
Ray keeps everything else: starting, placing, resetting and killing instances, the world
group's rendezvous, and health checks.

Frames:
    controller -> instance: header (generation u64, seq u64, length u32) + sub-plan bytes
    instance -> controller: header (status u8, length u32) + results bytes (status OK) or
                            a UTF-8 error message (status FAILED: the sub-plan raised)

The instance listens on its node's address, on a free port, and accepts only a
connection that first presents the token the controller gave it over Ray
(`PlanServer`): pickles are accepted from the controller that started it and nobody else.
A closed connection means the instance process is gone (`ChannelClosed`: the controller
rebuilds the group as for a dead actor).

Plain sockets and asyncio, no Ray: tests/app/test_plan_channel.py runs both ends in one
process.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger("esp_serve.plan_channel")

PLAN_HEADER = struct.Struct("!QQI")  # generation, seq, payload length
RESULT_HEADER = struct.Struct("!BI")  # status, payload length
OK, FAILED = 0, 1
TOKEN_BYTES = 32
# a connection must present its token within this: one that connects and says nothing (a
# port scanner) would otherwise hold the only serving thread
TOKEN_WAIT_S = 10.0
# a sub-plan is a few KB per step; a long prompt's token ids make it larger. The cap
# only refuses garbage lengths, far above any real plan (a 1M-token prompt is ~5 MB).
MAX_FRAME_BYTES = 1 << 30


class ChannelClosed(ConnectionError):
    """The instance's end of the channel went away (its process died or it closed)."""


class InstanceFailed(RuntimeError):
    """The instance raised while running a sub-plan (its message says what)."""


# ----------------------------------------------------------------------- instance end
class PlanServer:
    """The instance's end: a listening socket and one thread that serves the controller's
    connection, running `run(plan_bytes, generation, seq) -> results bytes` for each
    sub-plan in arrival order."""

    def __init__(self, host: str, token: bytes, run: Callable[[bytes, int, int], bytes]) -> None:
        assert len(token) == TOKEN_BYTES, "the controller's token is 32 random bytes"
        self._token = token
        self._run = run
        self._listener = socket.create_server((host, 0))
        self.address: tuple[str, int] = (host, self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._serve, name="plan-channel", daemon=True)
        self._thread.start()

    def accepts(self, token: bytes) -> bool:
        return hmac.compare_digest(token, self._token)

    def close(self) -> None:
        self._listener.close()

    def _serve(self) -> None:
        """Accept connections one after the other (a controller that reconnects replaces
        its old connection); anything wrong with a connection only closes it."""
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    conn.settimeout(TOKEN_WAIT_S)
                    token = _recv_exact(conn, TOKEN_BYTES)
                    conn.settimeout(None)  # then a sub-plan may take as long as it takes
                    if hmac.compare_digest(token, self._token):
                        self._serve_connection(conn)
                    else:
                        log.warning("plan channel: a connection without the controller's token, closed")
                except (ConnectionError, OSError) as err:
                    log.info("plan channel connection closed: %r", err)

    def _serve_connection(self, conn: socket.socket) -> None:
        while True:
            generation, seq, length = PLAN_HEADER.unpack(_recv_exact(conn, PLAN_HEADER.size))
            if length > MAX_FRAME_BYTES:
                raise ConnectionError(f"a {length}-byte sub-plan frame")
            plan_bytes = _recv_exact(conn, length)
            try:
                status, payload = OK, self._run(plan_bytes, generation, seq)
            except Exception as err:  # the sub-plan failed: the controller fails its batches
                log.exception("sub-plan %d of generation %d failed", seq, generation)
                status, payload = FAILED, f"{type(err).__name__}: {err}".encode()
            conn.sendall(RESULT_HEADER.pack(status, len(payload)) + payload)


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = conn.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the plan channel")
        got += n
    return bytes(buf)


# --------------------------------------------------------------------- controller end
class PlanClient:
    """The controller's end for one rank: `send` queues a sub-plan and returns a future of
    its results bytes; answers come back in the order sent. Every pending future fails
    with `ChannelClosed` when the connection breaks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._closed: BaseException | None = None
        self._reader_task = asyncio.get_running_loop().create_task(self._read_answers())

    @classmethod
    async def connect(cls, address: tuple[str, int], token: bytes, timeout_s: float = 30.0) -> PlanClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout_s)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(token)
        return cls(reader, writer)

    def send(self, plan_bytes: bytes, generation: int, seq: int) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self._closed is not None:
            future.set_exception(ChannelClosed(f"plan channel closed: {self._closed!r}"))
            return future
        # one write of header and payload: the transport buffers what the socket does
        # not take at once (a large prefill plan), so this never blocks the loop
        self._writer.write(PLAN_HEADER.pack(generation, seq, len(plan_bytes)) + plan_bytes)
        self._pending.append(future)
        return future

    async def _read_answers(self) -> None:
        try:
            while True:
                status, length = RESULT_HEADER.unpack(await self._reader.readexactly(RESULT_HEADER.size))
                payload = await self._reader.readexactly(length)
                future = self._pending.popleft()
                if future.done():  # its waiter gave up (watchdog): the answer is dropped
                    continue
                if status == OK:
                    future.set_result(payload)
                else:
                    future.set_exception(InstanceFailed(payload.decode(errors="replace")))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, IndexError) as err:
            self._fail_pending(err)
        except asyncio.CancelledError:
            self._fail_pending(ChannelClosed("closed by the controller"))
            raise

    def _fail_pending(self, err: BaseException) -> None:
        self._closed = err
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(ChannelClosed(f"plan channel closed: {err!r}"))
        self._writer.close()

    def close(self) -> None:
        self._reader_task.cancel()
        self._writer.close()
