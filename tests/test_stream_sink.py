"""Stream sinks on a real unit (rank processes, gloo): the ranks push each request's deltas straight
to its own sink, a rebuilt unit resumes a sink's requests, and a dead sink's requests stop."""
from __future__ import annotations

import sys
import time

import pytest
import ray

from conftest import prompts_of, single_rank_outputs, wait_unit_empty
from epserve.actors.stream_sink import StreamSink
from epserve.actors.unit import UnitSupervisor
from epserve.errors import ContextTooLong, InvalidRequest, UnitFailed, UnitLost
from epserve.messages import RankSpec
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence
from epserve.placement.topology import UnitShape

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])     # SinkOwner below runs in a worker
N_NEW = 12


def greedy(n=N_NEW):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def unit(ray_cluster, tiny_dir):
    args = read_config(tiny_dir)
    sup = UnitSupervisor.remote(7, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=64),
                                UnitShape(1, 2, args.n_routed_experts, 2), n_moe_layers=args.n_moe_layers,
                                step_timeout_s=60)
    ray.get(sup.start.remote(), timeout=180)
    yield sup
    ray.get(sup.shutdown.remote(), timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    prompts = prompts_of([7, 21, 12, 33, 9, 15], seed=11)
    return prompts, single_rank_outputs(tiny_dir, prompts, greedy())


class _Recorder:
    """Stands in for a sink handle in the pure routing test: records what `deliver.remote` got."""

    def __init__(self, name: str):
        self._actor_id = type("Id", (), {"hex": lambda _self: name})()
        self.got: list = []
        self.deliver = type("M", (), {"remote": lambda _self, d: self.got.append(d)})()


def test_sink_routes_send_each_sink_only_its_requests_in_numbered_pushes():
    from epserve.actors.sink_routes import SinkRoutes
    from epserve.messages import TokenDelta
    a, b = _Recorder("a"), _Recorder("b")
    routes = SinkRoutes("unit-key", rank=1, generation=3)
    for rid, sink in (("a1", a), ("a2", a), ("b1", b)):
        seq = Sequence(rid, [1, 2], greedy(), sink=sink)
        routes.add(seq)
        assert seq.sink is None                                   # nothing per step carries the handle
    routes.add(Sequence("driven", [1], greedy()))                 # no sink: pushed nowhere
    def tok(rid, t, fin=None):
        return TokenDelta(rid, t, None, fin)
    too_long = ContextTooLong(2040, 10, 2048, "max_tokens")
    assert routes.push([tok("a1", 5), tok("b1", 6), tok("a2", 7, "length"), tok("driven", 8)],
                       [("b1", too_long)]) == 2
    assert [d.deltas.request_ids for d in a.got] == [["a1", "a2"]] and a.got[0].rejected == []
    assert [d.deltas.request_ids for d in b.got] == [["b1"]] and b.got[0].rejected == [("b1", too_long)]
    assert (a.got[0].unit, a.got[0].rank, a.got[0].generation, a.got[0].seq) == ("unit-key", 1, 3, 0)
    assert routes.push([tok("a1", 9), tok("a2", 1), tok("b1", 2)], []) == 1     # a2 finished, b1 rejected
    assert [d.seq for d in a.got] == [0, 1] and routes.n_sent == 3
    assert routes.drop_sink("a") == ["a1"] and routes.push([tok("a1", 3)], []) == 0


def _drain_feed(sink, rids: set[str]) -> dict[str, list[int]]:
    """Read a sink's feed until every request in rids finished -> tokens per request."""
    got: dict[str, list[int]] = {rid: [] for rid in rids}
    open_ = set(rids)
    for ref in sink.feed.options(num_returns="streaming").remote():
        for rid, item in ray.get(ref, timeout=120):
            assert rid in rids, rid                               # only this sink's requests
            assert not isinstance(item, Exception) and item is not None, item
            got[rid].append(item.token_id)
            if item.finish_reason is not None:
                open_.discard(rid)
        if not open_:
            return got
    raise AssertionError("feed ended")


def test_two_sinks_each_get_only_their_requests_deltas(unit, reference):
    prompts, want = reference
    a, b = StreamSink.remote(), StreamSink.remote()
    a_items = [(Sequence(f"a{i}", prompts[i], greedy()), i % 2) for i in range(3)]
    b_rids = {f"b{i}" for i in range(3, 6)}
    a_ref = a.generate.remote(unit, a_items)
    ray.get([b.open_stream.remote(unit, Sequence(f"b{i}", prompts[i], greedy()), i % 2) for i in range(3, 6)])
    b_got = _drain_feed(b, b_rids)
    a_got = ray.get(a_ref, timeout=120)
    assert [g.token_ids for g in a_got] == want[:3]
    assert [b_got[f"b{i}"] for i in range(3, 6)] == want[3:]
    sa, sb = ray.get([a.stats.remote(), b.stats.remote()])
    assert sa["deltas"] == sb["deltas"] == 3 * N_NEW              # each its own tokens, none of the other's
    assert sa["untracked"] == sb["untracked"] == 0
    assert sb["deliveries"] < sb["deltas"] and sb["feed_yields"] <= sb["deliveries"]   # batched on the way
    status = ray.get(unit.status.remote())
    assert status["sinks"] == 2 and status["in_flight"] == 0     # the supervisor's default sink never started
    assert not hasattr(UnitSupervisor, "deliver")                 # and it has no delta path of its own
    ray.kill(a)
    ray.kill(b)


def test_a_rank_killed_mid_stream_resumes_the_sinks_requests(unit, reference):
    prompts, want = reference
    sink = StreamSink.remote()
    long = greedy()
    ref = sink.generate.remote(unit, [(Sequence(f"k{i}", p, long), i % 2) for i, p in enumerate(prompts[:4])])
    steps0 = ray.get(unit.status.remote())["steps"]
    deadline = time.time() + 60
    while ray.get(unit.status.remote())["steps"] < steps0 + 3 and time.time() < deadline:
        time.sleep(0.02)
    restarts = ray.get(unit.status.remote())["restarts"]
    ray.kill(ray.get(unit.rank_handles.remote())[1], no_restart=True)
    late = sink.generate.remote(unit, [(Sequence("late", prompts[4], long), 1)])   # during the rebuild: once
    got = ray.get(ref, timeout=300)
    assert [g.token_ids for g in got] == want[:4]
    assert ray.get(late, timeout=120)[0].token_ids == want[4]
    assert ray.get(unit.status.remote())["restarts"] == restarts + 1
    ray.kill(sink)


@ray.remote(num_cpus=0)
class SinkOwner:
    """Stands in for an ingress replica: owns a sink with a long request running through it."""

    def start(self, unit, items) -> None:
        self.sink = StreamSink.remote()
        self.pending = self.sink.generate.remote(unit, items)

    def sink_stats(self) -> dict:
        return ray.get(self.sink.stats.remote())


def test_a_dead_sinks_requests_are_aborted_on_the_ranks(unit):
    owner = SinkOwner.remote()
    steps0 = ray.get(unit.status.remote())["steps"]
    items = [(Sequence(f"orphan{i}", list(range(5, 40)), greedy(2000)), i % 2) for i in range(2)]
    ray.get(owner.start.remote(unit, items))
    deadline = time.time() + 60
    while sum(s.n_running for s in ray.get(unit.stats.remote())) < 2 and time.time() < deadline:
        time.sleep(0.05)
    assert sum(s.n_running for s in ray.get(unit.stats.remote())) == 2
    assert ray.get(unit.status.remote())["in_flight"] == 2
    ray.kill(owner)                                    # the sink dies with its owner
    stats = wait_unit_empty(unit, 30.0)
    assert sum(s.n_running + s.kv_blocks_used for s in stats) == 0
    status = ray.get(unit.status.remote())
    assert status["in_flight"] == 0
    assert status["steps"] - steps0 < 1900                # cut short: they were aborted, not finished


def test_a_dead_supervisor_fails_its_requests_instead_of_hanging(ray_cluster, tiny_dir):
    args = read_config(tiny_dir)
    sup = UnitSupervisor.remote(8, "decode", RankSpec(tiny_dir, kernels="reference", kv_pages=64),
                                UnitShape(1, 1, args.n_routed_experts), n_moe_layers=args.n_moe_layers,
                                step_timeout_s=60)
    ray.get(sup.start.remote(), timeout=180)
    sink = StreamSink.remote()
    ref = sink.generate.remote(sup, [(Sequence("gone", list(range(5, 40)), greedy(2000)), 0)])
    deadline = time.time() + 60
    while not sum(s.n_running for s in ray.get(sup.stats.remote())) and time.time() < deadline:
        time.sleep(0.05)
    ray.kill(sup)                                      # its ranks die with it
    try:
        res = ray.get(ref, timeout=30)[0]
        assert isinstance(res.error, UnitLost) and "supervisor is gone" in str(res.error)
    finally:
        ray.kill(sink)
        # a killed supervisor cannot remove its unit's placement group: free the GPU for later tests
        from ray.util import placement_group_table, remove_placement_group
        from ray.util.placement_group import get_placement_group
        for pg in placement_group_table().values():      # named epserve/direct/<supervisor id>/... (groups.py)
            if f"/{sup._actor_id.hex()}/" in pg["name"] and pg["state"] != "REMOVED":
                remove_placement_group(get_placement_group(pg["name"]))


def test_a_poisoned_batch_fails_the_sinks_requests_and_the_unit_serves_on(unit, reference):
    """After three rebuilds with no token in between the supervisor restarts with `fail`: the sinks
    fail that unit's unfinished requests instead of resubmitting them; later requests run."""
    prompts, want = reference
    sink = StreamSink.remote()
    ref = sink.generate.remote(unit, [(Sequence("poisoned", list(range(5, 40)), greedy(2000)), 0)])
    deadline = time.time() + 60
    while not sum(s.n_running for s in ray.get(unit.stats.remote())) and time.time() < deadline:
        time.sleep(0.05)
    ray.get(unit._restart.remote("test: a poisoned batch", UnitFailed("failed 3 times in a row: test")), timeout=180)
    res = ray.get(ref, timeout=30)[0]
    assert type(res.error) is UnitFailed and str(res.error) == "failed 3 times in a row: test"
    after = ray.get(sink.generate.remote(unit, [(Sequence("after", prompts[0], greedy()), 1)]), timeout=120)
    assert after[0].token_ids == want[0]
    assert ray.get(unit.status.remote())["in_flight"] == 0
    ray.kill(sink)


def test_a_ranks_refusal_reaches_the_caller_as_its_own_class(unit, reference):
    """A request the rank's batcher refuses comes back through the Delivery and the sink as the
    error the rank raised (class and fields), not as text; the unit keeps serving."""
    prompts, want = reference
    sink = StreamSink.remote()
    try:
        bad = [(Sequence("too-long", [5] * 2040, greedy(10)), 0), (Sequence("bad-id", [1, 99999], greedy(2)), 1)]
        long, bad_id = ray.get(sink.generate.remote(unit, bad), timeout=120)
        assert type(long.error) is ContextTooLong
        assert (long.error.n_prompt, long.error.max_tokens, long.error.max_len) == (2040, 10, 2048)
        assert long.error.param == "max_tokens" and long.error.status == 400
        assert type(bad_id.error) is InvalidRequest and bad_id.error.param == "prompt"
        ok = ray.get(sink.generate.remote(unit, [(Sequence("fine", prompts[0], greedy()), 0)]), timeout=120)
        assert ok[0].token_ids == want[0]
    finally:
        ray.kill(sink)
