"""epserve.LLM: offline generation on expert-parallel units on Ray.

Joins Ray if it is initialised (or `ray.address` is set), else starts an embedded
local one, so the same code runs on a laptop and on a real multi-node cluster.
Offline generation runs colocated units (each rank prefills and decodes its own
requests; the `decode` section gives the unit shape); disaggregated prefill/decode
is the serving path (serve/). Requests go through each unit supervisor's `generate`, which
forwards to that unit's default stream sink (actors/stream_sink.py): the ranks push the
tokens there, not through the supervisor.
"""
from __future__ import annotations

import itertools
import logging
import uuid

from epserve.config import Config, check_context, context_len, kv_pages, load_config
from epserve.errors import InvalidRequest
from epserve.messages import RequestOutput, RequestResult, Usage
from epserve.model.checkpoint import check_model_dir
from epserve.model.sampling import SamplingParams
from epserve.model.tiny import default_model_dir
from epserve.model.tokenizer import load_tokenizer
from epserve.pipelines.sequence import Sequence
from epserve.placement.decode_balancer import apply_decode_choice, pick_decode_rank
from epserve.serve.generation import choice_params

log = logging.getLogger("epserve.llm")


def start_units(cfg: Config, model_dir: str, name: str, role_cfg, args, first_id: int = 0,
                role: str = "both") -> list:
    """Start role_cfg.units supervisors at once and wait until every rank is loaded."""
    from epserve.actors.launch import orders
    from epserve.actors.launch import start_units as start
    return start(cfg, model_dir, args, orders(name, role_cfg, role, first_id))[role]


class LLM:
    def __init__(self, model: str | None = None, config: str | dict | Config | None = None, **overrides):
        self.config = load_config(config, **overrides)
        if model is not None:
            self.config = load_config(self.config, model=str(model))
        self.model_dir = str(self.config.model or default_model_dir())
        self.args = check_model_dir(self.model_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        d = self.config.decode
        from epserve.actors.cluster import ensure_ray
        self._ray = ensure_ray(self.config.ray.address, d.nodes_per_unit * d.units, d.gpus_per_node,
                               self.config.ray.num_cpus)
        self.units = start_units(self.config, self.model_dir, "generate", d, self.args)
        self._ids = itertools.count()

    # ---- inputs ---------------------------------------------------------------------------
    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt: this checkpoint has no tokenizer files; pass token id lists",
                                     "prompt")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if not ids:
                raise InvalidRequest("prompt: must contain at least one token", "prompt")
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size]
            if bad:
                raise InvalidRequest(f"prompt: token id {bad[0]!r} is outside the vocabulary "
                                     f"[0, {self.args.vocab_size})", "prompt")
            return ids
        raise InvalidRequest(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}",
                             "prompt")

    # ---- generate -------------------------------------------------------------------------
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list:
        """Generate for a prompt (text or token ids) or a list of them; outputs in input order.

        Each prompt gives one RequestOutput, or, when its params have n > 1, a list of n (choice i
        is seeded seed + i when seeded, as HTTP's choices are; each choice prefills the prompt
        itself: offline units hand no KV between choices). A request with stop strings ends at the
        first one, on its rank: the text is cut before the string, finish_reason is "stop", and
        token_ids / usage count what was produced up to the token that completed it (vLLM's)."""
        import ray
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        prompts = [prompts] if single else list(prompts)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"sampling_params: {len(params)} given for {len(prompts)} prompts", "sampling_params")
        if self.tokenizer is None and any(p.stop for p in params):
            raise InvalidRequest("stop: this checkpoint has no tokenizer files to read stop strings with; "
                                 "use stop_token_ids", "stop")
        encoded = [self._encode(p) for p in prompts]
        max_len = context_len(self.config.max_model_len, self.args.max_position_embeddings)
        for ids, p in zip(encoded, params):
            check_context(len(ids), max_len, p.max_tokens)
        stats = [s for u in self.units for s in ray.get(u.stats.remote())]
        per_unit: dict[int, list] = {}
        order = []                           # per prompt: where each of its choices went
        tenant = "offline" if self.config.kv_store.enabled else None
        for ids, p in zip(encoded, params):
            need = kv_pages(len(ids) + p.max_tokens, self.config.kv_page_tokens)
            order.append([])
            for i in range(p.n):
                ref = pick_decode_rank(stats, need) or min(stats, key=lambda s: s.n_requests).ref
                stats = apply_decode_choice(stats, ref, need)
                rid = f"gen-{uuid.uuid4().hex[:8]}-{next(self._ids)}"
                per_unit.setdefault(ref.unit, []).append((Sequence(rid, ids, choice_params(p, i), tenant=tenant),
                                                          ref.rank))
                order[-1].append((ref.unit, len(per_unit[ref.unit]) - 1))
        results = dict(zip(per_unit, ray.get([self.units[u].generate.remote(items) for u, items in per_unit.items()])))
        outs = []
        for where, ids, p in zip(order, encoded, params):
            choices = []
            for unit, i in where:
                res = results[unit][i]
                if res.error is not None:
                    raise res.error      # typed (epserve.errors), as the rank or the unit raised it
                choices.append(self._output(res, ids))
            outs.append(choices if p.n > 1 else choices[0])
        return outs[0] if single else outs

    def _output(self, res: RequestResult, prompt_ids: list[int]) -> RequestOutput:
        tokens = list(res.token_ids)
        text = res.text if res.text is not None else (self.tokenizer.decode(tokens) if self.tokenizer else None)
        return RequestOutput(res.request_id, prompt_ids, tokens, text, res.logprobs, res.finish_reason,
                             Usage(len(prompt_ids), len(tokens), res.n_cached))

    def shutdown(self) -> None:
        import ray
        for u in self.units:
            try:
                ray.get(u.shutdown.remote(), timeout=30)
            except Exception:
                pass
        self.units = []
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

