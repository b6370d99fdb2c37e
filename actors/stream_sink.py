"""StreamSink: whoever streams a request's tokens. It receives the ranks' pushes straight from them.

One sink per ingress replica (serve/ingress.py, owned by it, so it dies with it), one default
sink per unit supervisor (its `generate` / `prefill` / `stream` / `abort` forward there), and any
other caller may start its own. A sink serves requests on any number of units:

  submit: track the request (a `Tracked` keeps prompt + produced tokens), put the sink's handle
          in its Sequence and call the rank's inbox directly (`rank.submit`);
  deliver: each rank pushes one Delivery per sink (deltas of this sink's requests only), applied
          in the rank's push order per (unit, rank, generation); pushes of an older unit build
          are stale and dropped;
  rebuild: the supervisor calls `unit_down` (new submissions are only tracked; with `fail`, the
          unit's unfinished requests fail: a poisoned batch) and then `unit_up` with the new
          build's ranks: every unfinished request submitted to an older build (or held) is
          resubmitted from prompt + produced tokens, exactly once.

It learns a unit's ranks and generation from `supervisor.attach_sink`, which also registers it
for rebuild notices and starts a watch (`watch` never returns; when the sink dies the supervisor
has the ranks abort its requests). It never steps, builds or restarts anything.

`feed()` is the batched path to an ingress replica: one long-lived streaming call that yields
lists of (request_id, item) for every request submitted with `open_stream`, instead of one
generator yield per token per request (`stream`). `generate` given the model dir ends each request
at its first stop string (it reads the text with the checkpoint's tokenizer and aborts the request
on its rank), as the ingress does for its streams.
Over 300 lines: the rebuild protocol and the three ways out (generate, stream, feed) share one
table of tracked requests.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import ray

from epserve.errors import EpserveError, UnitFailed, UnitLost
from epserve.messages import Delivery, RequestResult, TokenDelta
from epserve.model.tokenizer import StopText, load_tokenizer
from epserve.pipelines.sequence import Sequence


@dataclass
class Tracked:
    """The sink's copy of a request: enough to re-run it on a rebuilt unit."""

    seq: Sequence
    unit: str
    rank: int
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: EpserveError | None = None     # what failed it (typed; it crosses Ray as is)
    queue: asyncio.Queue | None = field(default_factory=asyncio.Queue)   # None: fed (see `feed`)
    t_submit: float = field(default_factory=time.time)
    t_first: float | None = None
    kv_blocks: list | None = None      # prefill units: object refs of the handed-off KV blocks
    draft: list | None = None          # prefill units with MTP: the first drafts, handed over with the KV
    generation: int | None = None      # the unit build it was submitted to; None: held (not submitted yet)
    stop: StopText | None = None       # `generate` with a tokenizer: the text, ended at a stop string


@dataclass
class UnitView:
    """What a sink knows of one unit: its build and rank handles, and pushes waiting for an earlier one."""

    handle: object
    key: str
    generation: int = -1
    is_up: bool = False
    ranks: list = field(default_factory=list)
    n_ranks: int = 0
    max_ranks: int = 0             # the most ranks it had (an elastic unit runs on fewer after a death)
    pushes: dict = field(default_factory=dict)      # (rank, generation) -> {seq: Delivery}
    next_push: dict = field(default_factory=dict)   # (rank, generation) -> next seq to apply
    ready: asyncio.Future | None = None

    def newer(self, generation: int, is_up: bool) -> bool:
        return (generation, is_up) > (self.generation, self.is_up)


