"""serve/tenants.py and the serve config keys: key -> tenant, limits, and refusals that name the key."""
import pytest

from epserve.config import ConfigError, load_config
from epserve.serve.tenants import TenantLimits, TenantTable, header_hash


def table(**serve):
    return TenantTable(load_config({"serve": serve}).serve)


def test_named_tenants_follow_the_name_and_bare_keys_keep_the_header_hash():
    t = table(api_keys=["bare"], tenants=[{"name": "acme", "api_keys": ["k-old", "k-new"]}])
    old, new = t.resolve("Bearer k-old"), t.resolve("bearer k-new")
    assert old == new and (old.name, old.namespace) == ("acme", "tenant:acme")
    bare = t.resolve("Bearer bare")
    assert bare.name == bare.namespace == header_hash("Bearer bare") and bare.limits is None
    for header in ("", "Bearer", "Bearer k-ol", "Bearer k-old ", "Basic k-old", "Bearer k-oldx"):
        assert t.resolve(header) is None


def test_an_open_server_names_callers_by_their_header():
    t = table()
    assert t.is_open and t.resolve("").name == "anonymous"
    assert t.resolve("Bearer x").namespace == header_hash("Bearer x") != t.resolve("Bearer y").namespace


def test_rate_limit_is_a_token_bucket_with_retry_after():
    t = table(tenants=[{"name": "a", "api_keys": ["k"], "max_requests_per_s": 2.0}])
    ten, lim = t.resolve("Bearer k"), TenantLimits()
    assert [lim.acquire(ten, 100.0) for _ in range(3)] == [None, None, 1]     # burst of 2, then wait
    assert lim.acquire(ten, 100.5) is None and lim.acquire(ten, 100.5) == 1    # refilled one in 0.5 s
    slow = table(tenants=[{"name": "s", "api_keys": ["k"], "max_requests_per_s": 0.1}]).resolve("Bearer k")
    assert lim.acquire(slow, 0.0) is None and lim.acquire(slow, 0.0) == 10     # Retry-After rounds up


def test_concurrency_limit_counts_requests_in_flight():
    ten = table(tenants=[{"name": "a", "api_keys": ["k"], "max_concurrent": 2}]).resolve("Bearer k")
    lim = TenantLimits()
    assert lim.acquire(ten, 0.0) is None and lim.acquire(ten, 0.0) is None and lim.acquire(ten, 0.0) == 1
    lim.release(ten)
    assert lim.acquire(ten, 0.0) is None
    free = table(api_keys=["b"]).resolve("Bearer b")
    assert all(lim.acquire(free, 0.0) is None for _ in range(100))             # no limits configured


@pytest.mark.parametrize("serve,message", [
    ({"tenants": [{"name": "a b", "api_keys": ["x"]}]}, "serve.tenants[0].name"),
    ({"tenants": [{"name": "a", "api_keys": ["x"]}, {"name": "a", "api_keys": ["y"]}]}, "serve.tenants[1].name"),
    ({"tenants": [{"name": "a", "api_keys": []}]}, "serve.tenants[0].api_keys"),
    ({"api_keys": ["x"], "tenants": [{"name": "a", "api_keys": ["x"]}]}, "serve.tenants[0].api_keys"),
    ({"tenants": [{"name": "a", "api_keys": ["x"], "max_concurrent": -1}]}, "serve.tenants[0]"),
    ({"tenants": [{"name": "a", "api_keys": ["x"], "rpm": 5}]}, "serve.tenants[0].rpm: unknown key"),
    ({"tenants": "acme"}, "serve.tenants: expected a list"),
    ({"max_body_bytes": 0}, "serve.max_body_bytes"),
    ({"max_messages": 0}, "serve.max_messages"),
    ({"api_keys": [""]}, "serve.api_keys"),
])
def test_bad_serve_keys_are_refused_naming_the_key(serve, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config({"serve": serve})
