"""The OpenAI-compatible server on the simulated cluster, driven by the official openai client.

Prefill unit on one fake node, decode unit on another; the KV goes rank to rank.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import ray

from conftest import free_port, wait_healthy
from epserve.config import load_config

N = 8
AUTH = {"Authorization": "Bearer none"}


@pytest.fixture(scope="module")
def llm_answers(ray_cluster, tiny_dir):
    """Greedy answers from epserve.LLM on the same cluster: what HTTP must reproduce."""
    import epserve
    prompts = ["Hello, world!", "The sea is wide", "What is the capital of France?", "def main():"]
    cfg = {"dtype": "float32", "kernels": "reference", "decode": {"gpus_per_node": 2, "kv_pages": 32}}
    with epserve.LLM(model=tiny_dir, config=cfg) as llm:
        outs = llm.generate(prompts, epserve.SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True))
    return prompts, [o.text for o in outs], [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_dir, llm_answers, tmp_path_factory):
    from epserve.serve.app import start_deployment
    port = free_port()
    cfg = load_config({"model": tiny_dir, "dtype": "float32", "kernels": "reference",
                       "kv_store": {"path": str(tmp_path_factory.mktemp("kv"))},
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger")), "flush_interval_s": 3600},
                       "prefill": {"gpus_per_node": 2, "kv_pages": 32},
                       "decode": {"gpus_per_node": 2, "redundant_experts": 2, "kv_pages": 64},
                       "serve": {"port": port, "max_queue": 16, "model_name": "tiny",
                                 "api_keys": ["none", "tenant-a", "tenant-b"], "max_body_bytes": 64 * 1024,
                                 "max_messages": 8,
                                 "tenants": [{"name": "acme", "api_keys": ["acme-old", "acme-new"]},
                                             {"name": "slow", "api_keys": ["slow-key"], "max_requests_per_s": 0.2},
                                             {"name": "solo", "api_keys": ["solo-key"], "max_concurrent": 1}]}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base, dep
    dep.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=120)


def test_repeated_long_prompt_hits_the_kv_store_with_the_same_answer(server):
    def ask(key, prompt):
        c = openai.OpenAI(base_url=server[0] + "/v1", api_key=key, max_retries=0, timeout=120)
        return c.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    prompt = " ".join(["The quick brown fox jumps over the lazy dog."] * 20)
    first, second = ask("tenant-a", prompt), ask("tenant-a", prompt)
    n = first.usage.prompt_tokens
    assert first.usage.model_dump()["prompt_cache_hit_tokens"] == 0
    hits = second.usage.model_dump()["prompt_cache_hit_tokens"]
    assert hits == (n - 1) // 64 * 64 and hits > 0
    assert second.usage.model_dump()["prompt_cache_miss_tokens"] == n - hits
    assert second.choices[0].text == first.choices[0].text
    other = ask("tenant-b", prompt)                     # another API key: never a hit on A's blocks
    assert other.usage.model_dump()["prompt_cache_hit_tokens"] == 0
    assert other.choices[0].text == first.choices[0].text


def test_ledger_report_totals_equal_the_usage_responses_returned(server, client):
    from epserve.fleet.ledger_read import read_ledger
    from epserve.fleet.report import build_report
    _, dep = server
    long = " ".join(["Paris is the capital of France."] * 16)
    usages, ids = [], []
    for i, p in enumerate(["Hello", long, long, "The sea is wide"]):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=3 + i, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        usages.append(r.usage.model_dump())
        ids.append(r.id)
    assert usages[2]["prompt_cache_hit_tokens"] > 0
    assert all(r is not None for r in ledger_rows(dep, ids).values())    # rows are in before the responses
    requests, capacity = read_ledger(dep.cfg.ledger.path)
    mine = requests.filter(__import__("pyarrow").compute.is_in(requests["request_id"],
                                                               value_set=__import__("pyarrow").array(ids)))
    assert mine.num_rows == 4
    rep = build_report(mine, capacity)
    assert rep.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert rep.cache_hit_tokens == sum(u["prompt_cache_hit_tokens"] for u in usages)
    assert rep.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert set(capacity["role"].to_pylist()) == {"prefill", "decode"}
    assert rep.gpu_hours > 0 and rep.cost_usd > 0


def test_nodes_are_split_between_prefill_and_decode(server):
    _, dep = server
    pre = ray.get(dep.prefill_units[0].status.remote())["ranks"]
    dec = ray.get(dep.decode_units[0].status.remote())["ranks"]
    assert len({r["node_id"] for r in pre}) == 1 and len({r["node_id"] for r in dec}) == 1
    assert pre[0]["node_id"] != dec[0]["node_id"]


def test_completion_equals_llm_and_reports_usage(client, llm_answers):
    prompts, texts, _ = llm_answers
    for p, want in zip(prompts, texts):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=N, temperature=0.0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
        u = r.usage.model_dump()
        assert u["completion_tokens"] == N and u["total_tokens"] == u["prompt_tokens"] + N
        assert u["prompt_cache_hit_tokens"] == 0 and u["prompt_cache_miss_tokens"] == u["prompt_tokens"]


def test_chat_streaming_matches_non_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short poem"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0.0,
                                          extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=N, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == N == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_logprobs_stop_and_seed(client, llm_answers):
    prompts, texts, _ = llm_answers
    r = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=4, temperature=0.0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(1 <= len(t) <= 2 for t in lp.top_logprobs)   # keys are token strings; byte tokens may collide
    stop = texts[0][2:5]
    assert len(stop) == 3, texts[0]          # the greedy answer is fixed by the seed; it must be long enough
    s = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=N, temperature=0.0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert s.choices[0].finish_reason == "stop"
    assert s.choices[0].text == texts[0][:texts[0].index(stop)]     # cut right before the first occurrence
    a, b = (client.completions.create(model="tiny", prompt=prompts[1], max_tokens=N, temperature=1.0, top_p=0.9,
                                      seed=5, extra_body={"ignore_eos": True}).choices[0].text for _ in range(2))
    assert a == b


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
    ({"model": "tiny", "prompt": [1, 2, 999999]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ""}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x " * 3000}, 400, "prompt"),
    ({"model": "tiny"}, 400, "prompt"),
])
def test_bad_completion_inputs_are_4xx_with_openai_bodies(server, body, status, param):
    r = httpx.post(server[0] + "/v1/completions", json=body, timeout=60, headers=AUTH)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


@pytest.mark.parametrize("raw,status", [(b"{not json", 400), (b"[1, 2]", 400),
                                        (json.dumps({"model": "tiny", "messages": []}).encode(), 400),
                                        (json.dumps({"model": "tiny", "messages": [{"role": "robot",
                                                                                    "content": "x"}]}).encode(), 400),
                                        (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400)])
def test_malformed_chat_bodies_are_400_and_the_server_lives(server, raw, status):
    r = httpx.post(server[0] + "/v1/chat/completions", content=raw, timeout=60,
                   headers={"content-type": "application/json", **AUTH})
    assert r.status_code == status and "error" in r.json()
    assert httpx.get(server[0] + "/health", timeout=30).status_code == 200


def test_sixteen_concurrent_streams_are_all_correct(server, llm_answers):
    prompts, texts, _ = llm_answers
    aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i):
        stream = await aclient.completions.create(model="tiny", prompt=prompts[i % 4], max_tokens=N,
                                                  temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def all16():
        return await asyncio.gather(*[one(i) for i in range(16)])

    got = asyncio.run(all16())
    assert got == [texts[i % 4] for i in range(16)]


def test_api_keys_are_enforced(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "prompt": "hi"}, headers=headers,
                       timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server[0] + "/v1/models", timeout=30).status_code == 401


def test_over_capacity_is_429_with_retry_after_and_loses_nothing(server):
    async def one(client, i):
        try:
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": f"Hi {i}", "max_tokens": 60,
                                                           "ignore_eos": True})
            return r.status_code, r.headers.get("retry-after"), r.json()
        except httpx.HTTPError as exc:
            return 0, None, str(exc)

    async def run():
        async with httpx.AsyncClient(base_url=server[0], headers=AUTH, timeout=300) as client:
            return await asyncio.gather(*[one(client, i) for i in range(24)])      # max_queue is 16

    results = asyncio.run(run())
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 16
    for code, retry, body in results:
        if code == 429:
            assert retry and body["error"]["type"] == "rate_limit_error"
        else:
            assert body["usage"]["completion_tokens"] == 60


def _scrape(base: str) -> dict[tuple[str, tuple], float]:
    """/metrics (scrapes need no API key) as {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    text = httpx.get(base + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_models_and_metrics(server, client):
    """/metrics counts exactly the requests and tokens served between two scrapes, and shows every rank."""
    assert [m.id for m in client.models.list().data] == ["tiny"]
    before = _scrape(server[0])
    usages = [client.completions.create(model="tiny", prompt=p, max_tokens=3, temperature=0.0,
                                        extra_body={"ignore_eos": True}).usage for p in ("Hi there", "The sea")]
    after = _scrape(server[0])

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)
    assert delta("epserve_requests_total", endpoint="completions", status="200") == 2
    assert delta("epserve_completion_tokens_total") == sum(u.completion_tokens for u in usages) == 6
    assert delta("epserve_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("epserve_ttft_seconds_count") == 2
    assert delta("epserve_time_per_output_token_seconds_count") == 2    # both had more than one token
    assert after[("epserve_in_flight_requests", ())] == 0
    ranks = {dict(k)["role"] + dict(k)["rank"]: v for (name, k), v in after.items()
             if name == "epserve_rank_kv_used_ratio"}
    assert sorted(ranks) == ["decode0", "decode1", "prefill0", "prefill1"] and all(0 <= v <= 1 for v in ranks.values())
    assert after[("epserve_unit_schedule_steps", (("role", "decode"), ("schedule", "plain"), ("unit", "0")))] > 0


def ledger_rows(dep, ids=None):
    """The ledger's request rows (after a flush) as dicts by request id; asserts ids are unique."""
    from epserve.fleet.ledger_read import read_ledger
    ray.get(dep.ledger.flush.remote(), timeout=120)
    rows = read_ledger(dep.cfg.ledger.path).requests.to_pylist()
    by_id = {r["request_id"]: r for r in rows}
    assert len(by_id) == len(rows)
    return by_id if ids is None else {i: by_id.get(i) for i in ids}


def test_client_disconnect_aborts_frees_kv_and_bills_what_was_computed(server, tiny_dir):
    base, dep = server
    with httpx.stream("POST", base + "/v1/completions", timeout=60, headers=AUTH,
                      json={"model": "tiny", "prompt": "The sea", "max_tokens": 1500, "temperature": 0.0,
                            "stream": True, "ignore_eos": True}) as r:
        for i, line in enumerate(r.iter_lines()):
            if line.startswith("data: {") and i == 0:
                rid = json.loads(line[6:])["id"]
            if i > 6:
                break                                       # hang up mid-stream
    deadline = time.time() + 30
    while time.time() < deadline:
        stats = ray.get(dep.decode_units[0].stats.remote())
        if sum(s.kv_blocks_used + s.n_running for s in stats) == 0:
            break
        time.sleep(0.2)
    assert sum(s.kv_blocks_used + s.n_running for s in stats) == 0
    deadline = time.time() + 30
    while (row := ledger_rows(dep, [rid])[rid]) is None and time.time() < deadline:
        time.sleep(0.5)                                     # the abort row is written as the stream ends
    assert row["finish_reason"] == "abort" and 4 <= row["output_tokens"] < 1500 and row["prompt_tokens"] > 0


def test_rows_of_sent_responses_survive_a_kill_9_of_the_ledger(server, client):
    """A response goes out only after its row is in the ledger's write-ahead log: killing the
    ledger right after (before any flush) loses none, and its restart duplicates none. Before,
    rows were sent fire-and-forget into a buffer that died with the actor."""
    _, dep = server
    ids = [client.completions.create(model="tiny", prompt=f"Count to {i}", max_tokens=2, temperature=0.0,
                                     extra_body={"ignore_eos": True}).id for i in range(3)]
    from pathlib import Path
    logged = {json.loads(line)["row"]["request_id"] for f in (Path(dep.cfg.ledger.path) / "wal").glob("*.jsonl")
              for line in f.read_text().splitlines() if line}
    assert set(ids) <= logged                               # in the log when the response arrived, no flush
    ray.kill(dep.ledger, no_restart=False)                  # SIGKILL; Ray restarts it, it replays its log
    rows = ledger_rows(dep, ids)
    assert all(rows[i] is not None and rows[i]["output_tokens"] == 2 for i in ids)
    again = client.completions.create(model="tiny", prompt="After", max_tokens=2, temperature=0.0)
    assert ledger_rows(dep, [again.id])[again.id]["finish_reason"] == "length"   # the restarted ledger serves


def test_killing_a_decode_rank_mid_stream_loses_no_request(server, llm_answers):
    base, dep = server
    prompts, _, _ = llm_answers
    n_long = 150

    async def one(aclient, i):
        r = await aclient.completions.create(model="tiny", prompt=prompts[i], max_tokens=n_long, temperature=0.0,
                                             extra_body={"ignore_eos": True})
        return r.choices[0].token_ids if hasattr(r.choices[0], "token_ids") else r.model_dump()["choices"][0]

    async def run(kill: bool):
        unit = dep.decode_units[0]
        steps0 = (await unit.status.remote())["steps"]
        aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=300)
        tasks = [asyncio.create_task(one(aclient, i)) for i in range(4)]
        if kill:
            while (await unit.status.remote())["steps"] < steps0 + 20:
                await asyncio.sleep(0.02)
            victim = (await unit.rank_handles.remote())[0]
            ray.kill(victim, no_restart=True)
        return await asyncio.gather(*tasks)

    want = asyncio.run(run(kill=False))
    got = asyncio.run(run(kill=True))
    assert got == want
    assert ray.get(dep.decode_units[0].status.remote())["restarts"] >= 1


def test_serve_command_starts_and_stops_cleanly_on_sigterm(tmp_path, tiny_dir):
    """`epserve serve` in its own embedded Ray; SIGTERM leaves no process of its tree behind."""
    import psutil
    port = free_port()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_dir}\nkernels: reference\nprefill: {{gpus_per_node: 1, kv_pages: 16}}\n"
                   f"decode: {{gpus_per_node: 1, kv_pages: 16}}\nserve: {{port: {port}}}\n"
                   f"ledger: {{path: {tmp_path / 'ledger'}, flush_interval_s: 3600}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-m", "epserve", "serve", "--config", str(cfg)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    import threading
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    try:
        deadline = time.time() + 120
        ok, last = False, "no answer yet"
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                               json={"model": "epserve", "prompt": "Hello", "max_tokens": 3})
                if r.status_code == 200:      # the Serve proxy answers 503/404 until the app is up
                    ok = r.json()["usage"]["completion_tokens"] == 3
                    rid = r.json()["id"]
                    break
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except httpx.HTTPError as exc:    # not listening yet
                last = f"{type(exc).__name__}: {exc}"
            time.sleep(1)
        assert ok, (proc.poll(), last, "".join(lines)[-2000:])
        while not any("serving on" in line for line in lines) and time.time() < deadline:
            time.sleep(0.2)
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        deadline = time.time() + 30
        while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                             for p in tree):
            time.sleep(0.5)
        alive = [p for p in tree if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive
        from epserve.fleet.ledger_read import read_ledger     # SIGTERM flushed the ledger: nothing left out
        led = read_ledger(tmp_path / "ledger")
        assert led.requests["request_id"].to_pylist() == [rid] and led.is_complete
        assert sorted(led.capacity["event"].to_pylist()) == ["start", "start", "stop", "stop"]
        assert not list((tmp_path / "ledger" / "wal").glob("*.jsonl"))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_serve_measures_this_server(server):
    """`epserve bench serve --url`: the load generator against the real server, model name read from it."""
    from epserve.bench.serve import run, served_model
    assert served_model(server[0], "none") == "tiny"
    row = run(base_url=server[0], model="tiny", concurrency=(2,), n_requests=4, prompt_len=(8, 32),
              output_len=(4, 8), api_key="none", timeout_s=120)[0]
    assert (row["ok"], row["failed"], row["n_429"], row["unsent"]) == (4, 0, 0, 0)
    assert 4 <= row["output_tokens"] <= 32 and row["ttft_ms_p50"] > 0 and row["output_tokens_per_s"] > 0


def test_a_rotated_key_keeps_its_tenants_cache_and_ledger_name(server):
    _, dep = server
    prompt = " ".join(["Tenants own their cache, not their keys."] * 12)
    old, new = (openai.OpenAI(base_url=server[0] + "/v1", api_key=k, max_retries=0, timeout=120)
                for k in ("acme-old", "acme-new"))
    first = old.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0)
    second = new.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0)
    assert second.usage.model_dump()["prompt_cache_hit_tokens"] > 0 and second.choices[0].text == first.choices[0].text
    rows = ledger_rows(dep, [first.id, second.id])
    assert rows[first.id]["tenant"] == rows[second.id]["tenant"] == "acme"


