"""The decode hot path's CPU-side contract: sync-free expert layouts, stacked expert slots, the
fixed-shape DecodeBatch and masked expert path (what CUDA graphs replay), the persistent block
table, the batched sampler, and the native backend's refusal off Hopper. GPU runs are in
tests/test_gpu_hot_path.py."""
from __future__ import annotations

import collections
import math

import pytest
import torch

from conftest import prompts_of
from epserve import kernels
from epserve.kernels import layouts
from epserve.kernels import reference as ref
from epserve.model.deepseek_v3 import Batch, DecodeBatch
from epserve.model.sampling import SamplingParams, sample, seeded_uniform
from epserve.pipelines.block_table import BlockTable
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence


@pytest.mark.parametrize("m, groups, align, seed", [(1, 1, 4, 0), (203, 5, 8, 1), (64, 9, 128, 2), (0, 3, 4, 3)])
def test_contiguous_layout_puts_each_group_in_an_aligned_segment(m, groups, align, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, groups, (m,), generator=g)
    lay = layouts.contiguous_layout(ids, groups, align)
    assert lay.n_rows == math.ceil(m / align) * align + groups * align
    live = ids >= 0
    assert bool((lay.pos[~live] == -1).all())
    pos = lay.pos[live]
    assert len(set(pos.tolist())) == pos.numel()                       # one row each
    assert torch.equal(lay.m_indices[pos].long(), ids[live])           # the row says its group
    assert int((lay.m_indices >= 0).sum()) == int(live.sum())          # the rest is padding
    for grp in range(groups):                                          # segments start aligned, in order
        rows = lay.pos[ids == grp]
        if rows.numel():
            assert int(rows[0]) % align == 0 and torch.equal(rows, rows[0] + torch.arange(rows.numel()))


def test_masked_layout_counts_and_places_rows_without_overflow():
    ids = torch.tensor([2, 0, -1, 2, 1, 0, 0, -1, 2])
    lay = layouts.masked_layout(ids, 3, max_m=5)
    assert lay.masked_m.tolist() == [3, 1, 3]
    assert lay.keep.tolist() == [i >= 0 for i in ids.tolist()]
    placed = {(int(a), int(b)) for a, b, k in zip(lay.group, lay.slot, lay.keep) if k}
    assert len(placed) == 7 and all(s < 5 for _, s in placed)
    assert all(int(lay.slot[i]) == 5 for i in (2, 7))                  # dropped rows: the spare row


def test_mn_major_scales_have_deepgemm_strides():
    s = layouts.empty_mn_major_scales((5, 3), "cpu")
    assert s.shape == (5, 3) and s.stride() == (1, 8)
    s3 = layouts.empty_mn_major_scales((2, 5, 3), "cpu")
    assert s3.shape == (2, 5, 3) and s3.stride() == (24, 1, 8)


def _experts(n_slots=3, inter=32, dim=64, fp8=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def w(n, k):
        t = torch.randn(n, k, generator=g) / k ** 0.5
        return ref.Weight(*ref.per_block_quant_fp8(t), act_quant=True) if fp8 else ref.Weight(t)
    slots = [{"w1": w(inter, dim), "w3": w(inter, dim), "w2": w(dim, inter)} for _ in range(n_slots)]
    like = slots[0]["w1"]
    ex = ref.ExpertWeights.empty(n_slots, inter, dim, like, "cpu")
    for j, s in enumerate(slots):
        ex.set_slot(j, s["w1"], s["w3"], s["w2"])
    return ex, slots


@pytest.mark.parametrize("fp8", [False, True])
def test_stacked_slots_compute_what_each_expert_computes(fp8):
    ex, slots = _experts(fp8=fp8)
    x = torch.randn(20, 64)
    ids = torch.tensor([0, 1, 2, -1] * 5)
    got = ref.expert_ffn(x, ex, ids)
    for i, j in enumerate(ids.tolist()):
        if j < 0:
            assert bool((got[i] == 0).all())
            continue
        s = slots[j]
        want = ref.linear(torch.nn.functional.silu(ref.linear(x[i:i + 1], s["w1"])) * ref.linear(x[i:i + 1], s["w3"]),
                          s["w2"])
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)
    buf = torch.randn(3, 6, 64)
    counts = torch.tensor([6, 0, 2], dtype=torch.int32)
    masked = ref.expert_ffn_masked(buf, ex, counts)
    for gi, n in enumerate(counts.tolist()):
        want = ref.expert_ffn(buf[gi, :n], ex, torch.full((n,), gi))
        torch.testing.assert_close(masked[gi, :n], want, rtol=1e-5, atol=1e-5)


