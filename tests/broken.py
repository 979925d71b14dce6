"""Deliberately broken pieces, to show that a parity test can fail."""

from __future__ import annotations

import numpy as np


class CacheDroppingRunner:
    """An LLM runner whose decode steps (one new token per row) run without the KV cache, as if the
    cache were not fed back; everything else is the real runner."""

    def __init__(self, llm) -> None:
        self._llm = llm

    def __getattr__(self, name):
        return getattr(self._llm, name)

    def forward_rows(self, caches, inputs):
        if any(len(x) != 1 for x in inputs):
            return self._llm.forward_rows(caches, inputs)
        out = []
        for cache, x in zip(caches, inputs):
            out.append(self._llm.forward(x[None], self._llm.new_cache()))
            cache.length += 1
        return np.stack(out)
