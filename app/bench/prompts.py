"""Prompts of an exact token length, built through the server's own `/tokenize` and
`/detokenize` (vLLM's endpoints), so the benchmark needs no tokenizer of its own.

* token-ids (default): a pool of valid ids is obtained once by tokenizing a fixed text;
  prompt i of length L is L ids of the pool read cyclically from an offset that depends
  on i, so prompts differ (no accidental prefix sharing) and their length is exact.
* text: the same ids detokenized to a string, re-tokenized to check the count (with
  the special tokens the server adds to a text prompt, e.g. BOS), and
  trimmed or extended until it matches (a few rounds; tokenizers merge across the cut).
  The achieved count is what the benchmark reports as the prompt length.
"""

from __future__ import annotations

from typing import Any

import httpx

# Varied English text, so BPE tokenizers give many distinct ids (a pool of one repeated
# token would make prompts degenerate).
_BASE_TEXT = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing "
    "matches. Elastic sequence parallelism splits long prompts across instances, merges "
    "partial attention with the log-sum-exp, and keeps key-value caches where decoding "
    "needs them. Numbers like 3.14159, 2718 and 1.618 appear; so do names such as Ada, "
    "Grace, Alan and Edsger. Rivers flow to the sea, mountains rise above clouds, and "
    "markets open at nine. "
)
POOL_TEXT = _BASE_TEXT * 16
TEXT_ROUNDS = 4


class PromptBuilder:
    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        model: str,
        mode: str = "token-ids",
        timeout_s: float = 30.0,
    ) -> None:
        if mode not in ("token-ids", "text"):
            raise ValueError(f"prompt mode must be token-ids or text, got {mode!r}")
        self.client, self.base_url, self.model, self.mode = client, base_url, model, mode
        self.timeout_s = timeout_s
        self.pool: list[int] = []

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.client.post(self.base_url + path, json=body, timeout=self.timeout_s)
        if resp.status_code != 200:
            raise RuntimeError(f"{path} answered {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    async def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out = await self._post(
            "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": add_special_tokens}
        )
        return [int(t) for t in out["tokens"]]

    async def detokenize(self, ids: list[int]) -> str:
        return str((await self._post("/detokenize", {"model": self.model, "tokens": ids}))["prompt"])

    async def prepare(self) -> None:
        self.pool = await self.tokenize(POOL_TEXT)
        if len(self.pool) < 16:
            raise RuntimeError(f"/tokenize gave only {len(self.pool)} ids for the pool text")

    def ids(self, index: int, length: int) -> list[int]:
        """`length` pool ids from an offset derived from the request index."""
        n = len(self.pool)
        start = (index * 7919) % n  # a prime stride spreads the offsets over the pool
        reps = (start + length) // n + 1
        return (self.pool * reps)[start : start + length]

    async def build(self, index: int, length: int) -> tuple[list[int] | str, int]:
        """(prompt for the request body, its token count)."""
        ids = self.ids(index, length)
        if self.mode == "token-ids":
            return ids, length
        text = await self.detokenize(ids)
        count = await self.count(text)
        for _ in range(TEXT_ROUNDS):
            if count == length:
                break
            if count > length:  # drop ids from the end and try again
                ids = ids[: max(1, len(ids) - (count - length))]
            else:
                ids = ids + self.ids(index + len(ids), length - count)
            text = await self.detokenize(ids)
            count = await self.count(text)
        return text, count

    async def count(self, text: str) -> int:
        """Tokens the server will see for a text prompt: with its special tokens (e.g.
        BOS), as a completion request encodes it."""
        return len(await self.tokenize(text, add_special_tokens=True))