def unit_key(handle) -> str:
    return handle._actor_id.hex()


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=0)
class StreamSink:
    def __init__(self):
        self.units: dict[str, UnitView] = {}
        self.requests: dict[tuple[str, str], Tracked] = {}     # (unit key, request id) -> Tracked
        self.me = ray.get_runtime_context().current_actor
        self.outbox: list[tuple[str, object]] = []             # fed requests' items for `feed`
        self.out_ready = asyncio.Event()
        self.tokenizers: dict[str, object] = {}                # model dir -> its tokenizer (stop strings)
        self.counters = {"deliveries": 0, "deltas": 0, "untracked": 0, "feed_yields": 0, "stream_yields": 0}

    # ---- units --------------------------------------------------------------------------
    async def _view(self, unit) -> UnitView:
        key = unit_key(unit)
        v = self.units.get(key)
        if v is None:
            v = self.units[key] = UnitView(unit, key)
            v.ready = asyncio.ensure_future(self._attach(v))
        try:
            await asyncio.shield(v.ready)
        except Exception:
            if self.units.get(key) is v:
                del self.units[key]
            raise
        return v

    async def _attach(self, v: UnitView) -> None:
        generation, ranks, is_up = await v.handle.attach_sink.remote(self.me)
        v.n_ranks = v.max_ranks = len(ranks)
        if v.newer(generation, is_up):       # a rebuild notice may have overtaken this answer
            v.generation, v.is_up, v.ranks = generation, is_up, list(ranks)
        asyncio.get_running_loop().create_task(self._watch_unit(v))

    async def _watch_unit(self, v: UnitView) -> None:
        """The supervisor's `watch` never returns: if it fails the unit is gone (its ranks die with
        their supervisor), so its requests fail here instead of waiting forever."""
        try:
            await v.handle.watch.remote()
        except Exception as exc:
            why = UnitLost(f"the unit's supervisor is gone ({type(exc).__name__}); retry")
            if self.units.get(v.key) is v:
                del self.units[v.key]
            for (k, rid), tr in list(self.requests.items()):
                if k == v.key and tr.finish_reason is None and tr.error is None:
                    self._fail(k, rid, why)

    @ray.method(enable_task_events=False)
    async def unit_down(self, key: str, generation: int, fail: EpserveError | None = None) -> None:
        """The unit is being rebuilt as `generation`: hold new submissions; pushes of older builds
        are stale from now. fail: the rebuild follows repeated failures; fail its requests."""
        v = self.units.get(key)
        if v is None or not v.newer(generation, False):
            return
        v.generation, v.is_up = generation, False
        if fail is not None:
            for (k, rid), tr in list(self.requests.items()):
                if k == key and tr.finish_reason is None and tr.error is None:
                    self._fail(k, rid, fail)

    @ray.method(enable_task_events=False)
    async def unit_up(self, key: str, generation: int, ranks: list, moved: dict[int, list[int]] | None = None) -> int:
        """The unit's build `generation` runs: resubmit every unfinished request of this unit that
        went to an older build (or was held), from prompt + produced tokens; -> how many.
        moved (an elastic unit's membership change, actors/unit_elastic.py): old rank -> the new
        ranks its requests go to, dealt round-robin (a survivor: itself, renumbered)."""
        v = self.units.get(key)
        if v is None or not v.newer(generation, True):
            return 0
        v.generation, v.is_up, v.ranks, v.n_ranks = generation, True, list(ranks), len(ranks)
        v.max_ranks = max(v.max_ranks, len(ranks))
        dealt: dict[int, int] = {}
        v.pushes = {k: p for k, p in v.pushes.items() if k[1] >= generation}
        v.next_push = {k: n for k, n in v.next_push.items() if k[1] >= generation}
        per_rank: dict[int, list[Sequence]] = {}
        for (k, rid), tr in self.requests.items():
            if k != key or tr.finish_reason is not None or tr.error is not None:
                continue
            if tr.generation is not None and tr.generation >= generation:
                continue                     # submitted to this build already
            if tr.generation is None:        # never reached a rank: as it came (KV handoff, drafts and all)
                seq = tr.seq
            else:
                s = tr.seq
                seq = Sequence(rid, s.prompt_ids, s.params, output_ids=list(tr.output_ids), n_cached=s.n_cached,
                               tenant=s.tenant, share_kv=s.share_kv, kv_group=s.kv_group)
            seq.sink = self.me
            tr.generation = generation
            if moved is not None:
                old = tr.rank
                to = moved.get(old) or list(range(v.n_ranks))
                tr.rank = to[dealt.get(old, 0) % len(to)]
                dealt[old] = dealt.get(old, 0) + 1
            elif tr.rank >= v.n_ranks:               # held for a rank the unit no longer has
                tr.rank %= v.n_ranks
            per_rank.setdefault(tr.rank, []).append(seq)
        for r, seqs in per_rank.items():
            v.ranks[r].submit.remote(seqs)
        for rank in range(v.n_ranks):        # pushes of this build that came before the notice
            self._drain_pushes(v, rank, generation)
        return sum(len(s) for s in per_rank.values())

    @ray.method(enable_task_events=False)
    async def watch(self) -> None:
        """Never returns: the supervisor's pending call fails when this sink dies."""
        await asyncio.Event().wait()

    # ---- what the ranks push ------------------------------------------------------------
    @ray.method(enable_task_events=False)
    async def deliver(self, d: Delivery) -> None:
        """One rank's push (fire-and-forget from its loop), applied in the rank's push order: an
        async actor may run one caller's calls out of order, and a token applied late would be
        dropped or misplaced."""
        v = self.units.get(d.unit)
        if v is None or d.generation < v.generation:
            return                           # stale: an older build's (its requests were resubmitted)
        v.pushes.setdefault((d.rank, d.generation), {})[d.seq] = d
        if d.generation == v.generation and v.is_up:
            self._drain_pushes(v, d.rank, d.generation)

    def _drain_pushes(self, v: UnitView, rank: int, generation: int) -> None:
        pending = v.pushes.get((rank, generation))
        if not pending:
            return
        n = v.next_push.get((rank, generation), 0)
        while n in pending:
            self._apply(pending.pop(n))
            n += 1
        v.next_push[(rank, generation)] = n

    def _apply(self, d: Delivery) -> None:
        self.counters["deliveries"] += 1
        for rid, why in d.rejected:
            self._fail(d.unit, rid, why)
        for delta in d.deltas.unpack():
            self.counters["deltas"] += 1
            self._deliver(d.unit, delta)

    def _deliver(self, key: str, d: TokenDelta) -> None:
        tr = self.requests.get((key, d.request_id))
        if tr is None:                       # aborted or ended here meanwhile
            self.counters["untracked"] += 1
            return
        if tr.finish_reason is not None:
            return
        if tr.t_first is None:
            tr.t_first = time.time()
        tr.output_ids.append(d.token_id)
        if d.logprob is not None:
            tr.logprobs.append(d.logprob)
        tr.finish_reason = d.finish_reason
        tr.kv_blocks = d.kv_blocks
        tr.draft = d.draft
        tr.seq.n_cached = max(tr.seq.n_cached, d.n_cached)   # billed as hits, as the rank loaded them
        if tr.stop is not None and tr.stop.push(d.token_id):
            if tr.finish_reason is None:     # the text has its stop string: the rank decodes no further
                self._abort_on_rank(key, tr)
            tr.finish_reason = "stop"
        self._put(tr, d)

    def _abort_on_rank(self, key: str, tr: Tracked) -> None:
        v = self.units.get(key)
        if v is not None and v.is_up and tr.generation == v.generation:   # else it is simply not resubmitted
            v.ranks[tr.rank].abort.remote([tr.seq.request_id])

    def _fail(self, key: str, rid: str, why: EpserveError) -> None:
        tr = self.requests.get((key, rid))
        if tr is not None:
            tr.error = why
            self._put(tr, why)

    def _put(self, tr: Tracked, item) -> None:
        if tr.queue is not None:
            tr.queue.put_nowait(item)
            return
        self.outbox.append((tr.seq.request_id, item))
        self.out_ready.set()
        if item is None or isinstance(item, Exception) or item.finish_reason is not None:
            self.requests.pop((tr.unit, tr.seq.request_id), None)    # fed: ends here

    # ---- requests -----------------------------------------------------------------------
    def _submit(self, v: UnitView, items: list[tuple[Sequence, int]], fed: bool = False) -> list[Tracked]:
        """Track every request first, then one inbox call per rank (a rank may answer at once).
        While the unit is rebuilding a request is only tracked: `unit_up` submits it."""
        for i, (seq, rank) in enumerate(items):
            if v.n_ranks <= rank < v.max_ranks:     # an elastic unit lost that rank: its peers take it
                items[i] = (seq, rank % v.n_ranks)
            elif not 0 <= rank < v.n_ranks:
                raise ValueError(f"rank {rank} is not in this unit (0..{v.n_ranks - 1})")
            if (v.key, seq.request_id) in self.requests:
                raise ValueError(f"request id {seq.request_id!r} is already running on this unit")
        trs = []
        for seq, rank in items:
            tr = Tracked(seq, v.key, rank, output_ids=list(seq.output_ids), queue=None if fed else asyncio.Queue())
            self.requests[(v.key, seq.request_id)] = tr
            trs.append(tr)
        if not v.is_up:
            return trs
        per_rank: dict[int, list[Sequence]] = {}
        for tr in trs:
            tr.generation = v.generation
            tr.seq.sink = self.me
            per_rank.setdefault(tr.rank, []).append(tr.seq)
        for r, seqs in per_rank.items():
            v.ranks[r].submit.remote(seqs)
        for tr in trs:
            tr.seq.sink = None                # our copy keeps no handle (it was pickled with the call)
        return trs

    async def _finish(self, tr: Tracked) -> RequestResult:
        key = (tr.unit, tr.seq.request_id)
        while tr.finish_reason is None:
            item = await tr.queue.get()
            if isinstance(item, Exception):
                self.requests.pop(key, None)
                raise item
        self.requests.pop(key, None)
        return self._result(tr)

    @staticmethod
    def _result(tr: Tracked) -> RequestResult:
        return RequestResult(tr.seq.request_id, tr.output_ids, tr.logprobs or None, tr.finish_reason, tr.seq.n_cached,
                             tr.kv_blocks, tr.draft, ttft_s=(tr.t_first or time.time()) - tr.t_submit,
                             decode_s=time.time() - (tr.t_first or 0),
                             text=tr.stop.text if tr.stop is not None else None)

    async def generate(self, unit, items: list[tuple[Sequence, int]], model_dir: str | None = None) -> list[RequestResult]:
        """Run sequences to completion on the given ranks of `unit` (a supervisor handle), one
        RequestResult per item, in order.

        model_dir: with a tokenizer there, a sequence with stop strings ends at the first one, as an
        HTTP stream does: once its text contains one, its rank is told to abort it (it decodes no
        further) and it comes back with finish_reason "stop", `text` cut before the stop string and
        `token_ids` everything produced up to the token that completed it (a step already in flight
        when the abort lands is dropped here). Without it, `text` is None and stop strings are the
        caller's.
        A request that fails comes back with `error` set to the typed error (epserve.errors): a
        RequestError when the request itself was bad (too long, bad token ids), a UnitFailure or
        Unavailable when the unit failed it.
        """
        v = await self._view(unit)
        tok = self._tokenizer(model_dir) if model_dir and any(seq.params.stop for seq, _ in items) else None
        trs = self._submit(v, items)
        for tr in trs:                       # before any await: no delivery has been applied yet
            if tok is not None and tr.seq.params.stop:
                tr.stop = StopText(tok, tr.seq.params.stop)
        results = await asyncio.gather(*[self._finish(tr) for tr in trs], return_exceptions=True)
        return [RequestResult(tr.seq.request_id, error=r if isinstance(r, EpserveError)
                              else UnitFailed(f"{type(r).__name__}: {r}"))
                if isinstance(r, Exception) else r for tr, r in zip(trs, results)]

    def _tokenizer(self, model_dir: str):
        if model_dir not in self.tokenizers:
            self.tokenizers[model_dir] = load_tokenizer(model_dir)
        return self.tokenizers[model_dir]

    @ray.method(enable_task_events=False)
    async def prefill(self, unit, seq: Sequence, rank: int) -> RequestResult:
        """Prefill role: run the prompt, return the first token and the KV blocks' object refs."""
        return (await self.generate(unit, [(seq, rank)]))[0]

    @ray.method(enable_task_events=False)
    async def stream(self, unit, seq: Sequence, rank: int):
        """Yield TokenDeltas as they are produced (one yield each); the caller aborts on disconnect."""
        v = await self._view(unit)
        tr = self._submit(v, [(seq, rank)])[0]
        try:
            while True:
                item = await tr.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:             # aborted
                    break
                self.counters["stream_yields"] += 1
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            if tr.finish_reason is None or tr.finish_reason == "abort":
                await self.abort(unit, seq.request_id)
            self.requests.pop((v.key, seq.request_id), None)

    @ray.method(enable_task_events=False)
    async def open_stream(self, unit, seq: Sequence, rank: int) -> None:
        """Submit a request whose deltas travel in `feed` (raises if it cannot be submitted)."""
        self._submit(await self._view(unit), [(seq, rank)], fed=True)

    @ray.method(enable_task_events=False)
    async def feed(self):
        """The batched path to an ingress replica: yields lists of (request_id, item), item a
        TokenDelta, an Exception (failed), or None (aborted), for every `open_stream` request:
        everything that arrived since the last yield, in one."""
        while True:
            await self.out_ready.wait()
            self.out_ready.clear()
            batch, self.outbox = self.outbox, []
            if batch:
                self.counters["feed_yields"] += 1
                yield batch

    @ray.method(enable_task_events=False)
    async def abort(self, unit, request_id: str) -> bool:
        """Stop a request: its rank drops it before its next step (a step in flight finishes, its
        token is discarded); a `generate` waiting on it returns it with finish_reason "abort"."""
        key = unit_key(unit)
        tr = self.requests.pop((key, request_id), None)
        if tr is None:
            return False
        self._abort_on_rank(key, tr)
        if tr.finish_reason is None:
            tr.finish_reason = "abort"
            if tr.queue is not None:
                tr.queue.put_nowait(None)
        return True

    # ---- observation --------------------------------------------------------------------
    @ray.method(enable_task_events=False)
    async def request_ids(self, key: str) -> set[str]:
        """This sink's requests running on the unit `key` (its supervisor sums them over sinks)."""
        return {rid for k, rid in self.requests if k == key}

    @ray.method(enable_task_events=False)
    async def stats(self) -> dict:
        """Counters: deliveries applied, deltas in them, feed and stream yields; requests tracked."""
        return {**self.counters, "requests": len(self.requests)}
