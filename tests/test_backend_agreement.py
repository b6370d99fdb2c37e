"""The backend-agreement harness on CPU (tests/backend_agreement.py): teacher forcing on a real engine,
and the flip check on synthetic logits, including planted wrong tokens it must report."""
import torch

from backend_agreement import agreement_along_reference, greedy_logits
from conftest import prompts_of
from epserve.pipelines.local import make_local_engine


def _synthetic(n_req=2, n_steps=6, vocab=32, margin=2.0, noise=0.02, seed=0):
    """Reference logits whose top token leads by `margin` at every step, and a backend's = reference
    + uniform noise in [-noise, noise]; -> (tokens, ref logits, other logits)."""
    g = torch.Generator().manual_seed(seed)
    ref, other, toks = [], [], []
    for _ in range(n_req):
        rl = [torch.randn(vocab, generator=g) for _ in range(n_steps)]
        for x in rl:
            x[int(x.argmax())] = x.topk(2).values[1] + margin
        ref.append(rl)
        other.append([x + (torch.rand(vocab, generator=g) * 2 - 1) * noise for x in rl])
        toks.append([int(x.argmax()) for x in rl])
    return toks, ref, other


def test_teacher_forcing_feeds_the_given_tokens(tiny_dir):
    """The harness the native test relies on, on CPU: a forced run emits exactly the forced tokens (its
    first step's logits are a free run's, later ones differ with the context), and the same backend
    forced along its own greedy path agrees with it at every step."""
    prompts = prompts_of([20, 9, 33], seed=3)
    kw = dict(kernels="reference", dtype="float32")
    free, fl = greedy_logits(make_local_engine(tiny_dir, **kw), prompts, 8)
    toks = [s.output_ids for s in free]
    elsewhere = [[(t + 1) % 100 + 4 for t in ts] for ts in toks]
    forced, gl = greedy_logits(make_local_engine(tiny_dir, **kw), prompts, 8, forced=elsewhere)
    assert [s.output_ids for s in forced] == elsewhere
    assert all(torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1]) for a, b in zip(fl, gl))
    _, sl = greedy_logits(make_local_engine(tiny_dir, **kw), prompts, 8, forced=toks)
    got = agreement_along_reference(toks, fl, sl)
    assert (got.compared, got.worst_diff, got.flips) == (24, 0.0, [])


def test_agreement_counts_every_step_and_finds_no_flip_in_rounding_noise():
    toks, ref, other = _synthetic(n_req=3, n_steps=7)
    got = agreement_along_reference(toks, ref, other)
    assert (got.compared, got.flips, got.unexplained) == (21, [], [])
    assert 0 < got.worst_diff <= 0.02


def test_agreement_excuses_a_near_tie_flipped_by_rounding():
    toks, ref, other = _synthetic()
    a = toks[1][3]
    b = int(ref[1][3].topk(2).indices[1])
    ref[1][3][b] = ref[1][3][a] - 0.01                    # the reference's top two: 0.01 apart
    other[1][3] = ref[1][3] + 0.015                       # the backend: within its noise everywhere ...
    other[1][3][a] -= 0.02                                 # ... the two contenders moved oppositely
    got = agreement_along_reference(toks, ref, other)
    assert [f[:4] for f in got.flips] == [(1, 3, a, b)] and got.unexplained == []


def test_agreement_reports_a_planted_wrong_token_at_every_step_it_occurs():
    """A backend whose logit for one token is wrong (here +3 where the reference leads by 2) flips a
    clear choice: reported as unexplained, and the comparison goes on past it to the next flip."""
    toks, ref, other = _synthetic()
    wrong = [(0, 1), (0, 4), (1, 2)]
    for r, j in wrong:
        b = (toks[r][j] + 1) % 32
        other[r][j][b] = ref[r][j][toks[r][j]] + 1.0
    got = agreement_along_reference(toks, ref, other)
    assert got.compared == 12
    assert [f[:2] for f in got.unexplained] == wrong
    assert all(f[4] > f[5] for f in got.unexplained)       # each margin beyond its step's bound
