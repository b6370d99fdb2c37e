"""The chaos suite's CI subset: real faults against one live `epserve serve`, 32 streams each.

One server (bench/chaos_server.py: its own simulated cluster of 2-node prefill and decode units and
a spare node, the KV store on a tmpfs of its own, the ledger on disk) is shared by every test here;
the faults run one at a time in the order below, the whole-server kill last. `epserve bench chaos`
runs the full table (also the ingress replica and a whole node). Every fault, whatever else: no
stream hangs, no token differs from the unfaulted greedy run, no billed row is missing from the
ledger, and a request sent after the fault is answered correctly.
"""
from __future__ import annotations

import asyncio

import pytest

from epserve.bench.chaos import Chaos
from epserve.bench.chaos_server import ChaosServer

N_STREAMS = 32
SURVIVED = ("prefill-rank", "decode-rank", "ledger", "eplb-controller", "capacity-controller", "kv-corrupt",
            "ledger-truncate", "kv-disk-full")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, tiny_dir):
    srv = ChaosServer(tmp_path_factory.mktemp("chaos"), tiny_dir)
    try:
        srv.start()
        c = Chaos(srv, n_streams=N_STREAMS)
        asyncio.run(c.reference_run())
        yield c
    finally:
        srv.close()


def assert_nothing_wrong(row: dict) -> None:
    assert row["hung"] == 0, row["streams"]
    assert row["wrong"] == 0 and not row.get("probe_wrong"), row["streams"]
    assert row["ledger_lost"] == 0, row["lost_ids"]
    assert row["recover_s"] is not None, row
    assert row["errors_retriable"], row["error_bodies"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", SURVIVED)
def test_every_stream_survives_the_fault(chaos, fault):
    """Ranks are rebuilt with their requests resumed, the ledger and the controllers are restarted by
    Ray, bad KV blocks are misses, a full KV disk pauses writes, a truncated part is read from its
    copy: every stream completes with the reference tokens."""
    if fault == "kv-disk-full" and not chaos.srv.has_small_fs:
        pytest.skip("no user namespace here for a small file system of our own (a real ENOSPC)")
    row = asyncio.run(chaos.run_fault(fault))
    assert_nothing_wrong(row)
    assert row["completed"] == N_STREAMS, row["streams"]
    if fault in ("ledger", "eplb-controller", "capacity-controller"):
        assert row["restarted_s"] is not None
    if fault == "kv-corrupt":
        assert row["corrupted_blocks"] > 0 and row["corrupt_blocks_dropped"] >= 2   # the shared prefix's, at least
    if fault == "ledger-truncate":
        assert "truncated" in row
    if fault == "kv-disk-full":
        assert "No space left on device" in row["fill"] and row["blocks_written_while_full"] == 0
        assert row["writes_resumed_s"] is not None


@pytest.mark.timeout(400)
def test_sigkill_of_the_whole_server_loses_no_billed_row(chaos):
    """Every process of the server killed at once, then `epserve serve` again on the same paths: the
    streams in flight are cut (or refused while it is down), every response that was sent is in the
    ledger (the new ledger replays the dead one's log), and the restarted server answers correctly."""
    row = asyncio.run(chaos.run_fault("server-sigkill"))
    assert_nothing_wrong(row)
    assert row["completed"] + row["cut"] + row["refused"] + row["error"] == N_STREAMS
    assert row["cut"] > 0 and row["restart_s"] > 0
