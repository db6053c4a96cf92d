"""Train the embedded demo model from nothing: `python -m zizhu.demo.train --out DIR --seed 0`.

Deterministic from the seed on a given machine (fixed thread count, seeded data stream and init):
1. generate a sample of the task corpus and train the byte-level BPE tokenizer on it;
2. train a small DeepSeek-V3 (MLA, noaux_tc MoE, YaRN, one MTP layer) on an endless stream of fresh
   training problems, loss on the assistant turn only, AdamW with warmup and cosine decay, and the
   router biases balanced after each step without an auxiliary loss; every 500 steps the log gives
   each family's loss on a few held-out problems (weights untouched: same file with or without);
3. write an HF-format directory: config.json, model.safetensors, generation_config.json,
   tokenizer.json, tokenizer_config.json;
4. reload it and train a short second stage (TAIL) on a sort-heavy stream, then write it again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from zizhu.demo import tasks
from zizhu.demo.model import DemoConfig, DemoModel
from zizhu.demo.tokenizer import EOS, PAD, prompt_text, save_tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

TOKENIZER_CORPUS = 20_000  # problems the BPE is trained on


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 5200  # the shipped checkpoint's run
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_weight: float = 0.3  # DeepSeek-V3's lambda for the MTP loss
    bias_gamma: float = 1e-3  # router bias step of the auxiliary-loss-free balancing
    bucket: int = 16  # batches drawn at once and sorted by length, to cut padding
    ramp: float = 0.3  # share of training over which problems grow to full size
    monitor_every: int = 500  # steps between held-out loss reports (0: none)
    workers: int = 2  # data-parallel processes, one thread each: on a shared 2-core machine this beats
    # one process with two threads by far, which stalls at every barrier when a core is busy


# A short second stage after the main run: a fresh optimizer, a low learning rate and a stream where
# sort (the family that needs the most steps) is drawn far more often. Per minute it lifts sort much
# more than more mixed steps would, without costing the other families. 600 steps rather than 400:
# 26 misses in three held-out draws of 1,000 against 37 (one process with two threads: 28).
TAIL = TrainConfig(steps=600, lr=3e-4, warmup=20, ramp=0.0, workers=2)
TAIL_WEIGHTS = {**tasks.FAMILY_WEIGHTS, "sort": 6.0, "sub": 3.0}  # sub (the longest trace) slips without its share
TAIL_SEED_OFFSET = 1000  # its own problem stream, not a replay of the main run's


def encode(tokenizer: Tokenizer, problems: list[tasks.Problem]) -> list[tuple[list[int], int]]:
    """(token ids of the full turn, number of prompt tokens) per problem."""
    prompts = tokenizer.encode_batch([prompt_text(p.prompt) for p in problems])
    fulls = tokenizer.encode_batch([prompt_text(p.prompt) + p.completion + EOS for p in problems])
    return [(f.ids, len(p.ids)) for p, f in zip(prompts, fulls)]


def make_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T], validity mask [B, T], and a mask of the positions that carry loss
    (the assistant turn: everything after the generation prompt, EOS included)."""
    t = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)
    valid = torch.zeros((len(examples), t), dtype=torch.bool)
    target = torch.zeros((len(examples), t), dtype=torch.bool)
    for row, (seq, n_prompt) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        valid[row, : len(seq)] = True
        target[row, n_prompt : len(seq)] = True
    return ids, valid, target


