"""The training recipe end to end at toy size: main run, then the sort-heavy tail, on disk."""

from safetensors.torch import load_file
from tokenizers import Tokenizer

from zizhu.demo import tasks, train
from zizhu.demo.model import DemoConfig, DemoModel

TINY = {"hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "q_lora_rank": 16,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}


def test_tail_stream_weighs_sort_heavily():
    problems = tasks.TrainingStream(0, weights=train.TAIL_WEIGHTS).take(2000)
    share = sum(p.family == "sort" for p in problems) / len(problems)
    expected = train.TAIL_WEIGHTS["sort"] / sum(train.TAIL_WEIGHTS.values())
    assert abs(share - expected) < 0.05 and share > 0.4


def test_tail_continues_from_the_written_checkpoint(tmp_path):
    main = train.TrainConfig(steps=3, batch_size=4, bucket=2, workers=1)
    train.run(tmp_path, 0, main, TINY, tail=train.TrainConfig(steps=0))
    before = load_file(tmp_path / "model.safetensors")
    train.polish(tmp_path, 0, train.TrainConfig(steps=3, batch_size=4, bucket=2, lr=1e-2, warmup=1, ramp=0.0, workers=1), TINY)
    after = load_file(tmp_path / "model.safetensors")
    assert before.keys() == after.keys()
    changed = [k for k in before if not before[k].equal(after[k])]
    assert "model.layers.0.self_attn.q_a_proj.weight" in changed
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "config.json").exists()


def test_held_out_monitor_reports_every_family_and_changes_no_weight(tmp_path):
    states = []
    for every in (0, 2):
        out = tmp_path / str(every)
        train.run(out, 0, train.TrainConfig(steps=5, batch_size=4, bucket=2, workers=1, monitor_every=every), TINY,
                  tail=train.TrainConfig(steps=0))
        states.append(load_file(out / "model.safetensors"))
    assert all(states[0][k].equal(states[1][k]) for k in states[0])

    tokenizer = Tokenizer.from_file(str(tmp_path / "0" / "tokenizer.json"))
    model = DemoModel(DemoConfig(vocab_size=tokenizer.get_vocab_size(), **TINY))
    losses = train.HeldOutMonitor(tokenizer, per_family=2).losses(model, level=2)
    assert set(losses) == set(tasks.FAMILIES) and all(4 < v < 7 for v in losses.values())  # about ln(vocab) untrained
    assert model.training
