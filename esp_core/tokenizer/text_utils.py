"""Small text helpers shared by the tokenizer kinds."""

from __future__ import annotations


def encodable_utf8(text: str) -> str:
    """`text` with lone surrogates replaced by U+FFFD.

    JSON allows "\\ud800" escapes, so request text can hold lone surrogates, which UTF-8
    cannot encode; both tokenizer kinds must treat them alike instead of crashing the
    ingress. A valid surrogate pair (two code points in a Python str) becomes the one
    character it stands for.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
