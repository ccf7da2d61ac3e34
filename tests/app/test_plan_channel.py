"""The controller <-> instance plan channel (app/plan_channel.py): both ends in this
process, over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import threading
import time

import pytest

from esp_serve.app.plan_channel import (
    PLAN_HEADER,
    TOKEN_BYTES,
    ChannelClosed,
    InstanceFailed,
    PlanClient,
    PlanServer,
)


class Recorder:
    """A stand-in instance runner: records what it ran, answers with the plan reversed,
    raises for a plan that says so, and can be held to keep sub-plans queued."""

    def __init__(self) -> None:
        self.ran: list[tuple[int, int, bytes]] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, plan: bytes, generation: int, seq: int) -> bytes:
        self.gate.wait(10)
        self.ran.append((generation, seq, plan))
        if plan == b"boom":
            raise ValueError("bad sub-plan")
        return plan[::-1]


@contextlib.asynccontextmanager
async def served():
    """A PlanServer running a Recorder, and a client connected with its token."""
    runner = Recorder()
    token = os.urandom(TOKEN_BYTES)
    server = PlanServer("127.0.0.1", token, runner)
    client = await PlanClient.connect(server.address, token)
    try:
        yield runner, server, token, client
    finally:
        client.close()
        server.close()


def test_answers_come_back_in_order_and_a_failing_sub_plan_fails_alone():
    async def main() -> None:
        async with served() as (runner, _, _, client):
            runner.gate.clear()  # all five are sent before the first runs
            plans = [b"ab", b"boom", b"", b"x" * 300_000, b"cd"]
            futures = [client.send(p, 3, seq) for seq, p in enumerate(plans)]
            runner.gate.set()
            answers = await asyncio.gather(*futures, return_exceptions=True)
        assert answers[0] == b"ba"
        assert isinstance(answers[1], InstanceFailed) and "ValueError: bad sub-plan" in str(answers[1])
        assert answers[2] == b"" and answers[3] == b"x" * 300_000 and answers[4] == b"dc"
        assert [(g, s) for g, s, _ in runner.ran] == [(3, 0), (3, 1), (3, 2), (3, 3), (3, 4)]

    asyncio.run(main())


def test_a_result_given_up_on_is_dropped_and_the_next_one_still_matches():
    """The controller's watchdog cancels its wait: the late answer must not be handed to
    the sub-plan sent after it."""

    async def main() -> None:
        async with served() as (runner, _, _, client):
            runner.gate.clear()
            first = client.send(b"first", 1, 0)
            second = client.send(b"second", 1, 1)
            first.cancel()
            runner.gate.set()
            assert await asyncio.wait_for(second, 10) == b"dnoces"

    asyncio.run(main())


def test_a_dead_instance_fails_every_pending_sub_plan_with_channel_closed():
    async def main() -> None:
        token = os.urandom(TOKEN_BYTES)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client_task = asyncio.ensure_future(PlanClient.connect(listener.getsockname(), token))
            conn, _ = await asyncio.get_running_loop().run_in_executor(None, listener.accept)
            client = await client_task
            pending = [client.send(b"p", 0, seq) for seq in range(3)]
            await asyncio.sleep(0.05)
            conn.close()  # the instance's process is gone
            for future in pending:
                with pytest.raises(ChannelClosed):
                    await asyncio.wait_for(future, 10)
            with pytest.raises(ChannelClosed):  # and so is every later send
                await client.send(b"later", 0, 3)

    asyncio.run(main())


def test_a_connection_without_the_token_runs_nothing():
    runner = Recorder()
    server = PlanServer("127.0.0.1", os.urandom(TOKEN_BYTES), runner)
    with socket.create_connection(server.address, timeout=5) as sock:
        plan = pickle.dumps("import os")
        sock.sendall(os.urandom(TOKEN_BYTES) + PLAN_HEADER.pack(0, 0, len(plan)) + plan)
        sock.settimeout(5)
        try:  # closed without an answer (a reset: the frame was left unread)
            assert sock.recv(16) == b""
        except ConnectionResetError:
            pass
    time.sleep(0.05)
    assert runner.ran == []
    server.close()


def test_a_controller_that_reconnects_is_served_again():
    async def main() -> None:
        async with served() as (_, server, token, old):
            assert await old.send(b"1", 0, 0) == b"1"
            old.close()
            new = await PlanClient.connect(server.address, token)
            assert await asyncio.wait_for(new.send(b"21", 1, 0), 10) == b"12"
            new.close()

    asyncio.run(main())


def test_a_silent_connection_does_not_keep_the_controller_out(monkeypatch):
    """A connection that never sends its token (a port scanner) is dropped after
    TOKEN_WAIT_S; the controller's connection is served after it."""
    from esp_serve.app import plan_channel

    monkeypatch.setattr(plan_channel, "TOKEN_WAIT_S", 0.3)

    async def main() -> None:
        runner = Recorder()
        token = os.urandom(TOKEN_BYTES)
        server = PlanServer("127.0.0.1", token, runner)
        with socket.create_connection(server.address, timeout=5):  # connects, says nothing
            await asyncio.sleep(0.05)
            client = await PlanClient.connect(server.address, token)
            assert await asyncio.wait_for(client.send(b"ok", 0, 0), 10) == b"ko"
        client.close()
        server.close()

    asyncio.run(main())
