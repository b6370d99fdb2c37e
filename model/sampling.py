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


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) in int64 without overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32): any change of input bits flips about half the output bits."""
    x = x & _M32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor, n: int) -> torch.Tensor:
    """u [R, n] in (0, 1): a pure function of (seed, step, index), computed on the device.

    Seeded requests draw token i from (seed, i) alone: stateless, so a request re-run on a
    rebuilt unit, another rank or inside a batch of any other requests samples the same tokens.
    """
    h = _hash32(_hash32(seeds & _M32) ^ _hash32((seeds >> 32) & _M32) ^ 0x9E3779B9)
    h = _hash32(h ^ _hash32(steps & _M32))
    v = torch.arange(n, device=seeds.device, dtype=torch.long)
    return (_hash32(h[:, None] ^ _hash32(v[None, :] + 0x632BE5AB)).double() + 0.5) / 2.0 ** 32


def sample(logits: torch.Tensor, params: list[SamplingParams], n_done: list[int]
           ) -> tuple[list[int], list[dict | None]]:
    """logits fp32 [B, V], tokens already produced per row -> (token ids [B], logprob info or None).

    Batched on the logits' device: temperature, top-k and top-p as per-row tensors, then the
    Gumbel-max draw (argmax of log p + Gumbel noise, which samples from p). One host transfer
    per call (the tokens and the logprobs asked for). Logprobs are of the model's distribution
    (before temperature/top-k/top-p), as OpenAI reports them.
    """
    b, v = logits.shape
    dev = logits.device
    tok = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if not p.is_greedy]
    if hot:
        tok = tok.clone()
        rows = torch.tensor(hot, device=dev)
        x = logits[rows].float() / torch.tensor([params[i].temperature for i in hot], device=dev)[:, None]
        top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else v for i in hot], device=dev)
        top_p = torch.tensor([params[i].top_p for i in hot], device=dev, dtype=torch.float32)
        if any(params[i].top_k > 0 or params[i].top_p < 1 for i in hot):
            sv, si = x.sort(-1, descending=True)
            keep = torch.arange(v, device=dev)[None, :] < top_k[:, None]
            probs = sv.masked_fill(~keep, float("-inf")).softmax(-1)
            keep &= (probs.cumsum(-1) - probs) <= top_p[:, None]     # the smallest prefix holding top_p
            x = torch.full_like(x, float("-inf")).scatter_(1, si, sv.masked_fill(~keep, float("-inf")))
        seeded = [i for i in hot if params[i].seed is not None]
        u = torch.rand(len(hot), v, device=dev, dtype=torch.float64)
        if seeded:
            where = torch.tensor([hot.index(i) for i in seeded], device=dev)
            u[where] = seeded_uniform(torch.tensor([params[i].seed for i in seeded], device=dev),
                                      torch.tensor([n_done[i] for i in seeded], device=dev), v)
        gumbel = -torch.log(-torch.log(u.clamp(1e-300, 1 - 1e-16)))
        tok[rows] = (torch.log_softmax(x, -1).double() + gumbel).argmax(-1)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return tok.tolist(), [None] * b
    n_top = max(params[i].logprobs for i in want)
    rows = torch.tensor(want, device=dev)
    lp = torch.log_softmax(logits[rows].float(), -1)
    chosen = lp.gather(1, tok[rows][:, None])
    top_v, top_i = lp.topk(max(1, n_top), -1)
    packed = torch.cat([tok.double(), chosen.double().flatten(), top_v.double().flatten(), top_i.double().flatten()])
    flat = packed.tolist()                                            # the one host transfer
    tokens = [int(t) for t in flat[:b]]
    chosen_l, rest = flat[b:b + len(want)], flat[b + len(want):]
    k = max(1, n_top)
    tv, ti = rest[:len(want) * k], rest[len(want) * k:]
    infos: list[dict | None] = [None] * b
    for j, i in enumerate(want):
        n = params[i].logprobs
        infos[i] = {"token_id": tokens[i], "logprob": chosen_l[j],
                    "top": [(int(ti[j * k + r]), tv[j * k + r]) for r in range(n)]}
    return tokens, infos
