"""The load of a chaos run: N concurrent streamed completions, each one classified when it ends.

Outcomes (one per stream):
  completed   the stream ended with its usage chunk and `data: [DONE]`
  error       a clean error: an HTTP status with an OpenAI error body, or an error event in the
              stream (status and message kept)
  refused     no connection (the server was down): retriable, nothing was admitted
  cut         the connection closed mid-stream without [DONE] or an error event
  hung        none of the above within the deadline (must never happen)
Every stream's text is compared with the greedy reference of the same prompt: a completed stream
must equal it, a failed one must be a prefix of it; anything else is a wrong token.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

RETRIABLE = {429, 500, 502, 503, 504}


def make_prompts(n: int, vocab: int = 512, shared_tokens: int = 128, seed: int = 0) -> list[list[int]]:
    """Half the prompts share a `shared_tokens` prefix (full KV-store blocks: hits after the first), each
    with its own suffix; the other half are unique. Token ids avoid the special ones at the bottom."""
    rng = random.Random(seed)
    shared = [rng.randrange(4, vocab) for _ in range(shared_tokens)]
    out = []
    for i in range(n):
        suffix = [rng.randrange(4, vocab) for _ in range(rng.randrange(8, 40))]
        out.append(shared + suffix if i % 2 == 0 else [rng.randrange(4, vocab) for _ in range(64 + i)] + suffix)
    return out


@dataclass
class Stream:
    index: int
    t_start: float = 0.0
    t_first: float | None = None
    t_end: float | None = None
    status: int | None = None
    outcome: str = "hung"
    error: dict | None = None           # {"status", "message", "type", "code"}
    text: str = ""
    n_chunks: int = 0
    request_id: str | None = None
    usage: dict | None = None
    wrong: bool = False
    times: list[float] = field(default_factory=list)    # arrival of every chunk with text (gaps, tokens/s)

    @property
    def max_gap(self) -> float:
        """Longest wait between two of its chunks (0 with fewer than two)."""
        return max((b - a for a, b in zip(self.times, self.times[1:])), default=0.0)

    def brief(self) -> dict:
        return {"i": self.index, "outcome": self.outcome, "status": self.status, "error": self.error,
                "chunks": self.n_chunks, "id": self.request_id, "wrong": self.wrong,
                "s": round((self.t_end or time.time()) - self.t_start, 2)}


def _error_of(body: dict, status: int | None) -> dict:
    err = body.get("error", body) if isinstance(body, dict) else {}
    return {"status": status or err.get("code"), "message": str(err.get("message", body))[:200],
            "type": err.get("type"), "code": err.get("code")}


async def one_stream(client: httpx.AsyncClient, base: str, model: str, prompt: list[int], max_tokens: int,
                     st: Stream, deadline_s: float) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    st.t_start = time.time()

    async def run():
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            st.status = r.status_code
            if r.status_code != 200:
                raw = await r.aread()
                try:
                    st.error = _error_of(json.loads(raw), r.status_code)
                except ValueError:
                    st.error = {"status": r.status_code, "message": raw[:200].decode(errors="replace")}
                st.outcome = "error"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    st.outcome = "completed" if st.usage is not None else "cut"
                    return
                ev = json.loads(data)
                if "error" in ev:
                    st.error = _error_of(ev, ev["error"].get("code") if isinstance(ev["error"], dict) else None)
                    st.outcome = "error"
                    return
                st.request_id = st.request_id or ev.get("id")
                if ev.get("usage"):
                    st.usage = ev["usage"]
                for c in ev.get("choices", []):
                    st.t_first = st.t_first or time.time()
                    st.times.append(time.time())
                    st.text += c.get("text", "")
                    st.n_chunks += 1
            st.outcome = "cut"
    try:
        await asyncio.wait_for(run(), deadline_s)
    except asyncio.TimeoutError:
        st.outcome = "hung"
    except httpx.ConnectError as exc:
        st.outcome, st.error = "refused", {"status": None, "message": f"{type(exc).__name__}: {exc}"[:200]}
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        st.outcome, st.error = "cut", {"status": st.status, "message": f"{type(exc).__name__}: {exc}"[:200]}
    st.t_end = time.time()


async def probe(client: httpx.AsyncClient, base: str, model: str, prompt: list[int], want: str | None,
                max_tokens: int, timeout_s: float) -> tuple[bool, str | None, str]:
    """One non-streamed completion -> (correct answer, request id, what happened)."""
    try:
        r = await client.post(base + "/v1/completions", timeout=timeout_s,
                              json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                                    "ignore_eos": True})
    except httpx.HTTPError as exc:
        return False, None, type(exc).__name__
    if r.status_code != 200:
        return False, None, str(r.status_code)
    out = r.json()
    text = out["choices"][0]["text"]
    return want is None or text == want, out["id"], "ok" if want is None or text == want else "wrong"


@dataclass
class Load:
    """N streams started `stagger_s` apart, plus the reference texts to judge them by."""

    base: str
    model: str
    prompts: list[list[int]]
    max_tokens: int
    reference: list[str] | None = None
    stagger_s: float = 0.03
    deadline_s: float = 240.0
    streams: list[Stream] = field(default_factory=list)

    async def run(self, client: httpx.AsyncClient) -> list[Stream]:
        self.streams = [Stream(i) for i in range(len(self.prompts))]

        async def start(i):
            await asyncio.sleep(i * self.stagger_s)
            await one_stream(client, self.base, self.model, self.prompts[i], self.max_tokens, self.streams[i],
                             self.deadline_s)
        await asyncio.gather(*[start(i) for i in range(len(self.prompts))])
        if self.reference is not None:
            for st in self.streams:
                want = self.reference[st.index]
                st.wrong = st.text != want if st.outcome == "completed" else not want.startswith(st.text)
        return self.streams

    def progress(self, min_chunks: int) -> int:
        """Streams that have received at least min_chunks chunks."""
        return sum(st.n_chunks >= min_chunks for st in self.streams)
