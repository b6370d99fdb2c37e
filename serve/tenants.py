"""Who is asking, and may they ask now: bearer key -> tenant, and per-tenant rate and concurrency limits.

Pure (no Ray, no I/O, the clock is passed in), so the ingress and tests call the same code.

Keys are compared with hmac.compare_digest against every configured key, with no early
exit, so the time taken says nothing about which key, or how much of one, matched.

Tenants and what follows them:
  serve.tenants entry {name: acme, api_keys: [k1, k2]}  -> ledger tenant "acme", KV-store
      namespace "tenant:acme": a rotated key keeps the tenant's cache and its ledger name;
  a bare serve.api_keys key, or any header when no key is configured -> named by a hash of
      the Authorization header (the namespace epserve has always used, so caches survive);
  no header and no keys configured -> "anonymous".
"""
from __future__ import annotations

import hashlib
import hmac
import math
from dataclasses import asdict, dataclass, field

from epserve.config import ServeConfig, TenantConfig, load_config
from epserve.errors import ConfigError

LIVE_KEYS = ("api_keys", "tenants")     # what a Serve user_config may change on running ingress replicas


@dataclass(frozen=True)
class Tenant:
    name: str                          # the ledger's tenant column
    namespace: str                     # the KV store's namespace
    limits: TenantConfig | None = None


def header_hash(header: str) -> str:
    return hashlib.sha256(header.encode()).hexdigest()[:16] if header else "anonymous"


class TenantTable:
    def __init__(self, cfg: ServeConfig):
        self.keys: list[tuple[bytes, TenantConfig | None]] = [(k.encode(), None) for k in cfg.api_keys]
        self.keys += [(k.encode(), t) for t in cfg.tenants for k in t.api_keys]

    @property
    def is_open(self) -> bool:
        """No key configured: every request is served."""
        return not self.keys

    def resolve(self, authorization: str) -> Tenant | None:
        """The tenant of an Authorization header, or None when it carries no configured key (401)."""
        if self.is_open:
            return Tenant(header_hash(authorization), header_hash(authorization))
        given = authorization[7:].encode() if authorization.lower().startswith("bearer ") else b""
        found, tenant = False, None
        for key, owner in self.keys:              # every key, every time: constant in which one matches
            if hmac.compare_digest(key, given):
                found, tenant = True, owner
        if not found:
            return None
        if tenant is None:
            return Tenant(header_hash(authorization), header_hash(authorization))
        return Tenant(tenant.name, f"tenant:{tenant.name}", tenant)


def live_serve_config(base: ServeConfig, user_config: dict | None) -> ServeConfig:
    """`base` with the keys and tenant limits of a Serve `user_config` ({api_keys: [...], tenants:
    [{name, api_keys, max_requests_per_s, max_concurrent}]}, the config file's serve.* shapes), checked
    as the config file is; any other key raises ConfigError naming it (it cannot change in place)."""
    user_config = user_config or {}
    if not isinstance(user_config, dict):
        raise ConfigError(f"user_config: expected a mapping with {' and/or '.join(LIVE_KEYS)}, got {user_config!r}")
    unknown = sorted(set(user_config) - set(LIVE_KEYS))
    if unknown:
        raise ConfigError(f"user_config.{unknown[0]}: cannot change in place (in place: {', '.join(LIVE_KEYS)}; "
                          f"other keys belong in the application's args)")
    return load_config({"serve": {**asdict(base), **user_config}}).serve


@dataclass
class _Bucket:
    tokens: float
    t: float


@dataclass
class TenantLimits:
    """Per-tenant token bucket (rate r/s, burst max(1, r)) and in-flight count.

    acquire(tenant, now) -> None (admitted: call release when the request ends) or the
    seconds after which a retry can succeed (for Retry-After, rounded up to whole seconds).
    """

    buckets: dict[str, _Bucket] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)

    def acquire(self, tenant: Tenant, now: float) -> int | None:
        lim = tenant.limits
        if lim is None:
            return None
        if lim.max_concurrent and self.in_flight.get(tenant.name, 0) >= lim.max_concurrent:
            return 1
        if lim.max_requests_per_s:
            rate = lim.max_requests_per_s
            burst = max(1.0, rate)
            b = self.buckets.setdefault(tenant.name, _Bucket(burst, now))
            b.tokens, b.t = min(burst, b.tokens + (now - b.t) * rate), now
            if b.tokens < 1.0:
                return max(1, math.ceil((1.0 - b.tokens) / rate))
            b.tokens -= 1.0
        self.in_flight[tenant.name] = self.in_flight.get(tenant.name, 0) + 1
        return None

    def release(self, tenant: Tenant) -> None:
        if tenant.limits is not None and self.in_flight.get(tenant.name, 0) > 0:
            self.in_flight[tenant.name] -= 1
