"""Overlap: the micro-batch split, the two schedules' order of operations, and exactness."""
import random

import pytest
import torch

from conftest import prompts_of
from epserve.model.sampling import SamplingParams
from epserve.pipelines.batcher import Step
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap import forward_overlapped, piece_cost, schedule_ops, split_two
from epserve.pipelines.overlap_tuner import OverlapTuner, choose_schedule, step_phase, tuner_record
from epserve.pipelines.sequence import Sequence

COMPUTE = {"ATTN-0", "ATTN-1", "FFN", "SHARED", "MLP", "HEAD"}


def covered(pieces, seq_new):
    got = {}
    for p in pieces:
        got.setdefault(p.seq, []).append((p.start, p.end))
    for i, n in enumerate(seq_new):
        spans = sorted(got.get(i, []))
        assert sum(e - s for s, e in spans) == n
        pos = 0
        for s, e in spans:
            assert s == pos and e > s
            pos = e


@pytest.mark.parametrize("seed", range(20))
def test_every_token_once_and_balanced(seed):
    rng = random.Random(seed)
    seq_new = [rng.choice([0, 1, rng.randint(2, 4096)]) for _ in range(rng.randint(1, 12))]
    seq_ctx = [rng.randint(0, 2048) for _ in seq_new]
    mb0, mb1 = split_two(seq_new, seq_ctx)
    covered(mb0 + mb1, seq_new)
    # a cut never leaves a 1-token piece (it would attend in the absorbed decode form)
    assert all(p.end - p.start >= 2 for p in mb0 + mb1 if p.end - p.start < seq_new[p.seq])
    c = [sum(piece_cost(seq_ctx[p.seq], p.start, p.end, 1e-3) for p in mb) for mb in (mb0, mb1)]
    biggest = max((piece_cost(seq_ctx[i], 0, 1, 1e-3) for i, n in enumerate(seq_new) if n), default=0)
    if sum(seq_new) > 1:
        # within one token's cost of each other, or limited by an unsplittable single token
        assert abs(c[0] - c[1]) <= max(2 * biggest + 2, 0.02 * sum(c)) or sum(1 for n in seq_new if n) == 1


def test_a_single_long_prompt_is_split_head_first():
    mb0, mb1 = split_two([4096], [0])
    assert len(mb0) == 1 and len(mb1) == 1
    assert mb0[0].start == 0 and mb1[0].start == mb0[0].end and mb1[0].end == 4096
    # the tail attends to more context, so it gets fewer tokens than the head
    assert mb1[0].end - mb1[0].start < mb0[0].end - mb0[0].start


def test_no_split_when_disallowed_keeps_whole_sequences():
    mb0, mb1 = split_two([100, 10, 10], [0, 0, 0], allow_split=False)
    assert all(p.start == 0 for p in mb0 + mb1)
    assert {p.seq for p in mb0} == {0}


def test_sub_batches_cover_the_step_and_mark_sequence_ends():
    import torch

    from epserve.model.deepseek_v3 import Batch
    from epserve.pipelines.overlap import sub_batches
    seq_new, seq_ctx = [300, 1, 40], [0, 17, 5]
    t = sum(seq_new)
    b = Batch(torch.arange(t), torch.arange(t), seq_new, seq_ctx, torch.zeros(3, 8, dtype=torch.long),
              torch.arange(t))
    mbs, ends = sub_batches(b)
    assert sorted(torch.cat([m.input_ids for m in mbs]).tolist()) == list(range(t))
    assert sorted(s for e in ends for _, s in e) == [0, 1, 2]          # each sequence's last piece, once


def window(ops, start, end):
    """The ops from `start` up to (not including) `end`, as strings."""
    names = [str(o) for o in ops]
    return names[names.index(start):names.index(end)]


def test_decode_runs_the_five_stage_figure():
    """SEED.md's decode figure, one layer of V3 (61 layers, 3 dense): SHARED(0) ATTN-0(1) | MLP(0) |
    ATTN-1(1) | SHARED(1) ATTN-0(0) | MLP(1) | ATTN-1(0), each exchange flying under the other's work."""
    ops = schedule_ops("decode", 61, 3)
    assert window(ops, "DISPATCH[0]@10", "DISPATCH[0]@11") == [
        "DISPATCH[0]@10", "SHARED[0]@10", "COMBINE[1]@9", "ATTN-0[1]@10", "MLP[0]@10", "ATTN-1[1]@10",
        "DISPATCH[1]@10", "SHARED[1]@10", "COMBINE[0]@10", "ATTN-0[0]@11", "MLP[1]@10", "ATTN-1[0]@11"]


