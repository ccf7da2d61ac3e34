"""The group-wide token stream (app/group_stream.py, app/outbox.py, the controller's
submit/subscribe/cancel): many streams interleaved over one subscription each get their
own tokens, a cancel mid-stream frees the KV, and a broken subscription fails every
request pending on it with an error (never a silent hang)."""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.exceptions import RayActorError

from esp_core.sched.plan import SamplingParams
from esp_serve.app.group_stream import GroupStreams
from esp_serve.app.protocol import GenerateRequest, TokenEvent
from esp_serve.app.streaming import GROUP_STOPPED
from tests.support.controller_handle import REPLICA, ScriptedController

MODEL = "builtin"


def _request(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, (1, 2, 3), SamplingParams(max_tokens=4))


def test_one_subscription_fans_out_and_a_broken_one_fails_pending_requests():
    async def scenario() -> None:
        handle = ScriptedController()
        groups = GroupStreams(handle)
        (_, a), (_, b) = await asyncio.gather(groups.submit(_request("a")), groups.submit(_request("b")))
        assert {r.ingress_id for r in handle.requests} == {groups.ingress_id}
        await handle.queue().put({"a": [TokenEvent(7)], "b": [TokenEvent(8), TokenEvent(9)]})
        assert [e.token_id for e in await a.__anext__()] == [7]
        assert [e.token_id for e in await b.__anext__()] == [8, 9]
        assert handle.subscriptions == [(REPLICA, groups.ingress_id)]  # one for both
        await handle.queue().put({"a": [TokenEvent(5, finish_reason="length")]})
        assert (await a.__anext__())[-1].finish_reason == "length"
        with pytest.raises(StopAsyncIteration):
            await a.__anext__()
        await handle.queue().put(RayActorError())  # the replica died: b is still pending
        (ended,) = await asyncio.wait_for(b.__anext__(), 5)
        assert (ended.finish_reason, ended.error) == ("error", GROUP_STOPPED)
        b.cancel()  # after its end: nothing more to cancel
        assert handle.cancelled == [(REPLICA, "b")]  # in case the replica still runs it

    asyncio.run(scenario())


def test_cancel_goes_to_the_admitting_replica_once():
    async def scenario() -> None:
        handle = ScriptedController()
        groups = GroupStreams(handle)
        _, stream = await groups.submit(_request("c"))
        stream.cancel()
        stream.cancel()
        await asyncio.sleep(0)  # (sent on the loop's next turn, outside this task's context)
        assert handle.cancelled == [(REPLICA, "c")]
        await handle.queue().put({"c": [TokenEvent(1)]})  # in flight before the cancel: dropped
        await handle.queue().put(None)
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(stream.__anext__(), 5)

    asyncio.run(scenario())


# ---------------------------------------------------------------- live, over HTTP


@pytest.mark.slow
def test_many_concurrent_streams_interleaved_each_get_their_own_tokens(server):
    prompts = [f"stream {k}: " + "abcdefgh"[k % 8] * (k + 1) for k in range(24)]
    common = {"model": MODEL, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    with server.http() as c:
        alone = [c.post("/v1/completions", json={**common, "prompt": p}).json() for p in prompts[:4]]

    async def stream_one(client, prompt: str) -> str:
        text, done = [], False
        body = {**common, "prompt": prompt, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[len("data: ") :])
                    assert "error" not in chunk, chunk
                    text.extend(ch["text"] for ch in chunk["choices"])
        assert done
        return "".join(text)

    async def all_streams() -> list[str]:
        async with server.async_http() as client:
            return await asyncio.gather(*(stream_one(client, p) for p in prompts))

    texts = asyncio.run(all_streams())
    assert texts[:4] == [a["choices"][0]["text"] for a in alone]  # nobody got another's tokens
    assert all(len(t) > 0 for t in texts)
    server.wait_pool_free()


@pytest.mark.slow
def test_cancel_mid_stream_frees_the_kv(server):
    body = {"model": MODEL, "prompt": "cancel me", "max_tokens": 900, "ignore_eos": True, "stream": True}

    async def read_some_then_hang_up() -> int:
        seen = 0
        async with server.async_http() as client, client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                    if seen >= 5:
                        break  # leaving the block closes the connection mid-stream
        return seen

    assert asyncio.run(read_some_then_hang_up()) >= 5
    st = server.wait_pool_free(timeout=30)
    assert st["running"] == 0 and st["waiting"] == 0