@pytest.mark.parametrize("body,param", [({"prompt": "x" * (70 * 1024)}, None),
                                        ({"messages": [{"role": "user", "content": "hi"}] * 9}, "messages")])
def test_oversized_requests_are_413_with_openai_bodies(server, body, param):
    route = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server[0] + route, json={"model": "tiny", **body}, timeout=60, headers=AUTH)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "request_too_large" and err["param"] == param and "serve.max_" in err["message"]


def test_tenant_rate_limit_is_429_with_retry_after(server):
    c = httpx.Client(base_url=server[0], headers={"Authorization": "Bearer slow-key"}, timeout=60)
    ok = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    again = c.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})
    assert ok.status_code == 200 and again.status_code == 429
    assert int(again.headers["retry-after"]) >= 1 and again.json()["error"]["code"] == "tenant_rate_limited"
    other = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1},
                       headers=AUTH, timeout=60)
    assert other.status_code == 200                       # one tenant's limit is not another's


def test_tenant_concurrency_limit_is_429_while_its_request_runs(server):
    headers = {"Authorization": "Bearer solo-key"}
    body = {"model": "tiny", "prompt": "The sea", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server[0] + "/v1/completions", json=body, headers=headers, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)                                       # the first request is running
        second = httpx.post(server[0] + "/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 1},
                            headers=headers, timeout=60)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert any(next(lines).startswith("data: {") for _ in range(2))   # still streaming; then it hangs up
    deadline = time.time() + 30
    while (after := httpx.post(server[0] + "/v1/completions", headers=headers, timeout=60,
                               json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})).status_code == 429:
        assert time.time() < deadline
        time.sleep(0.2)
    assert after.status_code == 200


