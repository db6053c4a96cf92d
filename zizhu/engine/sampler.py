"""Batched sampling: logits [B, V] -> one token per row, honouring each row's SamplingParams.

Sampling draws with the exponential race (argmax of p / E, E ~ Exp(1)), which is an exact sample
from p. A seeded request draws its noise from its own generator, one full-vocabulary draw per
step, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from zizhu.engine.request import Request


@dataclass
class SampledLogprobs:
    chosen: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class Sampler:
    def __init__(
        self,
        eos_token_ids: tuple[int, ...],
        seed: int = 0,
        argmax: Callable[[torch.Tensor], torch.Tensor] = partial(torch.argmax, dim=-1),
    ):
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator().manual_seed(seed)
        self.argmax = argmax  # the platform's: greedy rows over the whole vocabulary

    def sample(self, model, hidden: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[SampledLogprobs | None]]:
        """Tokens for the final hidden states `[B, D]` of the rows that sample, through the model's
        head. A row that takes the plain argmax of its logits (greedy, no logprobs, no penalty or
        min_tokens in force) gets `model.greedy_tokens`, which need not form the whole logits
        (Platform.greedy_head); the others get their logits and `__call__`."""
        argmax_only = [_argmax_only(r) for r in requests]
        plain = [i for i, only in enumerate(argmax_only) if only]
        rest = [i for i, only in enumerate(argmax_only) if not only]
        tokens: list[int] = [0] * len(requests)
        logprobs: list[SampledLogprobs | None] = [None] * len(requests)
        if plain:
            for i, token in zip(plain, model.greedy_tokens(_rows(hidden, plain)).tolist()):
                tokens[i] = token
        if rest:
            logits = model.compute_logits(_rows(hidden, rest)).cpu()
            for i, token, lp in zip(rest, *self(logits, [requests[i] for i in rest])):
                tokens[i], logprobs[i] = token, lp
        return tokens, logprobs

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[SampledLogprobs | None]]:
        logits = logits.float()
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in requests):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties(logits, requests)
        self._block_early_stop(logits, requests)

        random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
        # One full-vocabulary scan per row that needs it: greedy rows on the logits, sampled rows on
        # the race below (a batch with no greedy row skips the first scan).
        if len(random_rows) < len(requests):
            tokens = self.argmax(logits)
        else:
            tokens = torch.empty(len(requests), dtype=torch.long)
        if random_rows:
            rows = torch.tensor(random_rows)
            probs = self._filtered_probs(logits[rows], [requests[i] for i in random_rows])
            noise = self._exponential_noise(probs.shape, [requests[i] for i in random_rows])
            tokens[rows] = self.argmax(probs / noise)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw_logprobs, token_list, requests)

    # ------------------------------------------------------------------ logit processing
    def _apply_penalties(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        for i, r in enumerate(requests):
            p = r.params
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(r.all_token_ids)), dtype=torch.long)
                values = logits[i, seen]
                logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            if (p.frequency_penalty or p.presence_penalty) and r.output_token_ids:
                counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=logits.shape[-1])[: logits.shape[-1]]
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _block_early_stop(self, logits: torch.Tensor, requests: list[Request]) -> None:
        for i, r in enumerate(requests):
            if len(r.output_token_ids) < r.params.min_tokens:
                stops = [t for t in (*self.eos_token_ids, *r.params.stop_token_ids) if t < logits.shape[-1]]
                logits[i, stops] = float("-inf")

    def _filtered_probs(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        temperature = torch.tensor([r.params.temperature for r in requests], dtype=logits.dtype)
        logits = logits / temperature[:, None]
        top_k = [r.params.top_k for r in requests]
        if any(top_k):
            vocab = logits.shape[-1]
            k = torch.tensor([min(t, vocab) if t else vocab for t in top_k])
            kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        top_p = torch.tensor([r.params.top_p for r in requests], dtype=probs.dtype)
        if (top_p < 1).any():
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
            drop_sorted = before >= top_p[:, None]  # keeps the smallest set reaching top_p (at least one)
            drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
            probs = probs.masked_fill(drop, 0.0)
        min_p = torch.tensor([r.params.min_p for r in requests], dtype=probs.dtype)
        if (min_p > 0).any():
            threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _exponential_noise(self, shape: torch.Size, requests: list[Request]) -> torch.Tensor:
        noise = torch.empty(shape)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), shape[1]).exponential_(generator=self.generator)
        for i, r in enumerate(requests):
            if r.generator is not None:
                noise[i].exponential_(generator=r.generator)
        return noise

    # ------------------------------------------------------------------ logprobs
    def _logprobs(self, raw: torch.Tensor | None, tokens: list[int], requests: list[Request]) -> list[SampledLogprobs | None]:
        out: list[SampledLogprobs | None] = [None] * len(requests)
        if raw is None:
            return out
        for i, r in enumerate(requests):
            n = r.params.logprobs
            if n is None:
                continue
            row = raw[i]
            chosen = row[tokens[i]]
            rank = int((row > chosen).sum()) + 1
            top = row.topk(n) if n else None
            out[i] = SampledLogprobs(
                chosen=float(chosen),
                rank=rank,
                top_ids=top.indices.tolist() if top is not None else [],
                top_logprobs=top.values.tolist() if top is not None else [],
            )
        return out


def _rows(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return hidden if len(rows) == hidden.shape[0] else hidden[torch.tensor(rows, device=hidden.device)]


def _argmax_only(request: Request) -> bool:
    """Whether `__call__` would take this row's token as the plain argmax of its raw logits."""
    p = request.params
    return (
        p.greedy
        and p.logprobs is None
        and p.repetition_penalty == 1.0
        and not ((p.frequency_penalty or p.presence_penalty) and request.output_token_ids)
        and len(request.output_token_ids) >= p.min_tokens
    )
