"""The demo (``python -m blocksparse_moe.demo``): runs, reports what it promises, rejects bad flags."""

from __future__ import annotations

import re

import pytest

from blocksparse_moe import demo

SMALL = ["--tokens", "96", "--hidden", "32", "--ffn", "48", "--experts", "4", "--iters", "1", "--backend", "torch"]


def test_demo_reports_drops_errors_and_times(capsys):
    demo.main(SMALL + ["--device", "cpu"])
    out = capsys.readouterr().out
    rows = {m.group(1): m for m in re.finditer(r"^(dMoE|MoE)\s+(\d+) of (\d+)\s+(\S+)\s+(\S+)\s+(\S+) ms$", out, re.M)}
    assert set(rows) == {"dMoE", "MoE"}, out
    dmoe, moe = rows["dMoE"], rows["MoE"]
    assert dmoe.group(2) == "0" and dmoe.group(3) == "192"
    assert float(dmoe.group(4)) < 1e-4  # matches the fp64 dense reference
    assert int(moe.group(2)) > 0  # skewed routing overflows capacity factor 1.0
    assert float(moe.group(4)) > 1e-2  # and the dropped assignments show as error
    assert float(dmoe.group(6)) > 0 and float(moe.group(6)) > 0


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--device", "--backend", "--tokens", "--experts", "--top-k"):
        assert flag in help_text


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--tokens", "0"], "--tokens must be a positive integer, got 0"),
        (["--top-k", "9"], "MoEConfig.top_k must be in [1, num_experts=4], got 9"),
        (["--backend", "cuda"], "invalid choice: 'cuda'"),
        (["--device", "nonsense"], "--device must name a torch device, got 'nonsense'"),
    ],
)
def test_demo_rejects_bad_flags(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        demo.main(SMALL[:-2] + argv)  # SMALL without its --backend, then the bad flag
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_restarts_under_the_interpreter_for_triton_on_cpu(monkeypatch):
    """TRITON_INTERPRET must be set before triton is imported: the demo re-executes itself with it."""
    calls = []

    def fake_execve(path, args, env):
        calls.append((args, env))
        raise SystemExit(0)

    monkeypatch.setattr(demo.os, "execve", fake_execve)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit):
        demo.main(["--backend", "triton", "--device", "cpu", "--tokens", "32"])
    (args, env), = calls
    assert args[1:] == ["-m", "blocksparse_moe.demo", "--backend", "triton", "--device", "cpu", "--tokens", "32"]
    assert env["TRITON_INTERPRET"] == "1"