def test_prefill_runs_the_two_micro_batch_figure():
    """SEED.md's prefill figure: ATTN(0) | SHARED(1) ATTN(1) | MLP(0) | MLP(1) | SHARED(0)."""
    ops = schedule_ops("prefill", 61, 3)
    assert window(ops, "ATTN-0[0]@10", "ATTN-0[0]@11") == [
        "ATTN-0[0]@10", "ATTN-1[0]@10", "DISPATCH[0]@10", "SHARED[1]@9", "COMBINE[1]@9", "ATTN-0[1]@10",
        "ATTN-1[1]@10", "DISPATCH[1]@10", "MLP[0]@10", "MLP[1]@10", "SHARED[0]@10", "COMBINE[0]@10"]


@pytest.mark.parametrize("kind", ["prefill", "decode"])
@pytest.mark.parametrize("n_layers,n_dense", [(61, 3), (3, 1), (2, 0), (1, 0), (4, 4)])
def test_schedules_respect_dependencies_and_hide_every_exchange(kind, n_layers, n_dense):
    ops = schedule_ops(kind, n_layers, n_dense)
    pos = {str(o): i for i, o in enumerate(ops)}
    assert len(pos) == len(ops)                                  # every op once
    chain_moe = ["ATTN-0", "ATTN-1", "DISPATCH", "MLP", "COMBINE"]
    for j in (0, 1):
        prev_end = -1
        for i in range(n_layers):
            chain = chain_moe if i >= n_dense else ["ATTN-0", "ATTN-1", "FFN"]
            at = [pos[f"{s}[{j}]@{i}"] for s in chain]
            assert at == sorted(at) and at[0] > prev_end, (j, i)   # in order, after the layer below
            if i >= n_dense:
                assert at[1] < pos[f"SHARED[{j}]@{i}"] < at[-1]
            prev_end = at[-1]
        assert pos[f"HEAD[{j}]"] > prev_end
    for i in range(n_layers):
        # the tail of a prompt split across micro-batches attends to its head's latents
        assert pos[f"ATTN-0[0]@{i}"] < pos[f"ATTN-1[1]@{i}"]
        if i < n_dense:
            continue
        for j in (0, 1):                                       # something of the other micro-batch computes
            for launch, wait in ((f"DISPATCH[{j}]@{i}", f"MLP[{j}]@{i}"), (f"MLP[{j}]@{i}", f"COMBINE[{j}]@{i}")):
                if kind == "decode" and j == 1 and i == n_layers - 1 and wait.startswith("COMBINE"):
                    continue                                   # the last combine: the pipeline drains
                between = ops[pos[launch] + 1:pos[wait]]
                assert any(o.stage in COMPUTE and o.mb != j for o in between), (launch, wait)


def test_the_schedules_issue_collectives_in_different_orders():
    """Why a unit picks one schedule per step for all its ranks: mixing them would pair
    one rank's dispatch with another's combine."""
    def issued(kind):
        return [str(o) for o in schedule_ops(kind, 5, 1) if o.stage in ("DISPATCH", "MLP")]
    assert issued("prefill") != issued("decode")
    assert sorted(issued("prefill")) == sorted(issued("decode"))


def test_choose_schedule_on_off():
    assert step_phase(True, 0) == "prefill" and step_phase(False, 8) == "decode"
    assert step_phase(False, 1) is None                    # one sequence per rank: nothing to split
    assert choose_schedule("off", "prefill") is None
    assert choose_schedule("on", "decode") == "decode"
    assert choose_schedule("on", None) is None
    with pytest.raises(ValueError, match="schedule 'both'"):
        schedule_ops("both", 3, 1)


