"""Issue 26, over HTTP with the official openai client: no request field is merely accepted.

`user` is validated and lands in the request's ledger row; `messages[i].reasoning_content` is a 400
naming it (DeepSeek's API answers the same for deepseek-reasoner); and the ranks' KV-store writer
counters reach /metrics. One server: 1-rank prefill and decode units, the KV store and the ledger on.
The ledger's reading of the column: tests/test_ledger_user.py; the writer's counters:
tests/test_kv_writer.py.
"""
from __future__ import annotations

import time

import httpx
import openai
import pytest
import ray

from conftest import free_port, wait_healthy
from epserve.config import load_config
from epserve.errors import InvalidRequest
from epserve.serve.openai_models import ChatRequest, parse

AUTH = {"Authorization": "Bearer k"}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [{"role": "user", "content": "9.11 or 9.8?"},
           {"role": "assistant", "content": "9.8", "reasoning_content": "compare the tenths: 8 > 1"},
           {"role": "user", "content": "And 9.2?"}]


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_dir, tmp_path_factory):
    from epserve.serve.app import start_deployment
    port = free_port()
    cfg = load_config({"model": tiny_dir, "dtype": "float32", "kernels": "reference",
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger")), "flush_interval_s": 3600},
                       "kv_store": {"path": str(tmp_path_factory.mktemp("kv"))},
                       "prefill": {"gpus_per_node": 1, "kv_pages": 32}, "decode": {"gpus_per_node": 1, "kv_pages": 64},
                       "serve": {"port": port, "model_name": "tiny", "api_keys": ["k"]}})
    dep = start_deployment(cfg)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield base, dep
    dep.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="k", max_retries=0, timeout=120)


def ledger_rows(dep, ids: list[str]) -> dict[str, dict]:
    """The ledger's rows of these request ids (after a flush)."""
    from epserve.fleet.ledger_read import read_ledger
    ray.get(dep.ledger.flush.remote(), timeout=120)
    return {r["request_id"]: r for r in read_ledger(dep.cfg.ledger.path).requests.to_pylist()
            if r["request_id"] in ids}


# ---- `user` -----------------------------------------------------------------------------------------
def test_user_is_recorded_in_the_requests_ledger_row(server, client):
    _, dep = server
    chat = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, user="end-user-7")
    comp = client.completions.create(model="tiny", prompt="Hello", max_tokens=2, user="u" * 256)
    bare = client.completions.create(model="tiny", prompt="Hello", max_tokens=2)
    rows = ledger_rows(dep, [chat.id, comp.id, bare.id])
    assert rows[chat.id]["user"] == "end-user-7"
    assert rows[comp.id]["user"] == "u" * 256
    assert rows[bare.id]["user"] is None and rows[bare.id]["prompt_tokens"] == bare.usage.prompt_tokens


@pytest.mark.parametrize("user", ["u" * 257, 42, ["a"]])
def test_a_user_that_is_too_long_or_not_a_string_is_a_400_naming_it(server, user):
    body = {"model": "tiny", "messages": ASK, "max_tokens": 2, "user": user}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "user", r.text
    if isinstance(user, str):
        assert "257 characters; at most 256" in r.json()["error"]["message"]


# ---- messages[].reasoning_content -------------------------------------------------------------------
def test_reasoning_content_in_an_input_message_is_a_400_naming_it(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HISTORY, max_tokens=2)
    err = e.value.body
    assert e.value.status_code == 400 and err["param"] == "messages[1].reasoning_content", err
    assert "not part of the prompt" in err["message"]


def test_the_same_history_without_reasoning_content_or_with_it_null_is_answered(client):
    stripped = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in HISTORY]
    nulled = [{**m, "reasoning_content": None} if "reasoning_content" in m else m for m in HISTORY]
    for messages in (stripped, nulled):
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2, temperature=0.0)
        assert r.choices[0].finish_reason in ("length", "stop") and r.usage.completion_tokens >= 1


@pytest.mark.parametrize("role,i", [("assistant", 0), ("user", 1)])
def test_parse_refuses_reasoning_content_on_any_message_by_index(role, i):
    messages = [{"role": "user", "content": "hi"}] * i + [{"role": role, "content": "x", "reasoning_content": ""}]
    with pytest.raises(InvalidRequest) as e:
        parse(ChatRequest, {"model": "m", "messages": messages})
    assert e.value.status == 400 and e.value.param == f"messages[{i}].reasoning_content"


# ---- KV-store writes on /metrics --------------------------------------------------------------------
def _kv_writes(base: str) -> dict[str, float]:
    """epserve_kv_store_writes_total summed over ranks, by outcome (scrapes need no API key)."""
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == "epserve_kv_store_writes_total":
                out[s.labels["outcome"]] = out.get(s.labels["outcome"], 0) + s.value
    return out


def test_the_kv_store_writes_of_a_request_appear_on_metrics(server, client):
    base, _ = server
    before = _kv_writes(base)
    assert set(before) == {"written", "skipped", "refused", "dropped", "failed"}   # a rank with a writer reports all
    prompt = " ".join(["A long prompt whose first blocks the prefill rank writes to the KV store."] * 12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0.0)
    n_blocks = (r.usage.prompt_tokens - 1) // 64
    assert n_blocks >= 1
    # the writer is a background thread: its counts reach the rank's stats on its next report
    deadline = time.monotonic() + 60
    while (now := _kv_writes(base))["written"] - before["written"] < n_blocks and time.monotonic() < deadline:
        client.completions.create(model="tiny", prompt="Hi", max_tokens=1)     # a step, so the rank reports
    assert now["written"] - before["written"] >= n_blocks, (before, now)
    assert now["dropped"] == before["dropped"] and now["failed"] == before["failed"]
