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


def _balance_by_hand(load, phy2log, n_gpus: int) -> list[float]:
    """Per layer: max / mean GPU load, where a logical expert's tokens split evenly over its replicas
    and GPU g holds the slots [g * R / n_gpus, (g + 1) * R / n_gpus)."""
    out = []
    for w, slots in zip(load.tolist(), phy2log.tolist()):
        per_slot = [w[e] / slots.count(e) for e in slots]
        k = len(slots) // n_gpus
        gpus = [sum(per_slot[g * k:(g + 1) * k]) for g in range(n_gpus)]
        out.append(max(gpus) / (sum(gpus) / n_gpus))
    return out


def test_eplb_offline_table_from_a_saved_load_matrix(tmp_path):
    """`epserve eplb --stats` prints, for the production prefill shape (288 slots on 4 nodes x 8 GPUs),
    each layer's balancedness under the reference EPLB and the default one: the numbers the two
    algorithms' placements give when the loads are summed per GPU by hand."""
    import torch

    from epserve.placement import eplb, eplb_baseline
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(4, 256, generator=g) ** 4 * 1000).round()
    torch.save(load, tmp_path / "load.pt")
    r = run("eplb", "--stats", str(tmp_path / "load.pt"), "--json")
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)
    assert table["shape"] == {"layers": 4, "experts": 256, "num_replicas": 288, "num_groups": 8, "num_nodes": 4,
                              "num_gpus": 32}
    assert set(table["per_layer"]) == {"baseline", "improved"}      # spare slots: no identity placement
    for name, algo in (("baseline", eplb_baseline), ("improved", eplb)):
        want = _balance_by_hand(load.double(), algo.rebalance_experts(load.double(), 288, 8, 4, 32)[0], 32)
        assert table["per_layer"][name] == pytest.approx(want, abs=1e-4), name
        assert table["summary"][name]["mean"] == pytest.approx(sum(want) / 4, abs=1e-4)
        assert table["summary"][name]["max"] == pytest.approx(max(want), abs=1e-4)
        assert all(1.0 <= b < 1.5 for b in want)                    # both spread this skewed load
    text = run("eplb", "--stats", str(tmp_path / "load.pt"))
    assert text.returncode == 0 and "4 layers x 256 experts -> 288 slots on 32 GPUs" in text.stdout
    bad = run("eplb", "--stats", str(tmp_path / "missing.npy"))
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1 and "does not exist" in bad.stderr


def test_report_from_a_ledger_prints_the_seed_table_json_and_png(tmp_path):
    from datetime import datetime, timedelta, timezone

    from epserve.fleet.ledger import CapacityRow, LedgerWriter, RequestRow
    t0 = datetime(2025, 2, 27, 4, 0, tzinfo=timezone.utc)
    with LedgerWriter(tmp_path / "ledger") as w:
        w.append(CapacityRow(ts=t0, unit="decode-0", role="decode", event="start", gpus=8))
        for i in range(10):
            w.append(RequestRow(ts=t0 + timedelta(minutes=5 * i + 1), request_id=f"r{i}", tenant="t", model="m",
                                prompt_tokens=1000, cache_hit_tokens=600, output_tokens=100, ttft_s=0.5,
                                decode_s=5.0, finish_reason="stop"))
        w.append(CapacityRow(ts=t0 + timedelta(hours=1), unit="decode-0", role="decode", event="stop", gpus=8))
    r = run("report", "--ledger", str(tmp_path / "ledger"), "--json", "--plot", str(tmp_path / "day.png"))
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["input_tokens"] == 10000 and rep["cache_hit_tokens"] == 6000 and rep["output_tokens"] == 1000
    assert abs(rep["gpu_hours"] - 8.0) < 1e-6 and abs(rep["cost_usd"] - 16.0) < 1e-6
    assert (tmp_path / "day.png").stat().st_size > 1000
    text = run("report", "--ledger", str(tmp_path / "ledger"))
    assert text.returncode == 0 and "margin" in text.stdout


def _ledger_with_bad_parts(root):
    """Ten good rows, a part whose token column has another type, and a truncated part."""
    from datetime import datetime, timedelta, timezone

    import pyarrow as pa
    import pyarrow.parquet as pq

    from epserve.fleet.ledger import CapacityRow, LedgerWriter, RequestRow
    t0 = datetime(2025, 2, 27, 4, 0, tzinfo=timezone.utc)
    rows = [RequestRow(ts=t0 + timedelta(minutes=i + 1), request_id=f"r{i}", tenant="t", model="m",
                       prompt_tokens=1000, cache_hit_tokens=600, output_tokens=100, ttft_s=0.5, decode_s=5.0,
                       finish_reason="stop") for i in range(13)]
    with LedgerWriter(root) as w:
        w.append(CapacityRow(ts=t0, unit="decode-0", role="decode", event="start", gpus=8))
        for r in rows[:10]:
            w.append(r)
    with LedgerWriter(root / "x") as w:                       # two more parts, then spoiled
        for r in rows[10:]:
            w.append(r)
    made = sorted((root / "x" / "requests").glob("*.parquet"))[0]
    table = pq.read_table(made)
    typed = table.set_column(table.schema.get_field_index("output_tokens"), "output_tokens",
                             pa.array(["many"] * table.num_rows))
    pq.write_table(typed, root / "requests" / "part-zz-other-type.parquet")
    (root / "requests" / "part-zz-torn.parquet").write_bytes(made.read_bytes()[:200])
    return t0


def test_report_names_unreadable_parts_and_fails_unless_told_to_skip(tmp_path):
    _ledger_with_bad_parts(tmp_path / "ledger")
    r = run("report", "--ledger", str(tmp_path / "ledger"), "--json")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "2 unreadable ledger part(s)" in r.stderr and "--skip-bad-parts" in r.stderr
    led = json.loads(r.stdout)["ledger"]
    assert led["unreadable_parts"] == 2 and led["skipped_rows"] == 3 and led["parts_with_unknown_rows"] == 1
    named = {p["path"].rsplit("/", 1)[1]: p for p in led["bad_parts"]}
    assert set(named) == {"part-zz-other-type.parquet", "part-zz-torn.parquet"}
    assert named["part-zz-other-type.parquet"]["rows"] == 3 and named["part-zz-torn.parquet"]["rows"] is None
    assert all(p["reason"] for p in named.values())
    assert json.loads(r.stdout)["output_tokens"] == 1000           # the readable rows, nothing invented
    text = run("report", "--ledger", str(tmp_path / "ledger"), "--skip-bad-parts")
    assert text.returncode == 0 and "unreadable: 2; skipped rows: 3 + the rows of 1 part(s)" in text.stdout
    assert "part-zz-other-type.parquet (3 rows): ArrowInvalid" in text.stdout
    assert "part-zz-torn.parquet (unknown rows)" in text.stdout


def test_report_over_a_clean_ledger_says_nothing_was_skipped(tmp_path):
    _ledger_with_bad_parts(tmp_path / "ledger")
    for p in (tmp_path / "ledger" / "requests").glob("part-zz-*"):
        p.unlink()
    r = run("report", "--ledger", str(tmp_path / "ledger"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ledger"] == {"parts": 2, "unreadable_parts": 0, "bad_parts": [], "skipped_rows": 0,
                                              "restored_rows": 0, "parts_with_unknown_rows": 0, "null_rows": 0, "duplicate_rows": 0}
