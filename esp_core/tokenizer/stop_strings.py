"""Stop strings over streamed text (OpenAI `stop`): stop strings may span chunks.

Semantics: generation stops at the first moment the text contains a stop string; the text
returned is everything before that occurrence (the stop string itself is not returned,
unless include_stop). If several stop strings complete at the same character, the one
starting earliest (the longest) wins. Text that might still be the beginning of a stop
string is held back until it is not, or until `flush()` at the end of generation.

Matching is linear in the text: each stop string keeps a Knuth-Morris-Pratt state (the
length of its longest prefix that ends the text so far), updated once per character in
amortised O(1). Memory is O(total length of the stop strings); the held-back text is at
most the longest stop string minus one character.
"""

from __future__ import annotations

from collections.abc import Iterable


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper border of s[:i+1]."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """feed(delta) -> (text safe to emit now, stopped); flush() -> held text at the end.

    After a stop, feed() returns ("", True) and flush() returns "". `stop_string` tells which
    stop string matched (for finish reasons / logs).
    """

    def __init__(self, stop: Iterable[str] | str | None, include_stop: bool = False):
        if isinstance(stop, str):
            stop = [stop]
        # empty strings would match everywhere; OpenAI clients never mean that
        self._stops = tuple(dict.fromkeys(s for s in (stop or ()) if s))
        self._include = include_stop
        self._fail = [_failure(s) for s in self._stops]
        # per stop string: how many of its first characters end the text seen so far
        self._state = [0] * len(self._stops)
        self._buffer = ""
        self._stopped = False
        self.stop_string: str | None = None

    @property
    def stops(self) -> tuple[str, ...]:
        return self._stops

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def held(self) -> str:
        """Text currently held back (a possible start of a stop string)."""
        return self._buffer

    def feed(self, delta: str) -> tuple[str, bool]:
        if self._stopped:
            return "", True
        if not self._stops:
            return delta, False
        buf = self._buffer + delta
        base = len(self._buffer)
        for offset, ch in enumerate(delta):
            done = self._advance(ch)
            if done is not None:
                end = base + offset + 1
                self._stopped = True
                self.stop_string = done
                self._buffer = ""
                return buf[:end] if self._include else buf[: end - len(done)], True
        hold = max(self._state)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _advance(self, ch: str) -> str | None:
        """Step every stop string's state over one character; the longest stop string
        that completes here, if any."""
        done = None
        for i, (stop, fail) in enumerate(zip(self._stops, self._fail)):
            q = self._state[i]
            while q and stop[q] != ch:
                q = fail[q - 1]
            if stop[q] == ch:
                q += 1
            if q == len(stop):
                if done is None or len(stop) > len(done):
                    done = stop
                q = fail[q - 1]
            self._state[i] = q
        return done

    def flush(self) -> str:
        """End of generation: the held text was not a stop string after all."""
        out, self._buffer = self._buffer, ""
        return "" if self._stopped else out