@pytest.mark.parametrize("split_ms,plain_ms,want", [(5.0, 9.0, True), (14.0, 7.0, False)])
def test_auto_keeps_what_it_measured_faster_and_rechecks(split_ms, plain_ms, want):
    t = OverlapTuner(probes=3, period=20)
    used = []
    for step in range(45):
        sched = choose_schedule("auto", "decode", t)
        split = sched is not None
        used.append(split)
        noise = (step % 3) * 0.1
        tuner_record(t, "decode", split, (split_ms if split else plain_ms) + noise)
    assert used[:6] == [True, False] * 3                     # probes alternate
    assert used[6:20] == [want] * 14                         # then the faster one
    assert used[20:26] == [True, False] * 3 and used[26:40] == [want] * 14   # each period re-checks
    assert t.best == {"decode": want}
    assert choose_schedule("auto", "prefill", t) == "prefill"  # another phase probes on its own


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return make_local_engine(tiny_dir, redundant_experts=4, kv_pages=64)


def _batches(engine):
    """Prefill of uneven prompts (one long enough to be split), pure decode batches of 1, 2 and 5,
    and a mixed step: decode rows with a prompt chunk that attends to cached context."""
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"x{i}", p, params) for i, p in enumerate(prompts_of([150, 3, 40, 1, 77], seed=3))]
    yield "prefill", Step(seqs, [len(s.prompt_ids) for s in seqs], True), seqs
    for s in seqs:
        engine.add(s)
    engine.step()                                              # the real prefill, with the plain path
    for k in (1, 2, 5):
        yield f"decode{k}", Step(seqs[:k], [1] * k, False), None
    chunk = seqs[0]
    chunk.n_computed = 60                                      # recompute 60.. of a cached prompt
    yield "mixed", Step([seqs[1], chunk, seqs[2]], [1, len(chunk.all_ids) - 60 - 1, 1], False), None
    chunk.n_computed = len(chunk.all_ids) - 1


def test_overlapped_logits_equal_the_plain_forward(engine):
    for name, step, fresh in _batches(engine):
        if fresh is not None:                                  # pages for the prompts, not yet in a batcher
            for s in fresh:
                s.pages = engine.cache.allocate(engine.cache.pages_for(len(s.prompt_ids)))
        batch = engine.prepare(step)
        kv = engine.cache.kv.clone()
        want = engine.model.forward(batch, kv)
        for kind in ("prefill", "decode"):
            trace = []
            got = forward_overlapped(engine.model, batch, engine.cache.kv.clone(), kind, trace)
            # the same math per token; GEMMs over other row counts round differently (~1e-6)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=f"{name} on {kind}")
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (name, kind)
            assert trace == [str(o) for o in schedule_ops(kind, engine.args.n_layers, engine.args.n_dense_layers)]
        if fresh is not None:
            for s in fresh:
                engine.cache.free(s.pages)
                s.pages = []


@pytest.mark.parametrize("n_q", [1, 2])
def test_a_fixed_shape_decode_step_splits_by_rows_and_gives_the_one_batch_logits(engine, n_q):
    """A DecodeBatch (the engine's decode step, padded to a graph bucket; n_q = 2: MTP's verify rows)
    runs each schedule as two halves of its rows, on the fixed-shape path and off it: the one-batch
    forward's logits for every row, live or padding."""
    from epserve.model.deepseek_v3 import DecodeBatch
    from epserve.pipelines.overlap import split_decode
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"d{i}", p, params) for i, p in enumerate(prompts_of([9, 30, 5, 17, 12], seed=4))]
    for s in seqs:
        engine.add(s)
    engine.step()                                                         # prefill: the rows have context
    try:
        for live in (1, 2, 5):
            pad = 8 - live                                                # a bucket of 8 rows
            rows = engine.table.rows_for(seqs[:live]) + [engine.table.scratch_row] * pad
            ids = [t for s in seqs[:live] for t in s.all_ids[-n_q:]] + [0] * pad * n_q
            pos = [len(s.all_ids) - n_q + j for s in seqs[:live] for j in range(n_q)] + list(range(n_q)) * pad
            t = torch.tensor(ids), torch.tensor(pos), torch.tensor(rows)
            valid = torch.tensor([j == 0 or i % 2 == 0 for i in range(8) for j in range(n_q)])  # absent drafts
            batch = DecodeBatch.from_rows(*t, engine.table.tables, engine.cache.page_size, engine.table.scratch_row,
                                          n_q=n_q, valid=valid)
            halves = split_decode(batch)
            assert [h.n_tokens for h in halves] == [4 * n_q, 4 * n_q]
            assert torch.equal(torch.cat([h.input_ids for h in halves]), batch.input_ids)
            assert torch.equal(torch.cat([h.seq_lens for h in halves]), batch.seq_lens)
            want = engine.model.forward(batch, engine.cache.kv.clone())
            for kind in ("decode", "prefill", "sbo"):
                for static in (False, True):   # off the fixed-shape path every row is routed (valid unread)
                    got = forward_overlapped(engine.model, batch, engine.cache.kv.clone(), kind, static=static)
                    rows_ = slice(None) if static else batch.valid
                    torch.testing.assert_close(got[rows_], want[rows_], rtol=0, atol=2e-5,
                                               msg=f"{live} live, {kind}, static {static}")
                    assert torch.equal(got[rows_].argmax(-1), want[rows_].argmax(-1))
    finally:
        for s in seqs:
            engine.abort(s.request_id)


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_a_one_row_fixed_shape_step_runs_its_empty_half_on_the_static_path(engine, kind):
    """A unit decoding one sequence (graph bucket 1): its second micro-batch is empty, and the fixed-shape
    MoE path must pass it through (it gathered rows out of an empty tensor), giving the one-batch logits."""
    from epserve.model.deepseek_v3 import DecodeBatch
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    seq = Sequence("one", prompts_of([11], seed=6)[0], params)
    engine.add(seq)
    engine.step()
    try:
        t = torch.tensor([seq.last_token]), torch.tensor([seq.n_computed]), torch.tensor(engine.table.rows_for([seq]))
        batch = DecodeBatch.from_rows(*t, engine.table.tables, engine.cache.page_size, engine.table.scratch_row)
        want = engine.model.forward(batch, engine.cache.kv.clone())
        got = forward_overlapped(engine.model, batch, engine.cache.kv.clone(), kind, static=True)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
        assert engine.step(schedule=kind)                       # the engine's own decode step under it
    finally:
        engine.abort(seq.request_id)


