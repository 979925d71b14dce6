"""Never compute the same thing twice: image embeddings and prompt-prefix KV, reused across requests.

Both caches are content addressed and bounded in bytes (least recently used entries go first):

* :class:`ImageEmbeddingCache` — a decoded image's stitched embeddings, keyed by a hash of its
  pixels and of everything that changes them (the vision graph's file hash, the preprocessing
  parameters, the tile budget). The same camera frame asked about twice runs the vision graph once.
* :class:`PrefixKVCache` — vLLM-style automatic prefix caching: the KV of every full block of
  ``BLOCK_TOKENS`` prompt positions, keyed by a hash chain over the block's contents and the chain
  before it. A position's content is its token id, or at an image position the identity of the image
  and the index in it (every image position has the same token id, so ids alone would let two images
  share KV). A request reuses its longest cached chain and prefills only the rest.

Requests that carry different ``cache_salt`` values (:func:`salted`; the server gives each API key
its own by default) never share an entry of either cache.

Reuse changes no answer: a reused block holds exactly the KV the same positions would compute again
(the decoder is causal: a position's KV depends only on the positions before it).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

BLOCK_TOKENS = 16
DEFAULT_IMAGE_CACHE_BYTES = 256 << 20
DEFAULT_KV_CACHE_BYTES = 256 << 20


class ByteLRU:
    """A dict bounded by the bytes of its values; thread safe (the server prepares requests in worker
    threads while the scheduler thread prefills)."""

    def __init__(self, max_bytes: int) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"a cache size must be a number of bytes >= 0 (0 disables it), got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def get(self, key: bytes, count: bool = True) -> Any | None:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += count
                return None
            self.entries.move_to_end(key)
            self.hits += count
            return entry[0]

    def put(self, key: bytes, value: Any, nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return  # larger than the whole budget: keeping it would evict everything for nothing
        with self.lock:
            old = self.entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self.entries and self.bytes + nbytes > self.max_bytes:
                _, (_, n) = self.entries.popitem(last=False)
                self.bytes -= n
                self.evictions += 1
            self.entries[key] = (value, nbytes)
            self.bytes += nbytes

    def stats(self) -> dict[str, int]:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


# --------------------------------------------------------------------------------------------
# Tenants


def salted(salt: bytes, cache_salt: bytes | None) -> bytes:
    """``salt`` (a bundle's) combined with a request's ``cache_salt`` (vLLM's field): requests with
    different cache salts get disjoint keys, so they never share an image's embeddings or a prefix's
    KV, and ``cached_tokens`` tells a client nothing about what others sent. No salt: ``salt`` as is."""
    if not cache_salt:
        return salt
    if isinstance(cache_salt, str):
        cache_salt = cache_salt.encode("utf-8")
    h = hashlib.sha256(b"flashvl cache_salt\0")
    h.update(struct.pack("<q", len(cache_salt)))
    h.update(bytes(cache_salt))
    h.update(salt)
    return h.digest()


# --------------------------------------------------------------------------------------------
# Images


def image_key(pixels: np.ndarray, salt: bytes) -> bytes:
    """Content address of a decoded image (RGB uint8 pixels) for one bundle + preprocessing (``salt``)."""
    h = hashlib.sha256(salt)
    h.update(struct.pack("<3q", *pixels.shape))
    h.update(np.ascontiguousarray(pixels).data)
    return h.digest()


@dataclass
class CachedImage:
    embeds: np.ndarray  # [n_tokens, hidden], stitched
    n_tokens: int
    n_tiles: int


class ImageEmbeddingCache(ByteLRU):
    def put_image(self, key: bytes, embeds: np.ndarray, n_tiles: int) -> None:
        if self.enabled:
            self.put(key, CachedImage(embeds, int(embeds.shape[0]), int(n_tiles)), int(embeds.nbytes))

    def get_image(self, key: bytes) -> CachedImage | None:
        return self.get(key) if self.enabled else None


# --------------------------------------------------------------------------------------------
# Prompt prefixes


def block_keys(token_ids: Sequence[int], tags: Sequence[bytes | None], salt: bytes,
               block: int = BLOCK_TOKENS) -> list[bytes]:
    """One key per *full* block of the prompt: the hash of the previous key and the block's positions,
    each its token id, or its tag (image identity + index) at an image position."""
    keys, prev = [], salt
    for start in range(0, len(token_ids) - block + 1, block):
        h = hashlib.sha256(prev)
        for tid, tag in zip(token_ids[start:start + block], tags[start:start + block]):
            h.update(b"i" + tag if tag is not None else b"t" + struct.pack("<q", int(tid)))
        prev = h.digest()
        keys.append(prev)
    return keys


class PrefixKVCache(ByteLRU):
    """Per block: the KV arrays of its positions ([1, kv_heads, block, head_dim] per past input)."""

    def __init__(self, max_bytes: int, block: int = BLOCK_TOKENS) -> None:
        super().__init__(max_bytes)
        self.block = block
        self.reused_tokens = 0

    def longest(self, keys: Sequence[bytes], max_blocks: int) -> list[list[np.ndarray]]:
        """The cached blocks of the longest cached chain (at most ``max_blocks``), in order."""
        found = []
        if not self.enabled:
            return found
        for key in keys[:max_blocks]:
            arrays = self.get(key, count=False)
            if arrays is None:
                break
            found.append(arrays)
        with self.lock:
            if found:
                self.hits += 1
                self.reused_tokens += len(found) * self.block
            else:
                self.misses += 1
        return found

    def store(self, keys: Sequence[bytes], arrays: Sequence[np.ndarray], first_block: int = 0) -> None:
        """Record blocks ``first_block ..`` of a prompt whose KV is ``arrays`` ([1, kv, >= len, hd] each)."""
        if not self.enabled:
            return
        for i in range(first_block, len(keys)):
            lo, hi = i * self.block, (i + 1) * self.block
            blocks = [np.ascontiguousarray(a[:, :, lo:hi, :]) for a in arrays]
            self.put(keys[i], blocks, sum(b.nbytes for b in blocks))

    def stats(self) -> dict[str, int]:
        out = super().stats()
        out["reused_tokens"] = self.reused_tokens
        return out


def join_blocks(blocks: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Blocks of a chain -> one array per past input, [1, kv, n_blocks * block, hd]."""
    return [np.concatenate([b[i] for b in blocks], axis=2) for i in range(len(blocks[0]))]
