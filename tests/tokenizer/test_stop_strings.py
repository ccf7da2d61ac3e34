"""StopStringMatcher: OpenAI `stop` over chunked text."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from esp_core.tokenizer import StopStringMatcher


def run(stops, chunks, include_stop=False):
    m = StopStringMatcher(stops, include_stop=include_stop)
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = m.feed(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return "".join(out), stopped, m


def reference(stops, text, include_stop=False):
    """Character by character: stop the first time the text ends with a stop string
    (the longest one if several end there)."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include_stop else text[: end - len(s)]), True
    return text, False


def test_stop_spanning_chunks():
    text, stopped, m = run(["STOP"], ["Hello ST", "O", "P world"])
    assert (text, stopped, m.stop_string) == ("Hello ", True, "STOP")


def test_holds_back_only_possible_prefixes():
    m = StopStringMatcher(["\n\n"])
    assert m.feed("a\n") == ("a", False) and m.held == "\n"
    assert m.feed("b") == ("\nb", False) and m.held == ""
    m = StopStringMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.feed("d") == ("abd", False)


def test_multiple_stops_earliest_wins():
    assert run(["world", "lo"], ["Hello world"])[0] == "Hel"
    assert run(["bc", "abc"], ["xabc"])[0] == "x"  # same end: the longer one
    assert run(["abcd", "c"], ["ab", "cd"])[0] == "ab"  # "c" completes first
    _, _, m = run(["x", "yz"], ["ayzbx"])
    assert m.stop_string == "yz"


def test_stop_at_the_very_start():
    assert run(["Hi"], ["Hi there"])[:2] == ("", True)
    assert run(["Hi"], ["H", "i", " there"])[:2] == ("", True)


def test_no_false_holdback_at_the_end():
    # text ending in a prefix of a stop string is released by flush
    text, stopped, _ = run(["STOP"], ["the end ST"])
    assert (text, stopped) == ("the end ST", False)


def test_after_stop_nothing_more():
    m = StopStringMatcher(["."])
    assert m.feed("a.b") == ("a", True)
    assert m.feed("more") == ("", True)
    assert m.flush() == "" and m.stopped


def test_include_stop():
    assert run(["STOP"], ["go ST", "OP now"], include_stop=True)[0] == "go STOP"


def test_no_stops_passes_through():
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False) and m.flush() == ""
    m = StopStringMatcher([""])  # an empty stop string would match everywhere: ignored
    assert m.stops == () and m.feed("x") == ("x", False)
    assert StopStringMatcher("single").stops == ("single",)
    assert StopStringMatcher(None).feed("y") == ("y", False)


def test_unicode_stops():
    assert run(["。"], ["日本語", "です。次"])[0] == "日本語です"
    assert run(["😀!"], ["a😀", "!b"])[0] == "a"


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    stops=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), max_size=3),
    text=st.text(alphabet="abc\n", max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=8),
    include=st.booleans(),
)
def test_matches_reference_for_any_chunking(stops, text, cuts, include):
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    chunks = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    got, stopped, _ = run(stops, chunks, include_stop=include)
    assert (got, stopped) == reference(stops, text, include_stop=include)


def test_memory_linear_in_the_stop_strings_and_hold_back_bounded():
    """Every prefix of every stop string used to be stored: O(L^2) memory and build time
    (33 MB for one 8,000-character stop string; 5 GB for 100,000). Now one KMP table per
    stop string: O(L), and the text streams through with at most L - 1 characters held."""
    import tracemalloc

    stop = "ab" * 50_000
    tracemalloc.start()
    m = StopStringMatcher([stop, "x" * 256])
    built = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert built < 64 * len(stop) + (1 << 20), built  # ~40 bytes per character (a list of ints)
    emitted = 0
    for _ in range(2_000):
        text, stopped = m.feed("ab" * 5 + "c")  # near misses of the stop string, over and over
        assert not stopped
        emitted += len(text)
        assert len(m.held) <= 10
    assert emitted + len(m.held) == 2_000 * 11
    text, stopped = m.feed(stop[:-1])
    assert not stopped and len(m.held) == len(stop) - 1  # a long prefix is held, nothing more
    text, stopped = m.feed("b")
    assert stopped and m.stop_string == stop and text == ""
