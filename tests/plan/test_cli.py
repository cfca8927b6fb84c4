"""`surge plan` end to end through cmd_plan: table, JSON, exit codes, bad input."""

from __future__ import annotations

import argparse
import json

import pytest

from surge.plan.cli import add_plan_parser, main
from tests.plan.conftest import CONFIGS

MISTRAL = str(CONFIGS / "mistral-7b-instruct-v0.2.json")


def test_table(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([MISTRAL, "--device", "a100-80g", "--context", "8192", "--users", "20"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "KV per token       128.0 KiB (32 layers x 8 KV heads x 128 x 2 (K,V))" in out
    assert "Yes: 20 users fit" in out and "--kv-cache-memory" in out


def test_json(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main([MISTRAL, "--memory", "24GiB", "--device", "rtx3090", "--users", "64", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert rc == 1 and plan["fits"] is False
    assert plan["num_params"] == 7_241_732_096
    assert plan["capacity"]["kv_bytes_per_token"] == 131072
    assert plan["batch1"]["limited_by"] == "bandwidth"
    assert plan["device"]["kind"] == "gpu"


def test_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    main([MISTRAL, "--memory", "64G", "--bandwidth", "50GB/s", "--tflops", "2", "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["device"]["bandwidth"] == 50e9 and plan["device"]["flops"] == 2e12


@pytest.mark.parametrize(
    "argv",
    [
        [MISTRAL],  # a CPU needs --memory
        [MISTRAL, "--device", "tpu"],
        [MISTRAL, "--device", "rtx3090", "--quantization", "int8"],
        [MISTRAL, "--device", "rtx3090", "--context", "0"],
        ["/nonexistent/config.json", "--device", "rtx3090"],
    ],
)
def test_bad_input_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("surge plan: ")


def test_list_devices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-devices"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("rtx3090", "a100-80g", "h200", "cpu"))


def test_subcommand_registration() -> None:
    parser = argparse.ArgumentParser(prog="surge")
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", MISTRAL, "--memory", "24GiB"])
    assert args.func.__name__ == "cmd_plan" and args.memory == 24 * 2**30
