"""The KV block pool: allocation, reference counts and the prefix cache.

A block that fills up gets a hash chained from its predecessor's, so equal hashes mean equal
whole prefixes. Freed blocks keep their hash and go to the back of an LRU queue: a later request
with the same prefix takes them back for free, and allocation evicts from the front.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from zizhu.engine.request import Request


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    digest = hashlib.sha256(parent or b"\0")
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # LRU order
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    # ------------------------------------------------------------------ queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(request, num_new_tokens) <= len(self.free)

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, request: Request) -> None:
        """Attach cached blocks for the longest cached prefix of a fresh request.

        At least one token is always left to compute, since its logits are needed.
        """
        if not self.enable_prefix_caching or request.block_ids:
            return
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        parent = None
        for i in range(max_blocks):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            request.block_ids.append(block)
            request.block_hashes.append(h)
            parent = h
        request.num_computed_tokens = len(request.block_ids) * self.block_size
        request.num_cached_tokens = request.num_computed_tokens
        self.prefix_hit_tokens += request.num_computed_tokens
        self.prefix_query_tokens += len(tokens)

    def register_full_blocks(self, request: Request) -> None:
        """Hash the blocks that the last step filled, so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        tokens = request.all_token_ids
        num_full = min(request.num_computed_tokens, len(tokens)) // self.block_size
        parent = request.block_hashes[-1] if request.block_hashes else None
        for i in range(len(request.block_hashes), num_full):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = request.block_ids[i]
            request.block_hashes.append(h)
            if h not in self.cached:  # an identical block computed concurrently stays uncached
                self.cached[h] = block
                self.hash_of[block] = h
            parent = h

    # ------------------------------------------------------------------ allocation
    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            block, _ = self.free.popitem(last=False)  # least recently used first
            self._evict(block)
            self.ref_counts[block] = 1
            request.block_ids.append(block)
        return True

    def free_request(self, request: Request) -> None:
        """Release a request's blocks; the last ones first, so shared prefixes stay cached longest."""
        for block in reversed(request.block_ids):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
        request.block_ids = []
        request.block_hashes = []

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _evict(self, block: int) -> None:
        h = self.hash_of[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hash_of[block] = None