class Batches:
    """Fresh training problems in length-bucketed batches: `cfg.bucket` batches are drawn at once and
    sorted by length, so little of each batch is padding."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        seed: int,
        cfg: TrainConfig,
        families: tuple[str, ...] = tasks.FAMILIES,
        weights: dict[str, float] | None = None,
    ):
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.stream = tasks.TrainingStream(seed, families, weights)
        self.rng = random.Random(seed + 1)
        self.pad_id = tokenizer.token_to_id(PAD)
        self.ready: list[list[tuple[list[int], int]]] = []

    def next(self, level: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.ready:
            examples = encode(self.tokenizer, self.stream.take(self.cfg.batch_size * self.cfg.bucket, level))
            examples.sort(key=lambda e: len(e[0]))
            size = self.cfg.batch_size
            self.ready = [examples[i : i + size] for i in range(0, len(examples), size)]
            self.rng.shuffle(self.ready)
        return make_batch(self.ready.pop(), self.pad_id)


def level_at(step: int, cfg: TrainConfig) -> int:
    """Curriculum: problem size grows from 1 to MAX_LEVEL over the first `cfg.ramp` of training."""
    ramp = max(1, int(cfg.ramp * cfg.steps))
    return min(tasks.MAX_LEVEL, 1 + (tasks.MAX_LEVEL - 1) * step // ramp)


def lm_loss(logits: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, ahead: int, total: int) -> torch.Tensor:
    """Cross-entropy of position i predicting token i+ahead, summed over target tokens and divided by
    `total`, the number of such tokens in the whole batch (all workers' shards together)."""
    labels = ids[:, ahead:].masked_fill(~target[:, ahead:], -100)
    loss = F.cross_entropy(logits[:, : labels.shape[1]].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss / total


def shard(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """Every `world`-th row from `rank`, trimmed to its own longest sequence."""
    ids, valid, target = (t[rank::world] for t in batch)
    t = int(valid.sum(1).max())
    return ids[:, :t], valid[:, :t], target[:, :t]


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum tensors in place across workers, in one flat message."""
    if not dist.is_initialized():
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class HeldOutMonitor:
    """Teacher-forced loss per family on a few held-out problems of the current size. A training
    batch's loss says little about a family that is slipping: a run where every family fell to
    50-80% accuracy printed batch losses that looked normal, while these were 20-100x the good run's."""

    def __init__(self, tokenizer: Tokenizer, per_family: int = 16, seed: int = 4321):
        self.tokenizer, self.per_family, self.seed = tokenizer, per_family, seed
        self.batches: dict[int, dict[str, tuple[torch.Tensor, ...]]] = {}

    def batches_at(self, level: int) -> dict[str, tuple[torch.Tensor, ...]]:
        if level not in self.batches:
            rng, pad = random.Random(self.seed + level), self.tokenizer.token_to_id(PAD)
            self.batches[level] = {
                f: make_batch(encode(self.tokenizer, [tasks.sample(rng, f, True, level) for _ in range(self.per_family)]), pad)
                for f in tasks.FAMILIES
            }
        return self.batches[level]

    @torch.no_grad()
    def losses(self, model: DemoModel, level: int) -> dict[str, float]:
        was_training = model.training
        model.eval()  # eval mode: the routers count no load
        out = {}
        for family, (ids, valid, target) in self.batches_at(level).items():
            logits, _ = model(ids, valid)
            out[family] = float(lm_loss(logits, ids, target, 1, max(1, int(target[:, 1:].sum()))))
        model.train(was_training)
        return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_for(model: DemoModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on the matrices of the blocks; none on norms, embedding and router."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.ndim == 2 and "embed_tokens" not in name and not name.endswith("gate.weight")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train(model: DemoModel, tokenizer: Tokenizer, seed: int, cfg: TrainConfig, families=tasks.FAMILIES, weights=None) -> None:
    """The training loop. Under data parallelism every worker draws the same batches and trains on
    its shard; summed gradients and expert loads keep all replicas identical."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    opt = optimizer_for(model, cfg)
    params = list(model.parameters())
    for p in params:  # every gradient exists from the start, even of an expert no token picked
        p.grad = torch.zeros_like(p)
    model.train()
    start = time.time()
    data = Batches(tokenizer, seed, cfg, families, weights)
    monitor = HeldOutMonitor(tokenizer) if rank == 0 and cfg.monitor_every else None
    ahead = [1] + [k + 2 for k in range(model.cfg.num_nextn_predict_layers)]  # main head, then each MTP depth
    for step in range(cfg.steps):
        batch = data.next(level_at(step, cfg))
        totals = [max(1, int(batch[2][:, a:].sum())) for a in ahead]
        ids, valid, target = shard(batch, rank, world)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        logits, mtp_logits = model(ids, valid)
        loss = lm_loss(logits, ids, target, 1, totals[0])
        mtp_loss = sum(lm_loss(lg, ids, target, a, n) for lg, a, n in zip(mtp_logits, ahead[1:], totals[1:]))
        (loss + cfg.mtp_weight * mtp_loss).backward()
        all_reduce_sum([p.grad for p in params] + [m.load for m in model.moe_layers()])
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=False)
        model.update_router_biases(cfg.bias_gamma)
        if step % 100 == 0 or step == cfg.steps - 1:
            losses = torch.stack([loss.detach(), mtp_loss.detach()])
            all_reduce_sum([losses])
            if rank == 0:
                logger.info(
                    "step %d/%d loss %.4f mtp %.4f lr %.2e %.0fs",
                    step, cfg.steps, losses[0], losses[1], lr_at(step, cfg), time.time() - start,
                )
        if monitor and (step % cfg.monitor_every == cfg.monitor_every - 1 or step == cfg.steps - 1):
            level = level_at(step, cfg)
            held = monitor.losses(model, level)
            logger.info("step %d held-out loss (level %d): %s", step, level, " ".join(f"{f} {v:.4f}" for f, v in held.items()))


def save_model(model: DemoModel, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(model.checkpoint_state(), out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_config(), indent=2) + "\n")
    generation = {
        "bos_token_id": model.cfg.bos_token_id,
        "eos_token_id": model.cfg.eos_token_id,
        "pad_token_id": model.cfg.pad_token_id,
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def build(out: Path, seed: int, cfg: TrainConfig, model_cfg: dict | None = None, rank: int = 0) -> None:
    """Tokenizer, model and training; every worker runs this, worker 0 writes the directory."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    corpus = tasks.TrainingStream(seed + 2).take(TOKENIZER_CORPUS)
    tokenizer = train_tokenizer(p.prompt + "\n" + p.completion for p in corpus)
    model = DemoModel(DemoConfig(vocab_size=tokenizer.get_vocab_size(), **(model_cfg or {})))
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        logger.info("vocab %d, %d parameters (%.2fM)", tokenizer.get_vocab_size(), n_params, n_params / 1e6)
    train(model, tokenizer, seed, cfg)
    if rank == 0:
        save_model(model, out)
        save_tokenizer(tokenizer, out, model_max_length=model.cfg.max_position_embeddings)


def polish(out: Path, seed: int, cfg: TrainConfig = TAIL, model_cfg: dict | None = None, rank: int = 0) -> None:
    """The second stage: reload the directory the main run wrote, train `cfg` on a sort-heavy stream
    with a fresh optimizer and write it back (worker 0 writes)."""
    torch.set_num_threads(1 if dist.is_initialized() else 2)
    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = DemoModel(DemoConfig(vocab_size=tokenizer.get_vocab_size(), **(model_cfg or {})))
    model.load_checkpoint_state(load_file(out / "model.safetensors"))
    train(model, tokenizer, seed + TAIL_SEED_OFFSET, cfg, weights=TAIL_WEIGHTS)
    if rank == 0:
        save_model(model, out)


def _worker(rank: int, port: int, stage, workers: int, args: tuple) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=workers)
    try:
        stage(*args, rank=rank)
    finally:
        dist.destroy_process_group()


def _launch(stage, workers: int, *args) -> None:
    """`stage(*args)` in this process, or in `workers` data-parallel processes."""
    if workers == 1:
        stage(*args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, stage, workers, args), nprocs=workers)


def run(out: Path, seed: int, cfg: TrainConfig, model_cfg: dict | None = None, tail: TrainConfig = TAIL) -> None:
    """The main run, then the sort-heavy tail (none when `tail.steps` is 0), each with its own
    number of data-parallel workers."""
    _launch(build, cfg.workers, out, seed, cfg, model_cfg)
    if tail.steps:
        _launch(polish, tail.workers, out, seed, tail, model_cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write the model to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--workers", type=int, default=TrainConfig.workers, help="data-parallel processes")
    parser.add_argument("--model", type=json.loads, default=None, help="DemoConfig overrides as JSON")
    parser.add_argument("--tail-steps", type=int, default=TAIL.steps, help="steps of the sort-heavy second stage (0: none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, workers=args.workers)
    start = time.time()
    run(args.out, args.seed, cfg, args.model, replace(TAIL, steps=args.tail_steps))
    logger.info("wrote %s in %.1f minutes", args.out, (time.time() - start) / 60)


if __name__ == "__main__":
    main()
