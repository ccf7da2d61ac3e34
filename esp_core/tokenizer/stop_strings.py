"""Stop strings over streamed text (OpenAI `stop`): stop strings may span chunks.

Semantics: generation stops at the first moment the text contains a stop string; the text
returned is everything before that occurrence (the stop string itself is not returned,
unless include_stop). If several stop strings complete at the same character, the one
starting earliest (the longest) wins. Text that might still be the beginning of a stop
string is held back until it is not, or until `flush()` at the end of generation.
"""

from __future__ import annotations

from collections.abc import Iterable


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
        # every proper prefix of every stop string: a suffix of the buffer in this set must
        # be held back because the next chunk may complete it
        self._prefixes = frozenset(s[:k] for s in self._stops for k in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
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
        match = self._first_match(buf)
        if match is not None:
            start, stop = match
            self._stopped = True
            self.stop_string = stop
            self._buffer = ""
            return buf[: start + len(stop)] if self._include else buf[:start], True
        hold = self._holdback(buf)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of generation: the held text was not a stop string after all."""
        out, self._buffer = self._buffer, ""
        return "" if self._stopped else out

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        # The held part of buf contains no stop string (we would have stopped), so any
        # match ends inside the new delta; pick the earliest end, then the earliest start.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for stop in self._stops:
            start = buf.find(stop)
            if start < 0:
                continue
            key = (start + len(stop), start, stop)
            if best is None or key[:2] < best[:2]:
                best = key
        return None if best is None else (best[1], best[2])

    def _holdback(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        for k in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-k:] in self._prefixes:
                return k
        return 0
