"""① The front door and ⑥ the way back: OpenAI routes on Ray Serve.

/v1/completions and /v1/chat/completions (SSE streaming and not), /v1/models, /health,
/metrics. Requests are validated here (bad input is a 4xx with an OpenAI-style body,
never a 500), tokenised with the checkpoint's tokenizer and chat template, routed
(serve/router.py), prefilled on a prefill rank, handed to the chosen decode rank and
streamed back. A client that disconnects aborts its request and frees its KV pages.
Parsing lives in serve/inputs.py, tenants and limits in serve/tenants.py, each request's
ledger row in serve/accounting.py. Over 300 lines: the two response shapes (one JSON body,
SSE) each own their error, abort and accounting paths.
"""

import asyncio
import json
import logging
import time
import uuid

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from epserve.actors.ledger import ledger_root
from epserve.actors.unit import RequestRejected
from epserve.config import Config
from epserve.messages import Usage
from epserve.model.checkpoint import read_config
from epserve.model.sampling import SamplingParams
from epserve.model.tokenizer import IncrementalText, load_tokenizer
from epserve.actors.launch import kv_store_spec
from epserve.pipelines.prefix_cache import cacheable_blocks, open_store
from epserve.pipelines.runner import DTYPES
from epserve.pipelines.sequence import Sequence
from epserve.serve.accounting import Accounting, Live
from epserve.serve.inputs import Inputs, too_large
from epserve.serve.metrics import ServeMetrics
from epserve.serve.openai_models import APIError, ChatRequest, CompletionRequest, parse
from epserve.serve.router import Router, RouterClient
from epserve.serve.tenants import TenantLimits, TenantTable

