"""A front door that scales out: several ingress replicas admit through one shared router,
and an ingress replica's restart loses no routing state."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import openai
import pytest
import ray

from conftest import free_port, wait_dead, wait_healthy
from epserve.config import load_config


@pytest.fixture(scope="module")
def two_doors(ray_cluster, tiny_dir, tmp_path_factory):
    from epserve.serve.app import start_deployment
    port = free_port()
    cfg = load_config({"model": tiny_dir, "dtype": "float32", "kernels": "reference", "kv_store": {"enabled": False},
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger"))}, "eplb": {"enabled": False},
                       "prefill": {"gpus_per_node": 2, "kv_pages": 32}, "decode": {"gpus_per_node": 2, "kv_pages": 32},
                       "serve": {"port": port, "model_name": "tiny", "ingress_replicas": 2, "max_queue": 64}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base, dep
    dep.shutdown()


def _ingress_replicas() -> dict[str, dict]:
    """The live ingress replicas' named actors, by Serve's replica id (the x-epserve-replica header)."""
    return {a["name"].rsplit("#", 1)[-1]: a for a in ray.util.list_named_actors(all_namespaces=True)
            if "Ingress" in a["name"] and a["name"].startswith("SERVE_REPLICA")}


async def _burst(base: str, n: int, max_tokens: int = 4) -> list[tuple[str, str]]:
    """n concurrent completions; -> (text, the replica that served it) each. Any failure raises."""
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)

    async def one(i):
        raw = await client.completions.with_raw_response.create(
            model="tiny", prompt=f"the sea {i}", max_tokens=max_tokens, temperature=0.0,
            extra_body={"ignore_eos": True})
        return raw.parse().choices[0].text, raw.headers["x-epserve-replica"]
    return await asyncio.gather(*[one(i) for i in range(n)])


def test_two_ingress_replicas_admit_through_one_router(two_doors):
    base, dep = two_doors
    replicas = _ingress_replicas()
    assert len(replicas) == 2
    before = ray.get(dep.router.snapshot.remote())["admitted"]
    answers = asyncio.run(_burst(base, 16))       # Serve spreads concurrent requests over both replicas
    served = Counter(rep for _, rep in answers)
    assert set(served) == set(replicas), served    # both replicas admitted requests ...
    snap = ray.get(dep.router.snapshot.remote(True))
    assert snap["admitted"] - before == 16         # ... and every admission, from both, went through one router
    assert all(len(text) > 0 for text, _ in answers)
    deadline = time.monotonic() + 10
    while snap["in_flight"] and time.monotonic() < deadline:    # released as each response ends
        time.sleep(0.1)
        snap = ray.get(dep.router.snapshot.remote())
    assert snap["in_flight"] == 0
    assert all(s.kv_blocks_used <= s.kv_blocks_total for s in snap["decode"])


def test_a_killed_ingress_replica_leaves_the_other_serving_and_the_routing_state(two_doors):
    """Once a replica's process is dead, every request is served, by the survivor (Serve's router
    retries a dead replica's slot reservation on another one before the request is sent), and the
    shared router's counts carry on."""
    base, dep = two_doors
    asyncio.run(_burst(base, 4))
    replicas = _ingress_replicas()
    victim_id, survivor_id = sorted(replicas)
    admitted = ray.get(dep.router.snapshot.remote())["admitted"]
    victim = ray.get_actor(replicas[victim_id]["name"], namespace=replicas[victim_id]["namespace"])
    ray.kill(victim, no_restart=False)
    wait_dead(victim)
    answers = asyncio.run(_burst(base, 8))            # no retry here: any failed request fails the test
    served = Counter(rep for _, rep in answers)
    assert victim_id not in served and served[survivor_id] >= 1, (victim_id, survivor_id, served)
    assert ray.get(dep.router.snapshot.remote())["admitted"] == admitted + 8    # the router's counts carried on


def test_router_releases_what_no_unit_knows_after_a_dead_replica(two_doors):
    _, dep = two_doors
    out = ray.get(dep.router.admit.remote("orphan-1", 4, 0, 4))   # admitted by a replica that then died
    assert not hasattr(out, "status")
    assert ray.get(dep.router.reconcile.remote(min_age_s=0.0)) == 1
    assert ray.get(dep.router.snapshot.remote())["in_flight"] == 0


