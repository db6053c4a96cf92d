"""AttentionBatch: what one model step needs to know about the sequences it computes.

Sequences are ordered decodes first (exactly one new token each), then prefills (a prompt or a
chunk of one, possibly after a cached prefix). Tokens are flattened in that order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token
    block_tables: torch.Tensor  # [S, max_blocks] long, padded with 0
    seq_lens: torch.Tensor  # [S] long: context length after this step, new tokens included
    query_start_loc: list[int]  # S + 1 offsets of each sequence's tokens in the flat batch
    seq_lens_cpu: list[int]
    num_decodes: int  # the first num_decodes sequences have exactly one new token

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]

    def prefills(self):
        """(sequence index, first token, end token, context length) of each prefill sequence."""
        for s in range(self.num_decodes, len(self.seq_lens_cpu)):
            yield s, self.query_start_loc[s], self.query_start_loc[s + 1], self.seq_lens_cpu[s]
