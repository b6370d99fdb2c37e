"""②-⑤ One request's path through the units: prefill once, hand the KV off, decode its n choices.

n > 1: the prompt is prefilled once, on one prefill rank, which samples choice 0's first token and
exports the prompt's KV (even if choice 0 ends there: `Sequence.share_kv`). All n choices decode
on the one decode rank the router picked, from the same handed-off blocks (object refs: the
latents cross the network once per rank): choice 0 continues from its first token; choice i > 0
gets the whole prompt's KV less its last token, recomputes that token in a decode step and
samples its own first token (seed + i when the request is seeded, so choices differ but stay
reproducible). Each choice is its own decode sequence (the prompt's full KV pages shared on the
decode rank, the rest its own; a unit restart resubmits each
from its produced tokens).

`Choices` yields (choice index, token id, logprob, finish_reason) merged over the n streams;
`stop(i)` ends one choice early (a stop string) and aborts its decode. Requests go through the
replica's own stream sink (serve/delta_feed.py): the units' ranks push its tokens straight there.
Never: shapes responses (serve/responses.py) or validates (serve/inputs.py).
"""
from __future__ import annotations

import asyncio
import dataclasses

import ray

from epserve.errors import unwrap
from epserve.messages import RequestResult
from epserve.model.sampling import SamplingParams
from epserve.pipelines.sequence import Sequence
from epserve.serve.accounting import Live


def choice_params(params: SamplingParams, i: int) -> SamplingParams:
    return params if i == 0 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)


class Choices:
    def __init__(self, router, feed, live: Live, ids: list[int], params: SamplingParams, n: int, tenant: str | None):
        self.router, self.feed, self.live, self.ids, self.params, self.n = router, feed, live, ids, params, n
        self.tenant = tenant
        self.stopped: set[int] = set()
        self.prefill: asyncio.Future | None = None

    def stop(self, i: int) -> None:
        self.stopped.add(i)

    async def _prefill(self) -> RequestResult:
        live, route = self.live, self.live.route
        seq = Sequence(live.rid, self.ids, self.params, tenant=self.tenant, share_kv=self.n > 1)
        pre = await self.feed.prefill(self.router.handle("prefill", route.prefill.unit), seq, route.prefill.rank)
        if pre.error is not None:
            raise pre.error                     # typed (epserve.errors): the ingress renders it
        live.n_cached = pre.n_cached
        return pre

    async def _choice(self, i: int):
        """Yield (token, logprob, finish_reason) of choice i; abort its decode if the consumer leaves."""
        live, route = self.live, self.live.route
        rid = live.rid if i == 0 else f"{live.rid}-{i}"
        finished, decode_unit = False, None
        try:
            decode_unit = self.router.handle("decode", route.decode.unit)
            pre = await self.prefill
            output: list[int] = []
            if i == 0:
                live.n_out += 1
                first = pre.token_ids[0]
                lp = pre.logprobs[0] if pre.logprobs else None
                if pre.finish_reason != "handoff":
                    finished = True
                    yield first, lp, pre.finish_reason
                    return
                yield first, lp, None
                output = [first]
            seq = Sequence(rid, self.ids, choice_params(self.params, i), output_ids=output,
                           kv_blocks=pre.kv_blocks, tenant=self.tenant, n_cached=pre.n_cached,
                           kv_group=live.rid if self.n > 1 else None,
                           draft=list(pre.draft or []) if self.n == 1 else [])   # MTP: the prefill's drafts
            async for d in self.feed.stream(decode_unit, seq, route.decode.rank):
                live.n_out += 1
                finished = d.finish_reason is not None
                yield d.token_id, d.logprob, d.finish_reason
                if i in self.stopped:
                    return
        except ray.exceptions.RayTaskError as exc:   # a sink's or unit's call failed: raise what it raised
            raise unwrap(exc) from None
        finally:
            if not finished and decode_unit is not None:
                self.feed.abort(decode_unit, rid)

    async def __aiter__(self):
        """(index, token, logprob, finish_reason) as they come, over every choice."""
        self.prefill = asyncio.ensure_future(self._prefill())
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i):
            try:
                async for item in self._choice(i):
                    await queue.put((i, item))
            except BaseException as exc:          # travels to the consumer as a value
                await queue.put((i, exc))
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i)) for i in range(self.n)]
        try:
            live_choices = self.n
            while live_choices:
                i, item = await queue.get()
                if item is None:
                    live_choices -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield (i, *item)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if not self.prefill.done():
                self.prefill.cancel()
            elif not self.prefill.cancelled():
                self.prefill.exception()          # retrieved: an error already reached the consumer
            self.router.release(self.live.rid)
