"""Reading what the scheduler and the step core did, in tests."""

from __future__ import annotations

from flashvl_edge.runtime.scheduler import FinishEvent, TokenEvent


async def collect(handle):
    """All of a request's events: (token ids, text, the FinishEvent)."""
    tokens, text, finish = [], "", None
    async for ev in handle:
        if isinstance(ev, TokenEvent):
            tokens.append(ev.token_id)
        else:
            assert isinstance(ev, FinishEvent)
            finish = ev
        text += ev.text
    return tokens, text, finish


def prefill_chunks(start: int, n: int, chunk: int) -> list[int]:
    """The LLM runs a prefill of ``n`` tokens from position ``start`` takes: chunks end at multiples of
    ``chunk`` positions (runtime/core.py), so the first one may be short."""
    out, pos, end = [], start, start + n
    while pos < end:
        nxt = min(end, (pos // chunk + 1) * chunk)
        out.append(nxt - pos)
        pos = nxt
    return out


# requests of different lengths, with no image, one or two, different photos: (question, photo names)
MIXED_REQUESTS = [
    ("Hi", []),
    ("Describe the image in detail, please, with colours.", ["astronaut"]),
    ("What is in this picture?", ["coffee"]),
    ("Compare the two photos.", ["chelsea", "astronaut"]),
    ("a b c d e f g h i j k l m n o p", []),
    ("And this one?", ["coffee", "chelsea"]),
    ("x", ["astronaut"]),
]
