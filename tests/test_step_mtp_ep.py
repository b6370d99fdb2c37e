"""MTP k = 1 on the emulated EP rank (bench/step_mtp_ep.py) on CPU in float32: the forced acceptance
decides how many drafts the verify step accepts, the overlapped verify gives the one-batch verify's
drafts, and `bench step`'s headline reports the MTP blocks with the forced rate stated."""

import pytest
import torch

from epserve.bench import step_ep
from epserve.bench.step_mtp_ep import verify_steps
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence

EMU = {"ranks": 16, "experts": 8, "groups": 1}


def _engine_and_seqs(model_dir, n=4):
    eng = make_local_engine(model_dir, dtype="float32", kv_pages=64, ep_dispatch="emulated", ep_emulate=EMU,
                            mtp_draft=1)
    g = torch.Generator().manual_seed(2)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    seqs = []
    for i in range(n):
        ctx = 20 + 7 * i
        s = Sequence(f"m{i}", torch.randint(4, eng.args.vocab_size, (ctx + 2,), generator=g).tolist(), params)
        s.pages = eng.cache.allocate(eng.cache.pages_for(ctx + 3))
        s.n_computed = ctx
        seqs.append(s)
    return eng, seqs


@pytest.mark.parametrize("acceptance", [0.0, 1.0])
def test_forced_acceptance_sets_the_accepted_drafts_and_overlap_keeps_the_drafts(tiny_mtp_dir, acceptance):
    eng, seqs = _engine_and_seqs(tiny_mtp_dir)
    for static in (False, True):     # True: the fixed-shape MoE path bench step captures in a CUDA graph
        fns, info = verify_steps(eng, seqs, acceptance, seed=0, static=static)
        assert info["acceptance_forced"] and info["acceptance_realised_by_the_mask"] == acceptance
        assert info["output_tokens_per_step"] == len(seqs) * (1 + acceptance)
        with torch.inference_mode():
            kv = eng.cache.kv.clone()
            one = fns["one_batch_mtp"]()
            eng.cache.kv.copy_(kv)
            over = fns["overlapped_mtp"]()
            eng.cache.kv.copy_(kv)
        assert one.shape == (len(seqs), 1)
        assert one.tolist() == over.tolist(), static
    # the same step through accept_and_draft directly: the forced mask is what n_accept reports
    dr, b = eng.drafter, len(seqs)
    rows = torch.tensor(eng.table.rows_for(seqs))
    ids = torch.tensor([t for s in seqs for t in s.token_slice(s.n_computed, s.n_computed + 2)])
    pos = torch.tensor([p for s in seqs for p in (s.n_computed, s.n_computed + 1)])
    batch = dr.verify_batch(ids, pos, torch.ones(2 * b, dtype=torch.long), rows)
    with torch.inference_mode():
        logits, hn = eng.model.forward(batch, eng.cache.kv, with_hidden=True)
        forced = torch.full((b, 1), acceptance == 1.0)
        _, tokens, n_acc, drafts, _ = dr.accept_and_draft(batch, rows, logits, hn, torch.ones(b, dtype=torch.long),
                                                          forced=forced)
        _, _, rule_acc, _, _ = dr.accept_and_draft(batch, rows, logits, hn, torch.ones(b, dtype=torch.long))
    assert n_acc.tolist() == [int(acceptance)] * b
    assert tokens.tolist() == logits.argmax(-1).view(b, 2).tolist()    # emitted tokens stay the target's
    assert drafts.tolist() == one.tolist()
    # random weights: the rule accepts a draft only where it equals the target's argmax
    target = logits.argmax(-1).view(b, 2)
    assert rule_acc.tolist() == (target[:, 0] == ids.view(b, 2)[:, 1]).int().tolist()


def test_bench_step_headline_reports_mtp_at_the_forced_rate(tiny_mtp_dir):
    out = step_ep.run("decode", device="cpu", backend="reference", tokens=4, ranks=16, ctx=40, reps=1,
                      model=tiny_mtp_dir, mtp=True, acceptance=0.75, experts=8, groups=1)
    assert out["mtp"]["acceptance"] == 0.75 and out["mtp"]["acceptance_forced"] is True
    assert out["tokens_per_step_of"] == {"overlapped": 4, "sbo": 4, "one_batch": 4, "overlapped_mtp": 7.0,
                                         "one_batch_mtp": 7.0}
    for block in ("overlapped_mtp", "one_batch_mtp"):
        assert set(out[block]["per_moe_layer_us"]) == {"exchange", "exposed", "hidden"}
        assert out[block]["exchange_us_per_layer"]["dispatch"] > 0
        want = 7.0 / out[block]["held"]["step_ms"] * 1e3
        assert out["tokens_per_s"][block] == pytest.approx(want, rel=1e-2, abs=0.06)     # rounded to 0.1
    with pytest.raises(ValueError, match="acceptance must be in"):
        step_ep.run("decode", device="cpu", model=tiny_mtp_dir, mtp=True, acceptance=1.5)
    with pytest.raises(ValueError, match="mtp: a decode step's drafts"):
        step_ep.run("prefill", device="cpu", model=tiny_mtp_dir, mtp=True)
