"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, per-request seed, logprobs.

Validation happens here, at the edge, with messages naming the value and the limit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class InvalidRequest(ValueError):
    """A request parameter is out of range; maps to HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                  # -1: off
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None      # number of top alternatives per token (0 = sampled token only)

    def __post_init__(self):
        def bad(param, msg):
            raise InvalidRequest(f"{param}: {msg}", param)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            bad("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", f"must be -1 (off) or >= 1, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", f"must be an integer in [0, 20], got {self.logprobs!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop) or len(stop) > 16:
            bad("stop", "must be up to 16 non-empty strings")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _generator(seed: int | None, n_done: int) -> torch.Generator | None:
    """Seeded requests draw token i from a generator keyed by (seed, i): stateless, so a
    request re-run on a rebuilt unit or another rank samples exactly the same tokens."""
    if seed is None:
        return None
    return torch.Generator().manual_seed((seed * 1_000_003 + n_done) % (2 ** 63))


def sample(logits: torch.Tensor, params: list[SamplingParams], n_done: list[int]
           ) -> tuple[list[int], list[dict | None]]:
    """logits fp32 [B, V], tokens already produced per row -> (token ids [B], logprob info or None).

    Logprobs are of the model's distribution (before temperature/top-p), as OpenAI reports them.
    """
    if all(p.is_greedy and p.logprobs is None for p in params):    # the common case, one batched op
        return logits.argmax(-1).tolist(), [None] * len(params)
    tokens, infos = [], []
    logp_all = torch.log_softmax(logits.float(), -1)
    for i, (p, done) in enumerate(zip(params, n_done)):
        row = logits[i].float()
        if p.is_greedy:
            tok = int(row.argmax())
        else:
            row = row / p.temperature
            if p.top_k > 0:
                kth = row.topk(min(p.top_k, row.numel()))[0][-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = row.softmax(-1)
            if p.top_p < 1:
                sp, si = probs.sort(descending=True)
                drop = sp.cumsum(0) - sp > p.top_p
                sp[drop] = 0
                probs = torch.zeros_like(probs).scatter_(0, si, sp)
            tok = int(torch.multinomial(probs, 1, generator=_generator(p.seed, done)))
        tokens.append(tok)
        if p.logprobs is None:
            infos.append(None)
        else:
            lp = logp_all[i]
            top = lp.topk(p.logprobs) if p.logprobs > 0 else None
            infos.append({"token_id": tok, "logprob": float(lp[tok]),
                          "top": [(int(t), float(v)) for v, t in zip(*top)] if top is not None else []})
    return tokens, infos
