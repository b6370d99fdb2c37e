"""epserve's configuration: frozen dataclasses mirroring the YAML, validated once at the edge.

Every key has a default, and the defaults are the embedded default (a tiny model made
on first use, one prefill and one decode unit of 1 node x 2 fake GPUs, local Ray,
127.0.0.1). Errors name the key, the value and what is allowed. Values measured at
start-up live in runtime state, never back in here. The paths the config derives (the user
cache, the KV store's spec, the ledger's folder) are here too, so every room reads them from
one place; that puts the file a little over 300 lines, all of it the one noun.
Never: imports anything of epserve but messages.py (the ground floor).
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from epserve.errors import ConfigError, ContextTooLong
from epserve.messages import KVStoreSpec

__all__ = ["Config", "ConfigError", "check_context", "context_len", "kv_pages", "load_config"]


# ---- the context and the page size: every layer (ingress, LLM, a rank's batcher) asks here ------
def context_len(max_model_len: int | None, max_position_embeddings: int) -> int:
    """Tokens one sequence may hold (prompt + output): the config's max_model_len, never more than
    the checkpoint's max_position_embeddings (null: the checkpoint's)."""
    return min(max_model_len or max_position_embeddings, max_position_embeddings)


def check_context(n_prompt: int, max_len: int, max_tokens: int | None = None, prompt_param: str = "prompt") -> None:
    """Raise ContextTooLong unless the prompt leaves room for one token (max_tokens None: the
    ingress asks before it picks a default max_tokens) and prompt + max_tokens <= max_len.
    Example: max_len 2048, a 2000-token prompt: max_tokens 48 fits, 49 raises (param max_tokens)."""
    if n_prompt >= max_len:
        raise ContextTooLong(n_prompt, None, max_len, prompt_param)
    if max_tokens is not None and n_prompt + max_tokens > max_len:
        raise ContextTooLong(n_prompt, max_tokens, max_len, "max_tokens")


def kv_pages(n_tokens: int, page_tokens: int) -> int:
    """Pages of `page_tokens` tokens that n_tokens fill (the last one partly): 65 tokens of 64 -> 2."""
    return -(-n_tokens // page_tokens)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None        # null: embedded local Ray (fake GPUs on a machine without CUDA)
    num_cpus: int | None = None       # embedded Ray only
    spare_nodes: int = 0              # embedded simulated cluster only: idle nodes a unit can rebuild on


@dataclass(frozen=True)
class TransportConfig:
    latency_ms: float = 0.0           # injected per MoE exchange, to measure overlap where loopback is free
    bandwidth_gbps: float = 0.0       # injected exchange bandwidth in GB/s; 0: unlimited


@dataclass(frozen=True)
class EPEmulateConfig:                # ep_dispatch: emulated (model/ep_emulate.py): one GPU as one rank of a bigger EP unit
    ranks: int = 144                  # the emulated unit's EP size (DeepSeek: 144 decode, 32 prefill)
    top_k: int = 8                    # experts per token of the emulated model (V3: 8)
    experts: int = 256                # its logical routed experts (V3: 256); ranks x this rank's slots must hold them
    groups: int = 8                   # its expert groups, for EPLB (must divide experts)
    skew: str = "lognormal"           # per-expert load kind (placement/loads.py KINDS; equal: balanced)
    seed: int = 0                     # seed of the drawn loads
    hold: bool = True                 # hold each exchange for DeepEP's published time (false: the work only)


@dataclass(frozen=True)
class UnitConfig:
    units: int = 1
    nodes_per_unit: int = 1
    gpus_per_node: int = 2
    redundant_experts: int = 0
    max_batch_tokens: int = 16384
    max_batch_size: int = 128
    kv_pages: int = 256               # latent pages per rank, kv_page_tokens tokens each
    cpus_per_rank: float = 0.1        # Ray CPU reservation per rank actor (logical)
    elastic: bool = False             # a dead rank does not stop the unit: survivors re-form without it, EPLB
                                      # re-places its experts, its requests resume on them, a replacement joins
                                      # (actors/unit_elastic.py); needs the all-to-all exchange and enough
                                      # redundant slots that survivors hold every expert, else the unit rebuilds
                                      # as with false (the default: any death rebuilds the whole unit)

    @property
    def ranks_per_unit(self) -> int:
        return self.nodes_per_unit * self.gpus_per_node


@dataclass(frozen=True)
class EplbConfig:
    interval_s: float = 600.0
    window_steps: int = 1000
    policy: str = "auto"              # auto (= improved: placement/eplb.py picks its own policy) | improved | baseline
    enabled: bool = True


@dataclass(frozen=True)
class KVStoreConfig:
    path: str | None = None           # null: <user cache>/epserve/kv
    capacity_gb: float = 64.0
    block_tokens: int = 64
    enabled: bool = True
    shared_namespace: str | None = None


@dataclass(frozen=True)
class LedgerConfig:
    path: str | None = None           # null: <user cache>/epserve/ledger
    flush_rows: int = 256
    flush_interval_s: float = 10.0


@dataclass(frozen=True)
class AutoscaleConfig:
    enabled: bool = False
    schedule: tuple = ()              # [{at: "08:30", prefill: 29, decode: 9}, ...]
    prefill_units: tuple = (1, 1)
    decode_units: tuple = (1, 1)
    interval_s: float = 30.0
    downscale_delay_s: float = 600.0
    release_hook: str | None = None   # shell command run with the freed node count (e.g. a `ray job submit`)


@dataclass(frozen=True)
class MTPConfig:
    enabled: bool = False             # decode with the checkpoint's MTP module as a lossless draft model
    num_draft_tokens: int = 1         # drafts per sequence per step (k > 1 chains the one module k times)

    @property
    def n_draft(self) -> int:
        """Drafts per step the ranks run (0: MTP off)."""
        return self.num_draft_tokens if self.enabled else 0


@dataclass(frozen=True)
class PricingConfig:
    gpu_hour_usd: float = 2.0
    input_hit_per_m: float = 0.14
    input_miss_per_m: float = 0.55
    output_per_m: float = 2.19


@dataclass(frozen=True)
class TenantConfig:
    name: str                         # ledger tenant and KV-store namespace (so a rotated key keeps its cache)
    api_keys: tuple = ()              # this tenant's bearer keys (rotate: add the new key, then drop the old)
    max_requests_per_s: float = 0.0   # sustained request rate before 429 + Retry-After (0: unlimited)
    max_concurrent: int = 0           # requests in flight before 429 + Retry-After (0: unlimited)


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple = ()              # bare bearer keys: each its own tenant, named by a hash of the key
    tenants: tuple[TenantConfig, ...] = ()   # named tenants: [{name, api_keys, max_requests_per_s, max_concurrent}]
    model_name: str = "epserve"
    max_queue: int = 256              # requests waiting per service before 429
    ingress_replicas: int = 1         # front-door replicas; they admit through one shared router
    max_body_bytes: int = 1 << 20     # request bodies over this: 413
    max_messages: int = 256           # chat messages in one request over this: 413
    reasoning: str = "auto"           # auto (the template's thinking: R1 opens <think>, V3.1 per request) | on | off
    chat_model_name: str = "deepseek-chat"          # with a thinking-switch template (V3.1): this name, thinking off
    reasoner_model_name: str = "deepseek-reasoner"  # ... and this name, thinking on ("": not served)
    max_n: int = 16                   # most choices (`n`) one request may ask for


@dataclass(frozen=True)
class Config:
    model: str | None = None          # checkpoint folder; null: the tiny default model
    dtype: str = "bfloat16"           # float32 for exact CPU tests
    kernels: str = "auto"             # auto | reference | triton | native
    fp8_activations: bool = True      # FP8 checkpoints: quantise activations 1x128 (the seed's recipe)
    max_model_len: int | None = None  # null: the checkpoint's max_position_embeddings
    kv_page_tokens: int = 64          # tokens per page of a rank's paged latent cache (FlashMLA runs only at 64)
    overlap: str = "auto"             # auto | on | off (auto: each unit measures whether splitting pays)
    cuda_graphs: bool = True          # GPU decode steps replay as CUDA graphs (one per batch-size bucket)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    ep_dispatch: str = "auto"         # auto | deepep | all_to_all: multi-rank units' exchange (auto: DeepEP if it passes);
                                      # emulated: every unit is one GPU standing in for one rank of ep_emulate's EP unit
    ep_emulate: EPEmulateConfig = field(default_factory=EPEmulateConfig)
    kv_handoff: str = "auto"          # auto | collective | object: prefill -> decode KV (auto: pair group, else objects)
    transport: TransportConfig = field(default_factory=TransportConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    prefill: UnitConfig = field(default_factory=UnitConfig)
    decode: UnitConfig = field(default_factory=UnitConfig)
    eplb: EplbConfig = field(default_factory=EplbConfig)
    kv_store: KVStoreConfig = field(default_factory=KVStoreConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    pricing: PricingConfig = field(default_factory=PricingConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def __post_init__(self):
        _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("kernels", self.kernels, ("auto", "reference", "triton", "native"))
        _choice("overlap", self.overlap, ("auto", "on", "off"))
        _choice("ep_dispatch", self.ep_dispatch, ("auto", "deepep", "all_to_all", "emulated"))
        _choice("kv_handoff", self.kv_handoff, ("auto", "collective", "object"))
        _choice("eplb.policy", self.eplb.policy, ("auto", "baseline", "improved"))
        _choice("serve.reasoning", self.serve.reasoning, ("auto", "on", "off"))
        if not 1 <= self.mtp.num_draft_tokens <= 4:
            raise ConfigError(f"mtp.num_draft_tokens: must be in 1..4, got {self.mtp.num_draft_tokens}")
        if self.serve.max_n < 1:
            raise ConfigError(f"serve.max_n: must be >= 1, got {self.serve.max_n}")
        for role in ("prefill", "decode"):
            u = getattr(self, role)
            for key in ("units", "nodes_per_unit", "gpus_per_node", "max_batch_tokens", "max_batch_size",
                        "kv_pages"):
                if getattr(u, key) < 1:
                    raise ConfigError(f"{role}.{key}: must be >= 1, got {getattr(u, key)}")
            if u.redundant_experts < 0:
                raise ConfigError(f"{role}.redundant_experts: must be >= 0, got {u.redundant_experts}")
            if u.elastic and self.ep_dispatch == "deepep":
                raise ConfigError(f"{role}.elastic: true needs the all-to-all exchange (its groups re-form without a "
                                  "dead rank); ep_dispatch is deepep (use auto or all_to_all)")
        if self.kv_store.block_tokens < 1 or self.kv_store.capacity_gb <= 0:
            raise ConfigError("kv_store: block_tokens must be >= 1 and capacity_gb > 0")
        if self.ray.spare_nodes < 0:
            raise ConfigError(f"ray.spare_nodes: must be >= 0, got {self.ray.spare_nodes}")
        if self.serve.ingress_replicas < 1:
            raise ConfigError(f"serve.ingress_replicas: must be >= 1, got {self.serve.ingress_replicas}")
        if not 0 < self.serve.port < 65536:
            raise ConfigError(f"serve.port: must be in 1..65535, got {self.serve.port}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len: must be >= 1, got {self.max_model_len}")
        if self.kv_page_tokens < 1:
            raise ConfigError(f"kv_page_tokens: must be >= 1, got {self.kv_page_tokens}")
        _check_serve(self.serve)
        _check_ep_emulate(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


EP_EMULATE_SKEWS = ("zipf", "lognormal", "hot_expert", "hot_group", "equal", "dead")   # placement/loads.py KINDS


def _check_ep_emulate(cfg: Config) -> None:
    e = cfg.ep_emulate
    if cfg.ep_dispatch == "emulated":
        for role in ("prefill", "decode"):
            n = getattr(cfg, role).ranks_per_unit
            if n != 1:
                raise ConfigError(f"ep_dispatch: emulated runs one-rank units (one GPU as one EP rank); "
                                  f"{role} units have {n} ranks (set {role}.nodes_per_unit and gpus_per_node to 1)")
    if e.ranks < 2:
        raise ConfigError(f"ep_emulate.ranks: must be >= 2, got {e.ranks}")
    for key in ("top_k", "experts", "groups"):
        if getattr(e, key) < 1:
            raise ConfigError(f"ep_emulate.{key}: must be >= 1, got {getattr(e, key)}")
    if e.experts % e.groups:
        raise ConfigError(f"ep_emulate.groups: {e.groups} must divide ep_emulate.experts={e.experts}")
    _choice("ep_emulate.skew", e.skew, EP_EMULATE_SKEWS)


_TENANT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _check_serve(s: ServeConfig) -> None:
    for key in ("max_queue", "max_body_bytes", "max_messages"):
        if getattr(s, key) < 1:
            raise ConfigError(f"serve.{key}: must be >= 1, got {getattr(s, key)}")
    owner: dict[str, str] = {}
    for k in s.api_keys:
        if not isinstance(k, str) or not k:
            raise ConfigError(f"serve.api_keys: {k!r} is not a non-empty string")
        owner[k] = "serve.api_keys"
    names = set()
    for i, t in enumerate(s.tenants):
        at = f"serve.tenants[{i}]"
        if not _TENANT_NAME.fullmatch(t.name):
            raise ConfigError(f"{at}.name: {t.name!r} must be 1-64 of letters, digits, '.', '_' or '-'")
        if t.name in names:
            raise ConfigError(f"{at}.name: {t.name!r} is used by an earlier tenant")
        names.add(t.name)
        if not t.api_keys:
            raise ConfigError(f"{at}.api_keys: tenant {t.name!r} needs at least one key")
        for k in t.api_keys:
            if not isinstance(k, str) or not k:
                raise ConfigError(f"{at}.api_keys: {k!r} is not a non-empty string")
            if k in owner:
                raise ConfigError(f"{at}.api_keys: a key of {t.name!r} is already one of {owner[k]}'s")
            owner[k] = f"tenant {t.name!r}"
        if t.max_requests_per_s < 0 or t.max_concurrent < 0:
            raise ConfigError(f"{at}: max_requests_per_s and max_concurrent must be >= 0 (0: unlimited), got "
                              f"{t.max_requests_per_s} and {t.max_concurrent}")


def _choice(key: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def _coerce(key: str, value, tp):
    """Check one YAML value against a field type; returns the value in that type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        opts = typing.get_args(tp)
        if value is None and type(None) in opts:
            return None
        for opt in opts:
            if opt is type(None):
                continue
            try:
                return _coerce(key, value, opt)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type (expected {tp})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is tuple or origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:       # tuple[X, ...]: every item an X
            return tuple(_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        return tuple(value)
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {exc}") from None


def load_config(source: str | Path | dict | Config | None = None, **overrides) -> Config:
    """Config from a YAML file path, a dict, an existing Config, or None (the defaults)."""
    if isinstance(source, Config):
        data = source.to_dict()
    elif source is None:
        data = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    data.update(overrides)
    return _build(Config, data)


def builtin_config(name: str) -> Path:
    """Path of a config shipped in configs/ (default, deepseek_v3_prod, test)."""
    path = Path(__file__).parent / "configs" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"no built-in config named {name!r}")
    return path


# ---- paths the config derives (one place, so the ingress, the ranks and the ledger agree) ----
def cache_root() -> Path:
    """epserve's user cache ($EPSERVE_CACHE, default ~/.cache/epserve): default model, KV store, ledger."""
    return Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve"))


def kv_store_spec(cfg: Config) -> KVStoreSpec | None:
    """The KV store every rank and the ingress open (None: kv_store.enabled is false); path null: <cache>/kv."""
    k = cfg.kv_store
    if not k.enabled:
        return None
    return KVStoreSpec(k.path or str(cache_root() / "kv"), int(k.capacity_gb * (1 << 30)), k.block_tokens,
                       k.shared_namespace)


def ledger_root(cfg: Config) -> str:
    """The ledger's folder: ledger.path, or <cache>/ledger."""
    return cfg.ledger.path or str(cache_root() / "ledger")