def test_static_expert_path_equals_the_contiguous_one_and_ignores_padding(tiny_dir):
    eng = make_local_engine(tiny_dir, redundant_experts=4)
    d, moe = eng.dispatcher, eng.model.layers[eng.args.n_dense_layers].ffn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, eng.args.dim, generator=g)
    w, idx = moe.gate.forward(x)
    d.take_counts()
    want = d.run(moe.layer, x, idx, w, moe.experts)
    counted = d.take_counts()
    valid = torch.tensor([True] * 6 + [False] * 3)
    got = d.run_static(moe.layer, x, idx, w, moe.experts, valid)
    torch.testing.assert_close(got[:6], want[:6], rtol=1e-5, atol=1e-6)
    assert bool((got[6:] == 0).all())
    static_counts = d.take_counts()
    row = moe.layer - d.first
    assert int(static_counts[row].sum()) == 6 * eng.args.n_activated_experts        # padding not counted
    assert int(counted[row].sum()) == 9 * eng.args.n_activated_experts


def test_decode_batch_forward_equals_the_general_batch(tiny_dir):
    """The fixed-shape decode step (built on the device from table rows) computes what the general
    Batch computes for the same decode rows, and padding rows change nothing."""
    eng = make_local_engine(tiny_dir)
    seqs = [Sequence(f"d{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts_of([70, 5, 130], seed=3))]
    for s in seqs:
        eng.add(s)
    eng.step()                                                     # prefill
    step = eng.batcher.schedule()
    assert not step.is_prefill
    kv = eng.cache.kv.clone()
    want = eng.model.forward(eng.prepare(step), kv.clone())
    rows = eng.table.rows_for(step.seqs) + [eng.table.scratch_row] * 2
    t = torch.tensor([[s.last_token for s in step.seqs] + [0, 0], [s.n_computed for s in step.seqs] + [0, 0], rows])
    batch = DecodeBatch.from_rows(t[0], t[1], t[2], eng.table.tables, eng.cache.page_size, eng.table.scratch_row)
    assert batch.valid.tolist() == [True, True, True, False, False]
    got = eng.model.forward(batch, kv)
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    assert isinstance(eng.prepare(step), Batch)


def test_block_table_writes_pages_once_and_reuses_rows():
    table = BlockTable(n_rows=2, width=4, scratch_page=99, device="cpu")
    a, b, c = (Sequence(n, [1], SamplingParams()) for n in "abc")
    a.pages, b.pages = [5], [7, 8]
    ra, rb = table.rows_for([a, b])
    assert table.tables[ra, :1].tolist() == [5] and table.tables[rb, :2].tolist() == [7, 8]
    a.pages.append(6)
    assert table.rows_for([a, b]) == [ra, rb] and table.tables[ra, :2].tolist() == [5, 6]
    c.pages = [1, 2, 3]
    rc, = table.rows_for([c])                                      # a and b left: their rows are free again
    assert rc in (ra, rb) and table.tables[rc, :3].tolist() == [1, 2, 3]
    assert table.tables[table.scratch_row].tolist() == [99] * 4
    with pytest.raises(RuntimeError, match="wide"):
        c.pages = list(range(5))
        table.rows_for([c])


def test_sampler_draws_from_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 8000
    counts = collections.Counter(sample(logits, [SamplingParams(seed=i)], [0])[0][0] for i in range(n))
    probs = logits.softmax(-1)[0]
    chi2 = sum((counts[i] - n * float(p)) ** 2 / (n * float(p)) for i, p in enumerate(probs))
    assert chi2 < 16.3                                             # p = 0.001 at 3 degrees of freedom


def test_seeded_sampling_does_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 300, generator=g)
    hot = SamplingParams(temperature=0.9, top_p=0.8, top_k=40, seed=11)
    alone = sample(logits[2:3], [hot], [5])[0]
    mixed = sample(logits, [SamplingParams(temperature=0.0), SamplingParams(seed=3), hot, SamplingParams()],
                   [0, 1, 5, 2])[0]
    assert mixed[2] == alone[0]
    assert mixed[0] == int(logits[0].argmax())
    u = seeded_uniform(torch.tensor([7, 7]), torch.tensor([0, 1]), 1000)
    assert not torch.equal(u[0], u[1]) and 0 < float(u.min()) and float(u.max()) < 1


def test_top_k_and_top_p_never_sample_outside_their_set():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 50, generator=g) * 3
    order = logits[0].argsort(descending=True).tolist()
    probs = logits[0].softmax(-1)
    nucleus, acc = [], 0.0
    for t in order:                                               # the smallest prefix holding 0.5
        nucleus.append(t)
        acc += float(probs[t])
        if acc >= 0.5:
            break
    for i in range(300):
        tk = sample(logits, [SamplingParams(top_k=3, seed=i)], [0])[0][0]
        tp = sample(logits, [SamplingParams(top_p=0.5, seed=i)], [0])[0][0]
        assert tk in order[:3] and tp in nucleus


