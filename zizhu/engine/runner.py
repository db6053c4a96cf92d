"""Turn a scheduled batch into tensors, run the model, and return the final hidden states of the rows
that sample (the sampler takes them through the head: see Sampler.sample)."""

from __future__ import annotations

import torch

from zizhu.engine.scheduler import ScheduledBatch
from zizhu.layers.batch import AttentionBatch


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int, platform):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.platform = platform
        self.device = platform.device

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        """Returns (hidden [N, D], the final hidden states of the N rows that sample, and their indices
        into batch.requests)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        logit_positions: list[int] = []
        bs = self.block_size
        for i, (request, num_new) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            end = start + num_new
            tokens = request.all_token_ids
            input_ids.extend(tokens[start:end])
            positions.extend(range(start, end))
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + num_new)
            seq_lens.append(end)
            if end == request.num_tokens:  # the step reaches the end of what is known: sample next
                sample_rows.append(i)
                logit_positions.append(query_start[-1] - 1)
        width = max(len(r.block_ids) for r in batch.requests)
        tables = torch.zeros(len(batch.requests), width, dtype=torch.long)
        for i, request in enumerate(batch.requests):
            tables[i, : len(request.block_ids)] = torch.tensor(request.block_ids, dtype=torch.long)
        device = self.device
        attn = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            block_tables=tables.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.long, device=device),
            query_start_loc=query_start,
            seq_lens_cpu=seq_lens,
            num_decodes=batch.num_decodes,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        hidden = self.model(ids, pos, attn, self.kv_caches)
        if not sample_rows:
            return hidden.new_empty(0, hidden.shape[-1]), []
        return hidden[torch.tensor(logit_positions, device=device)], sample_rows
