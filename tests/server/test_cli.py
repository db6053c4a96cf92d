"""The `zizhu` command line: help, the demo-model fallback, generate and chat on the tiny checkpoint."""

from __future__ import annotations

import io
import sys

import pytest

from zizhu import cli


@pytest.mark.parametrize("command, expected", [([], "serve"), (["serve"], "--api-key"), (["chat"], "--thinking"), (["generate"], "PROMPT")])
def test_help(command, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_missing_demo_model_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "zizhu.demo", None)  # as if zizhu/demo/ were not installed
    assert cli.main(["generate", "hello"]) == 1
    assert "pass a checkpoint directory" in capsys.readouterr().err


def test_memory_sizes():
    assert cli._memory("4GiB") == 4 * 1024**3
    assert cli._memory("512MB") == 512 * 1000**2
    assert cli._memory("0.5") == 0.5
    assert cli._memory("1000000") == 1_000_000


def test_generate(tiny_checkpoint, capsys):
    assert cli.main(["generate", str(tiny_checkpoint), "The weather", "--max-tokens", "6", "--temperature", "0", "--log-level", "warning"]) == 0
    assert capsys.readouterr().out.strip()


def test_chat_session(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    args = ["chat", str(tiny_checkpoint), "--max-tokens", "4", "--temperature", "0", "--thinking", "--log-level", "warning"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert out.count(">>> ") == 4


def test_generate_int8(tiny_checkpoint, capsys):
    args = ["generate", str(tiny_checkpoint), "The weather", "--max-tokens", "4", "--temperature", "0", "--quantization", "int8"]
    assert cli.main([*args, "--log-level", "warning"]) == 0
    assert capsys.readouterr().out.strip()