def test_native_backend_refuses_off_hopper_with_the_reason():
    from epserve.kernels import native
    ok, why = native.self_test("cpu")
    assert not ok and ("not importable" in why or "CUDA" in why)
    with pytest.raises(kernels.BackendUnavailable, match="native"):
        kernels.get_backend("native", "cpu")


def test_v3_mini_preset_has_the_shapes_the_native_kernels_take(tmp_path):
    from epserve.model.checkpoint import read_config
    from epserve.model.tiny import make_tiny_model
    out = make_tiny_model(tmp_path / "m", preset="v3-mini", fp8=True)
    a = read_config(out)
    assert (a.kv_lora_rank, a.qk_rope_head_dim, a.fp8_block) == (512, 64, (128, 128))
    assert a.dim % 128 == 0 and a.moe_inter_dim % 128 == 0
    with pytest.raises(ValueError, match="preset"):
        make_tiny_model(tmp_path / "x", preset="v9")
    over = make_tiny_model(tmp_path / "o", preset="v3-mini", config_overrides={"n_routed_experts": 8,
                                                                                "num_experts_per_tok": 8, "n_group": 1,
                                                                                "topk_group": 1})
    assert (read_config(over).n_routed_experts, read_config(over).n_activated_experts) == (8, 8)


def test_choices_of_one_request_share_their_prompt_pages(tiny_dir):
    """n > 1 on a decode rank: the choices' full prompt pages are held once; each choice decodes
    the tokens it would alone, and every page comes back when the last choice ends."""
    eng = make_local_engine(tiny_dir, kv_pages=64)
    prompt = prompts_of([200], seed=21)[0]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    first = Sequence("solo", prompt, params)
    eng.add(first)
    eng.step()                                                      # prefill: the prompt's KV is in the cache
    latents = eng.cache.read_tokens(first.pages, 0, len(prompt))   # what a prefill rank hands off
    while eng.has_work:
        eng.step()
    want = first.output_ids
    free0 = eng.cache.n_free
    choices = [Sequence(f"c{i}", prompt, params, kv_group="req-1") for i in range(3)]
    for c in choices:
        assert eng.add_prefilled(c, latents)
    full = len(prompt) // eng.cache.page_size                       # 3 full pages of 64 tokens
    own = eng.cache.pages_for(len(prompt) + 1) - full
    assert free0 - eng.cache.n_free == full + 3 * own               # shared once, the rest per choice
    while eng.has_work:
        eng.step()
    assert [c.output_ids for c in choices] == [want] * 3
    assert eng.cache.n_free == free0 and not eng.batcher.kv_groups
