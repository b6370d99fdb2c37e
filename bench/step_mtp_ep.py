"""Decode with MTP k = 1 on the emulated EP rank: the verify-and-draft step `bench step --mtp` times
beside the plain decode step (bench/step_ep.py).

Owns: building one verify step of B sequences x S = 2 positions (each sequence's last token and one
draft) on a RankEngine that serves the checkpoint's MTP layer, and the two ways it runs:
  one_batch_mtp     the target forward as one batch (the DecodeBatch with 2 causal queries per
                    sequence the engine's VerifyGraphs replay), then acceptance and the MTP module;
  overlapped_mtp    the target forward on the decode overlap schedule over the same DecodeBatch's
                    two halves of rows (pipelines/overlap.py split_decode, as pipelines/mtp_decode.py
                    runs it), then the same acceptance and MTP module.
Acceptance is FORCED: random weights never accept a draft, so a seeded Bernoulli mask of rate
`acceptance` (default 0.85; DeepSeek reports 85-90 % for the second token in the V3 technical
report) replaces the greedy comparison where pipelines/mtp_decode.py decides it
(`accept_and_draft(forced=...)`); the MTP module then runs over the positions the mask accepted, as
it would after a real acceptance. Output tokens per step = B x (1 + acceptance).
Never: used outside benchmarks (the engine's acceptance is always the rule of model/speculative.py).
"""
from __future__ import annotations

import torch

from epserve.pipelines.overlap import prepare_overlapped, run_overlapped
from epserve.pipelines.sequence import Sequence

DEEPSEEK_ACCEPTANCE = "85-90 % for the second token (DeepSeek-V3 technical report, Multi-Token Prediction Evaluation)"


def check_acceptance(acceptance: float) -> None:
    if not 0.0 <= acceptance <= 1.0:
        raise ValueError(f"--acceptance must be in [0, 1], got {acceptance!r}")


def verify_steps(eng, seqs: list[Sequence], acceptance: float, seed: int, static: bool) -> tuple[dict, dict]:
    """-> ({"overlapped_mtp": fn, "one_batch_mtp": fn}, the JSON's "mtp" block). Each sequence must
    hold n_computed + 2 tokens (its last token and its draft) and pages for them; every fn runs the
    whole verify-and-draft step on the device and returns the next drafts [B, 1] (no host sync, so a
    CUDA graph captures it). static: the overlapped target's MoE layers on the fixed-shape path."""
    check_acceptance(acceptance)
    dr, dev, b = eng.drafter, eng.device, len(seqs)
    assert dr is not None and dr.k == 1, "the engine must serve the MTP layer with one draft (mtp_draft=1)"
    ids = [t for s in seqs for t in s.token_slice(s.n_computed, s.n_computed + 2)]
    pos = [p for s in seqs for p in (s.n_computed, s.n_computed + 1)]
    rows = eng.table.rows_for(seqs)
    t = torch.tensor([ids, pos, [1] * 2 * b, rows + [0] * b, [1] * b + [0] * b], dtype=torch.long).to(dev)
    rows_t, n_draft = t[3, :b], t[4, :b]
    batch = dr.verify_batch(t[0], t[1], t[2], rows_t)
    g = torch.Generator().manual_seed(seed)
    forced = (torch.rand(b, 1, generator=g) < acceptance).to(dev)
    kv = eng.cache.kv

    def one_batch_mtp():
        logits, hn = eng.model.forward(batch, kv, with_hidden=True)
        return dr.accept_and_draft(batch, rows_t, logits, hn, n_draft, forced=forced)[3]

    mbs, mb_rows = prepare_overlapped(eng.model, batch, all_tokens=True, static=static)

    def overlapped_mtp():
        hn = run_overlapped(eng.model, mbs, mb_rows, kv, 2 * b, "decode", all_tokens=True)
        return dr.accept_and_draft(batch, rows_t, eng.model.head_logits(hn), hn, n_draft, forced=forced)[3]

    info = {"draft_tokens": 1, "acceptance": acceptance, "acceptance_forced": True,
            "acceptance_realised_by_the_mask": round(float(forced.float().mean()), 4),
            "why_forced": "random weights never accept a draft; a seeded Bernoulli mask of this rate decides "
                          "acceptance where pipelines/mtp_decode.py does, and the MTP module runs after it",
            "deepseek_reports": DEEPSEEK_ACCEPTANCE, "positions_per_sequence": 2,
            "output_tokens_per_step": round(b * (1 + acceptance), 2)}
    return {"overlapped_mtp": overlapped_mtp, "one_batch_mtp": one_batch_mtp}, info
