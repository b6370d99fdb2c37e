"""SamplingParams and the sampler: greedy, temperature, top-k, top-p, min-p, per-request seed, logprobs.

Validation happens here, at the edge, with messages naming the value and the limit. Penalties,
logit bias and grammar masks change the logits before the draw (model/logit_adjust.py: one
LogitAdjust of per-row tensors per step, built by the rank from its requests' state).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from epserve.errors import InvalidRequest
from epserve.model.grammar import GrammarSpec
from epserve.model.logit_adjust import LogitAdjust


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
    min_p: float = 0.0               # drop tokens with p < min_p * p(most likely), after temperature
    presence_penalty: float = 0.0    # OpenAI: logit -= presence * (count > 0), counts of produced tokens
    frequency_penalty: float = 0.0   # OpenAI: logit -= frequency * count
    repetition_penalty: float = 1.0  # CTRL/HF: tokens in prompt or output: logit / r if > 0 else logit * r
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias in [-100, 100]) added to the logits
    grammar: GrammarSpec | None = None               # constrained decoding: only tokens the grammar allows
    grammar_after: int | None = None  # the grammar starts after this token (a reasoning model's </think>, as in vLLM)
    n: int = 1                       # LLM.generate: choices per prompt, as vLLM's (HTTP takes the request's `n`)

    def __post_init__(self):
        def bad(param, msg):
            raise InvalidRequest(f"{param}: {msg}", param)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
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
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                bad(name, f"must be a number in [-2, 2], got {v!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 10:
            bad("repetition_penalty", f"must be in (0, 10], got {r!r}")
        bias = tuple((int(t), float(b)) for t, b in (self.logit_bias.items() if isinstance(self.logit_bias, dict)
                                                     else self.logit_bias or ()))
        if len(bias) > 1024 or any(t < 0 or not -100 <= b <= 100 for t, b in bias):
            bad("logit_bias", "must map at most 1024 token ids >= 0 to biases in [-100, 100]")
        object.__setattr__(self, "logit_bias", bias)
        if self.grammar_after is not None and (self.grammar is None or isinstance(self.grammar_after, bool)
                                               or not isinstance(self.grammar_after, int) or self.grammar_after < 0):
            bad("grammar_after", f"must be a token id >= 0 and needs a grammar, got {self.grammar_after!r}")
        if self.grammar is not None and self.ignore_eos:
            bad("ignore_eos", "cannot be combined with a response_format or tool grammar (the grammar ends at EOS)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop) or len(stop) > 16:
            bad("stop", "must be up to 16 non-empty strings")
        object.__setattr__(self, "stop", stop)
        ids = tuple(self.stop_token_ids or ())
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids) or len(ids) > 64:
            bad("stop_token_ids", "must be up to 64 token ids >= 0")
        object.__setattr__(self, "stop_token_ids", ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether the rank must count this request's tokens (penalties read the counts)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


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


def sample(logits: torch.Tensor, params: list[SamplingParams], n_done: list[int],
           adjust: LogitAdjust | None = None) -> tuple[list[int], list[dict | None]]:
    """logits fp32 [B, V], tokens already produced per row -> (token ids [B], logprob info or None).

    Batched on the logits' device: `adjust` (penalties, logit bias, grammar masks; per-row
    tensors, rows without any pay nothing) first, then temperature, top-k, top-p and min-p as
    per-row tensors, then the Gumbel-max draw (argmax of log p + Gumbel noise, which samples
    from p). One host transfer per call (the tokens and the logprobs asked for). Logprobs are of
    the model's distribution (before any adjustment or temperature/top-k/top-p), as OpenAI
    reports them.
    """
    b, v = logits.shape
    dev = logits.device
    raw = logits
    if adjust is not None:
        logits = adjust.apply(logits)
    tok = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if not p.is_greedy]
    if hot:
        tok = tok.clone()
        rows = torch.tensor(hot, device=dev)
        x = logits[rows].float() / torch.tensor([params[i].temperature for i in hot], device=dev)[:, None]
        top_k = torch.tensor([params[i].top_k if params[i].top_k > 0 else v for i in hot], device=dev)
        top_p = torch.tensor([params[i].top_p for i in hot], device=dev, dtype=torch.float32)
        if any(params[i].min_p > 0 for i in hot):
            min_p = torch.tensor([params[i].min_p for i in hot], device=dev, dtype=torch.float32)
            probs = x.softmax(-1)
            x = x.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
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
    lp = torch.log_softmax(raw[rows].float(), -1)
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
