"""A scripted controller stream for ingress-side tests: the shape of the handle's
`DeploymentResponseGenerator` (async iteration of items, `cancel()`), items given up front."""

from __future__ import annotations

import asyncio
from typing import Any


class ScriptedStream:
    """Yields `items` in order (an exception item is raised instead); after them it ends,
    or with `hang=True` waits forever (a stalled generation). Records `cancel()`."""

    def __init__(self, items: list[Any], hang: bool = False) -> None:
        self.items = list(items)
        self.hang = hang
        self.cancelled = False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)  # a real stream item arrives from another actor
        if self.items:
            item = self.items.pop(0)
            if isinstance(item, BaseException):
                raise item
            return item
        if self.hang:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True
