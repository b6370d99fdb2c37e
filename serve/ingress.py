"""① The front door and ⑥ the way back: OpenAI routes on Ray Serve.

/v1/completions and /v1/chat/completions (SSE streaming and not; n choices, tools, structured
outputs, reasoning, FIM, prefix completion), /tokenize and /detokenize, /v1/models, /health, /metrics. Requests are validated here (bad input is a 4xx with an OpenAI-style body,
never a 500), tokenised with the checkpoint's tokenizer and chat template, routed
(serve/router.py), prefilled on a prefill rank, handed to the chosen decode rank and
streamed back. A client that disconnects aborts its request and frees its KV pages.
Parsing lives in serve/inputs.py (grammars: serve/structured.py), the path through the units
in serve/generation.py, answers and chunks in serve/responses.py, tenants and limits in
serve/tenants.py, each request's ledger row in serve/accounting.py. Over 300 lines: the two response shapes (one JSON body,
SSE) each own their error, abort and accounting paths.
"""

import asyncio
import dataclasses
import json
import logging
import time
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from epserve.config import Config, context_len, kv_store_spec, ledger_root
from epserve.errors import (AuthenticationError, EpserveError, InvalidRequest, Unavailable, http_error,
                            unwrap)
from epserve.messages import Usage
from epserve.model.checkpoint import read_config
from epserve.model import chat_templates as ct
from epserve.model.grammar import GrammarCache, load_lltokenizer
from epserve.model.tokenizer import IncrementalText, load_tokenizer, tokenizer_json
from epserve.pipelines.prefix_cache import cacheable_blocks, open_store
from epserve.serve.accounting import Accounting, Live
from epserve.serve.chat_mode import ChatMode, ChatModes
from epserve.serve.delta_feed import DeltaFeed
from epserve.serve.generation import Choices
from epserve.serve.inputs import Inputs, too_large
from epserve.serve.metrics import ServeMetrics
from epserve.serve.openai_models import ChatRequest, CompletionRequest, parse
from epserve.serve.responses import ChoiceState, Shape
from epserve.serve.router import Router, RouterClient
from epserve.serve.structured import check_grammar
from epserve.serve.tokenize import TokenizeRoutes
from epserve.serve.tenants import Tenant, TenantTable, live_serve_config

log = logging.getLogger("epserve.ingress")
app = FastAPI(title="epserve", docs_url=None, redoc_url=None)


def _limited(tenant: Tenant):
    """What the router needs to keep a tenant's limits (for every replica at once): its name and
    limits, without its keys; None for a tenant without limits."""
    if tenant.limits is None:
        return None
    return dataclasses.replace(tenant, limits=dataclasses.replace(tenant.limits, api_keys=()))


def _render(exc: BaseException, rid: str | None = None) -> tuple[int, dict, dict]:
    """The one answer to any failure: (status, OpenAI body, headers), a family error as its class
    says (epserve.errors), anything else a 500 naming it. A server-side (5xx) failure is logged."""
    status, body, headers = http_error(exc)
    if status >= 500:
        log.error("request %s failed: %r", rid, unwrap(exc), exc_info=exc)
    return status, body, headers


def _error_response(exc: BaseException, rid: str | None = None) -> JSONResponse:
    status, body, headers = _render(exc, rid)
    return JSONResponse(body, status_code=status, headers=headers)