def test_one_row_decode_step_pairs_with_an_empty_micro_batch():
    from epserve.model.deepseek_v3 import Batch, DecodeBatch
    from epserve.pipelines.overlap import split_decode
    one = DecodeBatch(torch.tensor([5]), torch.tensor([7]), torch.tensor([7]), torch.zeros(1, 2, dtype=torch.int32),
                      torch.tensor([8], dtype=torch.int32), torch.tensor([True]))
    first, second = split_decode(one)
    assert first.n_tokens == 1 and isinstance(second, Batch) and second.n_tokens == 0


def test_profile_writes_a_browser_trace_of_each_overlapped_step(ray_cluster, tiny_dir, tmp_path):
    """`epserve bench overlap --profile DIR`: Chrome traces of a prefill and a decode step on every rank,
    with each schedule stage as a named range."""
    import json

    from epserve.bench.overlap import profile
    out = profile(str(tmp_path), model=tiny_dir)
    assert sorted(p.rsplit("/", 1)[1] for p in out["traces"]) == [
        "decode-rank0.json", "decode-rank1.json", "prefill-rank0.json", "prefill-rank1.json"]
    for phase in ("prefill", "decode"):
        names = {e.get("name") for e in json.load(open(tmp_path / f"{phase}-rank1.json"))["traceEvents"]}
        want = {str(o) for o in schedule_ops(phase, 3, 1)}                 # the tiny model: 3 layers, 1 dense
        assert want <= names, sorted(want - names)
        assert set(out[phase]["stage_ms_rank0"]) == {o.stage for o in schedule_ops(phase, 3, 1)}


def test_injected_transport_shares_one_link_between_exchanges_in_flight():
    """transport.bandwidth: two exchanges launched together take twice as long as one (splitting a
    batch must not double its bandwidth); transport.latency: added to each."""
    from epserve.kernels import reference
    from epserve.model.ep_dispatch import AllToAllDispatcher
    from epserve.model.moe_dispatch import ExpertMap
    from epserve.placement.topology import initial_phy2log
    em = ExpertMap(initial_phy2log(1, 8, 8), 8, 2, 2)
    d = AllToAllDispatcher(reference, em, 0, 0, 2, 2, latency_s=0.010, bandwidth=1e6)
    import time
    t = time.perf_counter()
    first, second = d._ready_at(5000), d._ready_at(5000)          # 5 ms of transfer each
    assert first - t == pytest.approx(0.015, abs=0.002)
    assert second - first == pytest.approx(0.005, abs=0.002)
    assert AllToAllDispatcher(reference, em, 0, 0, 2, 2)._ready_at(10 ** 9) == 0.0   # no injection: no wait
