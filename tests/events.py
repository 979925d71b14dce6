"""Reading a scheduler request's events in tests."""

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
