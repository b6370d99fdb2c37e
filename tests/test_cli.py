"""The `epserve` command: real subprocesses, one-line errors, non-zero exits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "epserve", *args], capture_output=True, text=True, timeout=timeout)


def test_make_tiny_model_writes_release_layout(tmp_path):
    r = run("make-tiny-model", str(tmp_path / "m"), "--fp8", "--shards", "2")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["rope_scaling"]["type"] == "yarn"
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()
    assert json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())["chat_template"]
    again = run("make-tiny-model", str(tmp_path / "m"))
    assert again.returncode == 1 and again.stderr.strip().count("\n") == 0 and "already holds" in again.stderr


@pytest.mark.parametrize("args,msg", [(["plan", "/no/such.yaml"], "does not exist"),
                                      (["generate", "--model", "/no/such/dir", "hi"], "no config.json"),
                                      (["report", "--ledger", "/no/such/ledger", "--from", "yesterday"],
                                       "not an ISO time")])
def test_errors_are_one_line_and_nonzero(args, msg):
    r = run(*args)
    assert r.returncode != 0
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_plan_prints_production_placement():
    r = run("plan", "configs/deepseek_v3_prod.yaml", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["roles"]["prefill"]["routed_slots_per_rank"] == 9
    assert plan["roles"]["decode"]["routed_slots_per_rank"] == 2
    assert plan["roles"]["decode"]["ranks"][143]["node"] == 17
