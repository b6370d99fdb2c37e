"""Micro-batch planning for overlap: balanced, complete, and causally ordered."""
import random

import pytest

from epserve.pipelines.overlap import piece_cost, split_two


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
