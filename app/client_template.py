"""Rendering a chat template the client sent (`chat_template_kwargs.chat_template`, only
when `limits.allow_client_chat_template` is on).

The sandbox keeps a template from escaping, not from working: two nested `range` loops
or a string doubled in a loop run for as long as they like. So a client's template
renders in a forked child process with a wall-clock limit, an address-space limit and a
cap on the rendered text; past any of them the child is killed and the request refused.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import resource
from collections.abc import Callable
from typing import Any

from esp_serve.app.errors import APIError, bad_request

# headroom over the parent's address space that the child may allocate
_CHILD_EXTRA_BYTES = 1 << 30


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _child(render: Callable[[], str], max_chars: int, conn: Any) -> None:
    try:
        size = _address_space()
        if size:
            resource.setrlimit(resource.RLIMIT_AS, (size + _CHILD_EXTRA_BYTES, size + _CHILD_EXTRA_BYTES))
        text = render()
        if len(text) > max_chars:
            conn.send(("too_long", len(text)))
        else:
            conn.send(("ok", text))
    except MemoryError:
        conn.send(("error", "the chat template used too much memory"))
    except Exception as err:  # noqa: BLE001 - the template's own failure, told to the client
        conn.send(("error", str(err)[:500]))
    finally:
        conn.close()
        os._exit(0)


def _run(render: Callable[[], str], timeout_s: float, max_chars: int) -> tuple[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(render, max_chars, child), daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout_s):
            return "timeout", None
        return parent.recv()
    except EOFError:  # killed (e.g. the memory limit)
        return "error", "the chat template's renderer died"
    finally:
        parent.close()
        if proc.is_alive():
            proc.kill()
        proc.join()


async def render_client_template(render: Callable[[], str], timeout_s: float, max_chars: int) -> str:
    """`render()`'s text, computed in a child process within the limits (off the event loop)."""
    kind, value = await asyncio.to_thread(_run, render, timeout_s, max_chars)
    param = "chat_template_kwargs.chat_template"
    if kind == "ok":
        return value
    if kind == "timeout":
        raise APIError(
            400,
            f"the chat template did not render within {timeout_s} s (limits.chat_template_timeout_s)",
            param=param,
            code="limit_exceeded",
        )
    if kind == "too_long":
        raise APIError(
            400,
            f"the chat template rendered {value} characters, over {max_chars} (limits.chat_template_max_chars)",
            param=param,
            code="limit_exceeded",
        )
    raise bad_request(f"cannot apply the chat template: {value}", param=param)