class _Stream(StreamingResponse):
    """SSE that calls `on_close` however the response ends. A client that leaves before the first
    byte cancels the response before its body generator has started, and a generator that never
    started runs no `finally` (its request would stay admitted, its tenant slot taken, until shutdown)."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(app)
class Ingress:
    async def __init__(self, cfg: Config, model_dir: str, prefill_units: list = (), decode_units: list = (),
                       ledger=None, capacity=None, router=None, units=None):
        if units is not None:        # bound to what serve/units.py's deployment owns, not to units given
            parts = await units.parts.remote()
            prefill_units, decode_units = parts["prefill"], parts["decode"]
            ledger, capacity, router = parts["ledger"], parts["capacity"], parts["router"]
        self.cfg, self.model_name = cfg, cfg.serve.model_name
        # Serve's id for this replica, sent as x-epserve-replica on every generation answer: which of
        # several ingress replicas served a request is otherwise invisible from outside
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.args = read_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_len = context_len(cfg.max_model_len, self.args.max_position_embeddings)
        units = None if capacity is not None else {"prefill": prefill_units, "decode": decode_units}
        # the deployment's shared RouterActor (any number of replicas admit through it), else a local one
        self.router = RouterClient(router) if router is not None else Router(units, cfg.serve.max_queue,
                                                                             cfg.kv_page_tokens, controller=capacity)
        self.metrics = ServeMetrics()
        self.feed = DeltaFeed()             # this replica's stream sink: the ranks push its tokens there
        self.tenants = TenantTable(cfg.serve)          # who asks; their limits are kept by the router
        self.inputs = Inputs(self.tokenizer, self.args.vocab_size, self.max_len, cfg.serve.max_messages,
                             cfg.serve.max_n)
        # the checkpoint's tool-call syntax and thinking, the served names and what each selects
        self.modes = ChatModes(cfg.serve, self.tokenizer)
        # the edge compiles every grammar once (cached per spec) so a bad one is a 400 here
        self.grammars = GrammarCache(load_lltokenizer(tokenizer_json(model_dir),
                                                      self.args.vocab_size, self.args.eos_token_ids)) \
            if self.tokenizer is not None else None
        self.tokenize_routes = TokenizeRoutes(self.inputs, self.modes, self.max_len)
        spec = kv_store_spec(cfg)
        # the ingress only asks the store how long a prompt's cached prefix is (before balancing)
        mtp = cfg.mtp.n_draft > 0
        self.kv_store = open_store(spec, model_dir, self.args.n_layers + mtp, self.args.cache_dim, cfg.dtype,
                                   fp8_activations=cfg.fp8_activations, mtp=mtp,
                                   index_dim=self.args.index_head_dim) if spec else None
        # a request's row ends when it does (finished, failed, or its client gone): its routing
        # booking and tenant slot go with it, even before its generator is closed
        self.acct = Accounting(ledger, ledger_root(cfg), self.model_name,
                               on_end=lambda live: self.router.release(live.rid))

    async def __del__(self):
        """Serve's graceful shutdown (after draining): rows for what is still in flight, and every write.
        A replica whose __init__ failed has no accounting yet (Serve still calls this)."""
        acct = getattr(self, "acct", None)
        if acct is not None:
            await acct.drain()

    async def check_health(self) -> None:
        """Serve's periodic probe: fails once the shared router is dead (a killed Units replica took it),
        so Serve replaces this replica and the new one binds to the Units replica Serve started instead."""
        await self.router.check_alive()

    def reconfigure(self, user_config: dict) -> None:
        """Serve's in-place update (this deployment's `user_config`): API keys and tenant limits for the
        next request, units untouched. Limits travel with each admission to the shared router, so a new
        one holds at once; a bad user_config raises ConfigError naming the key."""
        self.tenants = TenantTable(live_serve_config(self.cfg.serve, user_config))

    # ---- plain routes -----------------------------------------------------------------
    @app.get("/health")
    async def health(self):
        try:
            await asyncio.wait_for(self.router.refresh(force=True), 10)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)[:200]}, status_code=503)
        return {"status": "ok", "prefill_ranks": len(self.router.prefill_stats),
                "decode_ranks": len(self.router.decode_stats)}

    @app.get("/v1/models")
    async def models(self, request: Request):
        if (err := self._auth(request)[1]) is not None:
            return err
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "epserve", "max_model_len": self.max_len}
                                           for name in self.modes.names]}

    @app.get("/metrics")
    async def metrics(self):
        await self.metrics.collect(self.router)       # a failing source is logged and counted, the rest served
        body = self.metrics.render(self.router.prefill_stats, self.router.decode_stats, len(self.router.in_flight))
        return Response(body, media_type="text/plain; version=0.0.4")

    # ---- generation routes ------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return self._tagged(await self._handle(request, CompletionRequest, chat=False))

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return self._tagged(await self._handle(request, ChatRequest, chat=True))

    def _tagged(self, out) -> Response:
        """The answer (a body dict or a response, errors and streams included) naming this replica."""
        response = out if isinstance(out, Response) else JSONResponse(jsonable_encoder(out))   # as FastAPI would
        response.headers["x-epserve-replica"] = self.replica
        return response

    @app.post("/tokenize")
    async def tokenize(self, request: Request):
        return await self._plain(request, self.tokenize_routes.tokenize)

    @app.post("/detokenize")
    async def detokenize(self, request: Request):
        return await self._plain(request, self.tokenize_routes.detokenize)

    async def _plain(self, request: Request, fn):
        """An authenticated JSON route that runs no model (tokenize, detokenize)."""
        if (err := self._auth(request)[1]) is not None:
            return err
        try:
            try:
                data = json.loads(await self._body(request))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            return fn(data)
        except EpserveError as exc:
            return _error_response(exc)

    def _auth(self, request: Request):
        """(tenant, None) or (None, the 401 response)."""
        tenant = self.tenants.resolve(request.headers.get("authorization", ""))
        if tenant is None:
            return None, _error_response(AuthenticationError("invalid or missing API key (Authorization: Bearer ...)"))
        return tenant, None

    async def _body(self, request: Request) -> bytes:
        """The request body, read no further than serve.max_body_bytes (413 past it)."""
        limit = self.cfg.serve.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large("the request body (bytes)", int(declared), limit, "max_body_bytes")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise too_large("the request body (bytes) at least", len(body), limit, "max_body_bytes")
        return bytes(body)

    async def _handle(self, request: Request, model_cls, chat: bool):
        endpoint = "chat" if chat else "completions"
        tenant, err = self._auth(request)
        if err is not None:
            self.metrics.requests.labels(endpoint, "401").inc()
            return err
        try:
            raw = await self._body(request)
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
            self.inputs.check_counts(data, chat)
            req = parse(model_cls, data)
            mode = self.modes.resolve(req.model, req.chat_template_kwargs) if chat else ChatMode(False)
            if not chat:
                self.modes.check_name(req.model)
            plan = self.inputs.tool_plan(req, chat, self.modes.syn)
            ids = self.inputs.prompt_ids(req, chat, plan, mode.template_kwargs)
            params = self.inputs.params(req, chat, len(ids), plan)
            check_grammar(self.grammars, params.grammar)
            end_think = self.tokenizer.token_id(ct.END_THINK) if self.tokenizer else None
            if (mode.reasoning and params.grammar is not None and end_think is not None
                    and end_think not in ids):    # (a prefix-completed answer may be past its reasoning)
                # the reasoning stays free text; the answer after </think> follows the grammar
                params = dataclasses.replace(params, grammar_after=end_think)
            if not chat and req.echo and req.logprobs is not None:
                raise InvalidRequest("echo: cannot be combined with logprobs (prompt logprobs are not computed)",
                                     param="echo")
            shape = Shape(chat, mode.reasoning, plan.parse, end_think,
                          self._echo(req, ids) if not chat and req.echo else None, self.modes.syn)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            cached = await asyncio.to_thread(self._cached_tokens, ids, tenant.namespace)   # file checks: off the loop
            try:
                route = await self.router.admit(rid, len(ids), cached, params.max_tokens, req.n,
                                                _limited(tenant))
            except ray.exceptions.RayError as exc:   # the router restarting: retriable, not a bare 500
                raise Unavailable(f"routing is unavailable ({type(exc).__name__}); retry", retry_after=1) from None
            except BaseException:                    # cancelled (the client left): the router undoes the admission
                self.router.release(rid)
                raise
        except EpserveError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error_response(exc)
        live = self.acct.admit(Live(rid, tenant.name, len(ids), route, namespace=tenant.namespace, user=req.user))
        choices = Choices(self.router, self.feed, live, ids, params, req.n,
                          tenant.namespace if self.kv_store else None)
        states = [ChoiceState(i, shape, IncrementalText(self.tokenizer) if self.tokenizer else None, params.stop)
                  for i in range(req.n)]
        if req.stream:
            return _Stream(self._sse(live, req, choices, states, endpoint), on_close=lambda: self._closed(rid))
        return await self._complete(live, req, choices, states, endpoint, request)

    def _closed(self, rid: str) -> None:
        """A stream's response ended, however: a request still open here never reached its generator's own
        ending (the client left before the first byte, so the body never started): abort row, slot back."""
        if rid in self.acct.live:
            self.acct.finish_detached(rid, "abort")
            self.router.release(rid)

    def _echo(self, req, ids: list[int]) -> str:
        return req.prompt if isinstance(req.prompt, str) else (self.tokenizer.decode(ids) if self.tokenizer else "")

    def _cached_tokens(self, ids: list[int], tenant: str) -> int:
        """Prompt tokens the KV store holds for this tenant (a hint for the prefill balancer)."""
        if self.kv_store is None:
            return 0
        keys = self.kv_store.block_keys(ids, tenant)
        return cacheable_blocks(len(ids), self.kv_store.lookup(keys), self.kv_store.block_tokens) \
            * self.kv_store.block_tokens

    # ---- the way back: one JSON body, or SSE ---------------------------------------------------
    async def _take(self, choices: Choices, states: list[ChoiceState]):
        """(state, released text) per token until every choice has ended (stop strings end one early)."""
        async for i, tok, lp, reason in choices:
            st = states[i]
            if st.reason is not None:
                continue                     # tokens computed after a stop string: dropped
            delta = st.push(tok, lp, reason)
            if st.reason is not None:
                choices.stop(i)
            yield st, delta
            if all(x.reason is not None for x in states):
                return

    def _usage(self, live: Live, states: list[ChoiceState], chat: bool) -> tuple[int, Usage]:
        n_tokens = sum(len(st.tokens) for st in states)
        usage = Usage(live.n_prompt, n_tokens, live.n_cached)
        if chat and states and states[0].shape.reasoning:
            usage.reasoning_tokens = sum(st.n_reasoning for st in states)
        return n_tokens, usage

    async def _complete(self, live: Live, req, choices, states, endpoint, request: Request):
        rid, t0, chat = live.rid, live.t0, isinstance(req, ChatRequest)
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(request))
        stream = self._take(choices, states)
        try:
            async for _ in stream:
                live.t_first = live.t_first or time.time()
                if watcher.done():
                    await self.acct.finish(rid, "abort")
                    return Response(status_code=499)
        except asyncio.CancelledError:
            self.acct.finish_detached(rid, "abort")
            raise
        except Exception as exc:             # typed (a rank's refusal, a unit's failure) or not: one renderer
            await self.acct.finish(rid, "error")
            resp = _error_response(exc, rid)
            self.metrics.requests.labels(endpoint, str(resp.status_code)).inc()
            return resp
        finally:
            watcher.cancel()
            await stream.aclose()
        n_tokens, usage = self._usage(live, states, chat)
        await self._account(live, endpoint, n_tokens, states[0].finish_reason)
        body = [st.body(self.inputs.logprobs(chat, st.tokens, st.lps, req)) for st in states]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(t0),
                "model": self.model_name, "choices": body, "usage": usage.to_dict()}

    async def _watch_disconnect(self, request: Request):
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    async def _sse(self, live: Live, req, choices, states, endpoint):
        rid, t0, chat = live.rid, live.t0, isinstance(req, ChatRequest)
        obj = "chat.completion.chunk" if chat else "text_completion"
        stream = self._take(choices, states)

        def event(choice_list, usage=None):
            body = {"id": rid, "object": obj, "created": int(t0), "model": self.model_name, "choices": choice_list}
            if usage is not None:
                body["usage"] = usage
            return "data: " + json.dumps(body) + "\n\n"
        try:
            if chat:
                for st in states:
                    yield event([{"index": st.index, "delta": {"role": "assistant", "content": ""},
                                  "finish_reason": None, "logprobs": None}])
            sent = set()
            async for st, delta in stream:
                live.t_first = live.t_first or time.time()
                lp = self.inputs.logprobs(chat, st.tokens[-1:], st.lps[-1:], req, st.tokens[:-1]) \
                    if st.lps and len(st.lps) == len(st.tokens) else None
                c = st.chunk(delta, lp, first=not chat and st.index not in sent)
                sent.add(st.index)
                if c is not None:
                    yield event([c])
            n_tokens, usage = self._usage(live, states, chat)
            await self._account(live, endpoint, n_tokens, n_tokens and states[0].finish_reason)   # before [DONE]
            if req.include_usage:
                yield event([], usage.to_dict())
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):     # the client went away mid-stream
            self.acct.finish_detached(rid, "abort")
            raise
        except Exception as exc:             # the status line is sent: the error goes in the stream
            await self.acct.finish(rid, "error")
            yield "data: " + json.dumps(_render(exc, rid)[1]) + "\n\n"
        finally:
            await stream.aclose()

    async def _account(self, live: Live, endpoint: str, n_tokens: int, reason) -> None:
        """The finished request's row (awaited: the response follows only once the ledger has it)
        and its metrics."""
        now = time.time()
        await self.acct.finish(live.rid, reason or "unknown", n_out=n_tokens)
        self.metrics.cache_hit_tokens.inc(live.n_cached)
        self.metrics.requests.labels(endpoint, "200").inc()
        self.metrics.prompt_tokens.inc(live.n_prompt)
        self.metrics.observe_tokens(n_tokens)
        if live.t_first:
            self.metrics.ttft.observe(live.t_first - live.t0)
            if n_tokens > 1:
                self.metrics.tpot.observe((now - live.t_first) / (n_tokens - 1))