def test_a_stream_whose_client_leaves_before_the_first_byte_gives_its_slot_back(server):
    """Clients that hang up right after sending a streaming request (before any byte of the answer):
    each admitted one gets its tenant's `max_concurrent` slot back (this tenant allows one in flight).
    The leak README listed (a response cancelled before its body generator started runs no cleanup)
    is closed by construction in serve/ingress.py `_Stream`; this test did not reproduce it on the old
    code on this box (it passed there too), so it guards the contract, not that race."""
    import socket as socket_
    port = int(server[0].rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "The sea", "max_tokens": 64, "stream": True,
                       "ignore_eos": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer solo-key\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    for wait_s in (0.0, 0.002, 0.01, 0.03, 0.06, 0.1, 0.2):
        s = socket_.create_connection(("127.0.0.1", port))
        s.sendall(head + body)
        time.sleep(wait_s)
        s.close()
        time.sleep(0.3)
    headers = {"Authorization": "Bearer solo-key"}
    # a bound that only catches a slot never given back: an admitted stream the server does not see
    # cancelled runs its 64 tokens first, which on a loaded 2-core CI box took over 30 s once
    deadline = time.time() + 180
    while (after := httpx.post(server[0] + "/v1/completions", headers=headers, timeout=60,
                               json={"model": "tiny", "prompt": "Hi", "max_tokens": 1})).status_code == 429:
        assert time.time() < deadline, "the tenant's slot was never given back"
        time.sleep(0.5)
    assert after.status_code == 200
