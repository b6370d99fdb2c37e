"""Comparing a backend with the reference backend along the reference's greedy path (the harness of
tests/test_gpu_hot_path.py, unit-tested on CPU in tests/test_backend_agreement.py): greedy runs that
record every step's logits, teacher forcing, and the flip check."""
from __future__ import annotations

import dataclasses

import torch

from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence


def generate(eng, prompts, n=12, logprobs=None) -> list[Sequence]:
    """Greedy requests r0, r1, ... of n tokens each (EOS ignored), run to the end on `eng`."""
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs))
            for i, p in enumerate(prompts)]
    for s in seqs:
        eng.add(s)
    while eng.has_work:
        eng.step()
    return seqs


def greedy_logits(eng, prompts, n, forced: list[list[int]] | None = None):
    """Greedy outputs and, per request, the fp32 logits [V] each step sampled from.

    forced[i]: request i's tokens to emit in place of the engine's own choice (teacher forcing: the
    engine computes its logits on exactly the context `forced` gives it, so every step of every
    request can be compared with the run that produced `forced`)."""
    per: dict[str, list[torch.Tensor]] = {}
    want = {f"r{i}": toks for i, toks in enumerate(forced)} if forced is not None else None
    postprocess = eng.postprocess

    def record(step, logits, *a, **kw):
        if want is not None:
            chosen = torch.zeros_like(logits)       # greedy sampling then draws exactly the forced token
        for i, s in enumerate(step.seqs):
            seen = per.setdefault(s.request_id, [])
            seen.append(logits[i].float().cpu())
            if want is not None:
                chosen[i, want[s.request_id][len(seen) - 1]] = 1
        return postprocess(step, logits if want is None else chosen, *a, **kw)

    eng.postprocess = record
    seqs = generate(eng, prompts, n)
    return seqs, [per[s.request_id] for s in seqs]


@dataclasses.dataclass
class Agreement:
    """A backend's logits compared with the reference's at every step of the reference's greedy path."""
    compared: int                 # steps compared, every step of every request
    worst_diff: float             # max |logit - reference logit| over all steps and the vocabulary
    flips: list[tuple]            # (request, step, reference token, backend token, margin, bound)
    unexplained: list[tuple]      # the flips whose margin exceeds their bound


def agreement_along_reference(ref_tokens: list[list[int]], ref_logits: list[list[torch.Tensor]],
                              other_logits: list[list[torch.Tensor]]) -> Agreement:
    """Compare a backend, teacher-forced along the reference's greedy path, with the reference.

    ref_tokens[r][j]: the reference's greedy token at step j of request r; ref_logits[r][j] and
    other_logits[r][j]: the two backends' logits [V] at that step, on the same context. The backend's
    token there is argmax(other). A flip (backend token b != reference token a) is explained only when
    the reference's own margin lr[a] - lr[b] (at least its top-two margin) is within
    bound = 2 * max |other - ref| over the vocabulary except a and b, at that step: rounding moved
    the other logits that far, so it may move these two as far in opposite directions. The two
    flipped entries are left out because a flip always fits their own difference (lo[b] >= lo[a]
    means lr[a] - lr[b] <= |d[a]| + |d[b]|): measured on them, no flip could ever be unexplained."""
    worst, compared, flips, unexplained = 0.0, 0, [], []
    for r, (toks, rl, ol) in enumerate(zip(ref_tokens, ref_logits, other_logits, strict=True)):
        assert len(toks) == len(rl) == len(ol), f"request {r}: {len(toks)} tokens, {len(rl)} / {len(ol)} logits"
        for j, (a, lr, lo) in enumerate(zip(toks, rl, ol)):
            lr, lo = lr.float(), lo.float()
            assert lr[a] == lr.max(), f"request {r} step {j}: reference token {a} is not its own argmax"
            diff = (lo - lr).abs()
            worst, compared = max(worst, float(diff.max())), compared + 1
            b = int(lo.argmax())
            if b == a or lo[b] == lo[a]:          # a tie the backend may break either way is no flip
                continue
            others = torch.ones_like(diff, dtype=torch.bool)
            others[[a, b]] = False
            bound = 2 * float(diff[others].max())
            flip = (r, j, a, b, round(float(lr[a] - lr[b]), 4), round(bound, 4))
            flips.append(flip)
            if lr[a] - lr[b] > bound:
                unexplained.append(flip)
    return Agreement(compared, worst, flips, unexplained)