def test_admitted_requests_keep_their_decode_pages_across_refreshes(two_doors):
    """Requests admitted but not yet on their decode rank (still in prefill) hold their pages:
    a refresh of the ranks' stats must not hand those pages out again."""
    _, dep = two_doors
    # 2 decode ranks x 32 pages; each request books ceil((4 + 700) / 64) = 11 pages: 2 fit per rank
    routes = [ray.get(dep.router.admit.remote(f"book-{i}", 4, 0, 700)) for i in range(4)]
    assert not any(hasattr(r, "status") for r in routes)
    assert sorted((r[0].decode.rank for r in routes)) == [0, 0, 1, 1]
    snap = ray.get(dep.router.snapshot.remote(True))        # fresh reports: the ranks hold none of them yet
    assert all(s.kv_blocks_used == 0 for s in snap["decode"])
    assert snap["decode_booked"] == {"0/0": 22, "0/1": 22}
    refused = ray.get(dep.router.admit.remote("book-5", 4, 0, 700))
    assert (refused.status, refused.code) == (429, "kv_cache_full")
    for i in range(4):
        ray.get(dep.router.release.remote(f"book-{i}"))
    assert ray.get(dep.router.snapshot.remote(True))["decode_booked"] == {}
    again = ray.get(dep.router.admit.remote("book-6", 4, 0, 700))
    assert not hasattr(again, "status")
    ray.get(dep.router.release.remote("book-6"))


def test_a_tenants_limits_hold_across_replicas(two_doors):
    """The one router keeps every tenant's slots, so a second replica does not double a limit."""
    from epserve.config import TenantConfig
    from epserve.serve.tenants import Tenant
    _, dep = two_doors
    solo = Tenant("solo", "tenant:solo", TenantConfig("solo", max_concurrent=1))
    duo = Tenant("duo", "tenant:duo", TenantConfig("duo", max_concurrent=1))
    first = ray.get(dep.router.admit.remote("solo-1", 4, 0, 4, 1, solo))
    assert not hasattr(first, "status")
    again = ray.get(dep.router.admit.remote("solo-2", 4, 0, 4, 1, solo))       # from any replica
    assert (again.status, again.code, again.headers["Retry-After"]) == (429, "tenant_rate_limited", "1")
    full = ray.get(dep.router.admit.remote("solo-3", 4, 0, 100_000, 1, duo))
    assert (full.status, full.code) == (429, "kv_cache_full")                     # refused: it holds no slot
    assert not hasattr(ray.get(dep.router.admit.remote("solo-4", 4, 0, 4, 1, duo)), "status")
    ray.get(dep.router.release.remote("solo-1"))
    assert not hasattr(ray.get(dep.router.admit.remote("solo-5", 4, 0, 4, 1, solo)), "status")
    for rid in ("solo-4", "solo-5"):
        ray.get(dep.router.release.remote(rid))


def test_a_release_that_overtakes_its_admit_leaves_nothing_booked(ray_cluster):
    """An async actor may start calls out of submission order: an ingress whose client left mid-admit
    sends release after admit, and the release can run first. The admit then books nothing (before
    this, it took the tenant's slot for good: test_serve_openai's slot test caught it in full runs)."""
    from epserve.errors import ClientClosed
    from epserve.serve.router import RouterActor, note_release_first, took_release_first
    actor = RouterActor.remote(None, 8, 64)
    try:
        ray.get(actor.release.remote("left-early"), timeout=60)
        out = ray.get(actor.admit.remote("left-early", 10, 0, 5), timeout=60)
        assert isinstance(out, ClientClosed)
    finally:
        ray.kill(actor)
    seen: dict[str, float] = {}
    note_release_first(seen, "a", 0.0)
    note_release_first(seen, "b", 100.0)                       # "a" is older than the keep window: pruned
    assert set(seen) == {"b"} and not took_release_first(seen, "a", 100.0)
    assert took_release_first(seen, "b", 101.0) and not took_release_first(seen, "b", 101.0)