log = logging.getLogger("epserve.ingress")
app = FastAPI(title="epserve", docs_url=None, redoc_url=None)


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _unwrap(exc: Exception) -> Exception:
    """The error a unit raised, out of Ray's wrapper."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, Exception) else exc


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2048)
@serve.ingress(app)
class Ingress:
    def __init__(self, cfg: Config, model_dir: str, prefill_units: list, decode_units: list, ledger=None,
                 capacity=None, router=None):
        self.cfg, self.model_name = cfg, cfg.serve.model_name
        self.args = read_config(model_dir)
        self.tokenizer = load_tokenizer(model_dir)
        self.max_len = min(cfg.max_model_len or self.args.max_position_embeddings, self.args.max_position_embeddings)
        units = None if capacity is not None else {"prefill": prefill_units, "decode": decode_units}
        # the deployment's shared RouterActor (any number of replicas admit through it), else a local one
        self.router = RouterClient(router) if router is not None else Router(units, cfg.serve.max_queue,
                                                                             controller=capacity)
        self.metrics = ServeMetrics()
        self.tenants, self.limits = TenantTable(cfg.serve), TenantLimits()
        self.inputs = Inputs(self.tokenizer, self.args.vocab_size, self.max_len, cfg.serve.max_messages)
        spec = kv_store_spec(cfg)
        # the ingress only asks the store how long a prompt's cached prefix is (before balancing)
        self.kv_store = open_store(spec, model_dir, self.args.n_layers, self.args.kv_dim,
                                   DTYPES[cfg.dtype], fp8_activations=cfg.fp8_activations) if spec else None
        self.acct = Accounting(ledger, ledger_root(cfg), self.model_name,
                               on_end=lambda live: self.limits.release(live.owner))

    async def __del__(self):
        """Serve's graceful shutdown (after draining): rows for what is still in flight, and every write."""
        await self.acct.drain()

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
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": 0,
                                            "owned_by": "epserve", "max_model_len": self.max_len}]}

    @app.get("/metrics")
    async def metrics(self):
        try:
            await self.router.refresh()
            for role, units in self.router.handles.items():
                for status in await asyncio.gather(*[u.status.remote() for u in units.values()]):
                    self.metrics.observe_unit(role, status)
        except Exception:
            pass
        body = self.metrics.render(self.router.prefill_stats, self.router.decode_stats, len(self.router.in_flight))
        return Response(body, media_type="text/plain; version=0.0.4")

    # ---- generation routes ------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._handle(request, CompletionRequest, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._handle(request, ChatRequest, chat=True)

    def _auth(self, request: Request):
        """(tenant, None) or (None, the 401 response)."""
        tenant = self.tenants.resolve(request.headers.get("authorization", ""))
        if tenant is None:
            return None, _error_response(APIError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                                  "authentication_error", code="invalid_api_key"))
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
        retry = self.limits.acquire(tenant, time.monotonic())
        if retry is not None:
            lim = tenant.limits
            self.metrics.requests.labels(endpoint, "429").inc()
            return _error_response(APIError(
                429, f"tenant {tenant.name!r} is over its limit ({lim.max_requests_per_s:g} requests/s, "
                     f"{lim.max_concurrent} in flight; 0 = unlimited); retry after {retry} s", "rate_limit_error",
                code="tenant_rate_limited", headers={"Retry-After": str(retry)}))
        try:
            raw = await self._body(request)
            try:
                data = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"request body is not valid JSON: {exc}") from None
            self.inputs.check_counts(data, chat)
            req = parse(model_cls, data)
            if req.model != self.model_name:
                raise APIError(404, f"model {req.model!r} does not exist; this server serves {self.model_name!r}",
                               param="model", code="model_not_found")
            ids = self.inputs.prompt_ids(req, chat)
            params = self.inputs.params(req, chat, len(ids))
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            cached = await asyncio.to_thread(self._cached_tokens, ids, tenant.namespace)   # file checks: off the loop
            route = await self.router.admit(rid, len(ids), cached, params.max_tokens)
        except APIError as exc:
            self.limits.release(tenant)
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error_response(exc)
        except BaseException:
            self.limits.release(tenant)
            raise
        live = self.acct.admit(Live(rid, tenant.name, len(ids), route, namespace=tenant.namespace, owner=tenant))
        events = self._generate(live, ids, params)
        if req.stream:
            return StreamingResponse(self._sse(live, req, chat, ids, events, endpoint), media_type="text/event-stream")
        return await self._complete(live, req, chat, ids, events, endpoint, request)

    def _cached_tokens(self, ids: list[int], tenant: str) -> int:
        """Prompt tokens the KV store holds for this tenant (a hint for the prefill balancer)."""
        if self.kv_store is None:
            return 0
        keys = self.kv_store.block_keys(ids, tenant)
        return cacheable_blocks(len(ids), self.kv_store.lookup(keys), self.kv_store.block_tokens) \
            * self.kv_store.block_tokens

    # ---- the request path: prefill rank -> KV handoff -> decode rank ----------------------
    async def _generate(self, live: Live, ids: list[int], params: SamplingParams):
        """Yield (token_id, logprob, finish_reason); counts what the units computed into `live`;
        aborts on the units if the consumer goes away."""
        finished = False
        decode_unit = None
        rid, route = live.rid, live.route
        try:
            decode_unit = self.router.handle("decode", route.decode.unit)
            seq = Sequence(rid, ids, params, tenant=live.namespace if self.kv_store else None)
            pre = await self.router.handle("prefill", route.prefill.unit).prefill.remote(seq, route.prefill.rank)
            if "error" in pre:
                raise (APIError(400, pre["error"]) if pre["rejected"] else RuntimeError(pre["error"]))
            live.n_cached = pre["n_cached"]
            live.n_out += 1
            first = pre["token_ids"][0]
            lp = pre["logprobs"][0] if pre["logprobs"] else None
            if pre["finish_reason"] != "handoff":
                finished = True
                yield first, lp, pre["finish_reason"]
                return
            yield first, lp, None
            seq = Sequence(rid, ids, params, output_ids=[first], kv_blocks=pre["kv_blocks"], tenant=seq.tenant,
                           n_cached=pre["n_cached"])
            gen = decode_unit.stream.options(num_returns="streaming").remote(seq, route.decode.rank)
            async for ref in gen:
                d = await ref
                live.n_out += 1
                finished = d.finish_reason is not None
                yield d.token_id, d.logprob, d.finish_reason
        except ray.exceptions.RayTaskError as exc:
            inner = _unwrap(exc)
            if isinstance(inner, (RequestRejected, ValueError)):
                raise APIError(400, str(inner).splitlines()[-1]) from None
            raise
        finally:
            self.router.release(rid)
            if not finished and decode_unit is not None:
                decode_unit.abort.remote(rid)

    async def _events(self, ids, params, events):
        """Token events -> (text delta, token, logprob, finish_reason), applying stop strings."""
        inc = IncrementalText(self.tokenizer) if self.tokenizer else None
        sent = 0
        async for tok, lp, reason in events:
            if inc is None:
                yield "", tok, lp, reason
                continue
            inc.push(tok)
            text = inc.flush() if reason else inc.text
            cut = min((i for i in (text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                yield text[sent:cut], tok, lp, "stop"
                return
            hold = max((len(s) - 1 for s in params.stop), default=0)   # a stop string may be starting
            safe = len(text) if reason else max(sent, len(text) - hold)
            yield text[sent:safe], tok, lp, reason
            sent = safe

    async def _complete(self, live: Live, req, chat, ids, events, endpoint, request: Request):
        rid, t0 = live.rid, live.t0
        text, tokens, lps, reason = "", [], [], None
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(request))
        stream = self._events(ids, self._sp(req), events)
        try:
            async for delta, tok, lp, why in stream:
                live.t_first = live.t_first or time.time()
                text += delta
                tokens.append(tok)
                if lp is not None:
                    lps.append(lp)
                if why:
                    reason = why
                    break
                if watcher.done():
                    await self.acct.finish(rid, "abort")
                    return Response(status_code=499)
        except APIError as exc:
            await self.acct.finish(rid, "error")
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return _error_response(exc)
        except asyncio.CancelledError:
            self.acct.finish_detached(rid, "abort")
            raise
        except Exception as exc:
            log.exception("request %s failed", rid)
            await self.acct.finish(rid, "error")
            self.metrics.requests.labels(endpoint, "500").inc()
            return _error_response(APIError(500, f"internal error: {str(_unwrap(exc))[:300]}", "server_error"))
        finally:
            watcher.cancel()
            await stream.aclose()
        usage = await self._account(live, endpoint, len(tokens), reason)
        choice = {"index": 0, "finish_reason": reason, "logprobs": self.inputs.logprobs(chat, tokens, lps, req)}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
            choice["token_ids"] = tokens
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(t0),
                "model": self.model_name, "choices": [choice], "usage": usage.to_dict()}

    def _sp(self, req) -> SamplingParams:
        return SamplingParams(stop=req.stop or ())

    async def _watch_disconnect(self, request: Request):
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    async def _sse(self, live: Live, req, chat, ids, events, endpoint):
        rid, t0, tokens = live.rid, live.t0, []
        obj = "chat.completion.chunk" if chat else "text_completion"
        stream = self._events(ids, self._sp(req), events)

        def chunk(delta_text, reason, lp=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": delta_text} if first else \
                    ({"content": delta_text} if delta_text or not reason else {})
                c = {"index": 0, "delta": delta, "finish_reason": reason,
                     "logprobs": self.inputs.logprobs(True, tokens[-1:], [lp] if lp else [], req)}
            else:
                c = {"index": 0, "text": delta_text, "finish_reason": reason,
                     "logprobs": self.inputs.logprobs(False, tokens[-1:], [lp] if lp else [], req)}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": int(t0), "model": self.model_name,
                                          "choices": [c]}) + "\n\n"
        try:
            if chat:
                yield chunk("", None, first=True)
            why = None
            async for delta, tok, lp, why in stream:
                live.t_first = live.t_first or time.time()
                tokens.append(tok)
                yield chunk(delta, why, lp)
                if why:
                    break
            usage = await self._account(live, endpoint, len(tokens), tokens and why)   # before [DONE]
            if req.include_usage:
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": int(t0), "model": self.model_name,
                                             "choices": [], "usage": usage.to_dict()}) + "\n\n"
            yield "data: [DONE]\n\n"
        except APIError as exc:
            await self.acct.finish(rid, "error")
            yield "data: " + json.dumps(exc.body()) + "\n\n"
        except (asyncio.CancelledError, GeneratorExit):     # the client went away mid-stream
            self.acct.finish_detached(rid, "abort")
            raise
        except Exception as exc:
            log.exception("stream %s failed", rid)
            await self.acct.finish(rid, "error")
            yield "data: " + json.dumps(APIError(500, f"internal error: {str(_unwrap(exc))[:300]}",
                                                 "server_error").body()) + "\n\n"
        finally:
            await stream.aclose()

    async def _account(self, live: Live, endpoint: str, n_tokens: int, reason) -> Usage:
        """The finished request's row (awaited: the response follows only once the ledger has it)
        and its metrics; returns its usage."""
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
        return Usage(live.n_prompt, n_tokens, live.n_cached)
