"""bench/serve.py against a fake OpenAI-compatible SSE server that lives only in this file.

The fake is test scaffolding for the load generator (not a stand-in for epserve): it streams
min(max_tokens, 5) tokens 5 ms apart, then a usage chunk and [DONE]; it answers 401 without the
bearer key, 429 to the 3rd request it sees, and sleeps 1 s per token when max_tokens >= 1000
(to hit the level deadline). Checks: counts add up, token totals match the usage chunks,
percentiles positive and ordered, Poisson mode, the deadline, and the loopback refusal.
"""
import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from epserve.bench.serve import check_loopback, make_workload, run

KEY = "sk-test"
N_TOKENS = 5


def fake_app() -> Starlette:
    n_seen = 0

    async def completions(request):
        nonlocal n_seen
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        n_seen += 1
        if n_seen == 3:
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=429, headers={"Retry-After": "1"})
        body = await request.json()
        assert body["stream"] and body["stream_options"] == {"include_usage": True}, body
        n_prompt, n_out = len(body["prompt"].split()), min(body["max_tokens"], N_TOKENS)
        delay = 1.0 if body["max_tokens"] >= 1000 else 0.005

        async def events():
            for i in range(n_out):
                await asyncio.sleep(delay)
                yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]})
                yield "\n\n"
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out,
                     "prompt_cache_hit_tokens": 0, "prompt_cache_miss_tokens": n_prompt}
            yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])


@pytest.fixture
def fake_url():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fake_app(), log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start within 5 s"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(5)
    sock.close()


def check_row(row, n):
    assert row["ok"] + row["failed"] + row["n_429"] + row["unsent"] == n, row
    assert row["output_tokens"] == N_TOKENS * row["ok"], row
    assert row["wall_s"] > 0 and row["requests_per_s"] > 0 and row["output_tokens_per_s"] > 0, row
    assert row["input_tokens_per_s"] > 0, row
    for m in ("ttft_ms", "tpot_ms", "e2e_ms"):
        assert 0 < row[f"{m}_p50"] <= row[f"{m}_p99"], (m, row)
    assert row["tpot_ms_p50"] >= 4 and row["ttft_ms_p50"] < row["e2e_ms_p50"], row  # 5 ms between tokens


def test_closed_loop_sweep(fake_url):
    rows = run(fake_url, concurrency=(1, 4), n_requests=8, output_len=(8, 16), api_key=KEY, timeout_s=10)
    assert [r["concurrency"] for r in rows] == [1, 4] and all(r["rate"] is None for r in rows)
    for r in rows:
        check_row(r, 8)
    # The 3rd request overall (level 1, sequential) is the one 429; everything else succeeds.
    assert (rows[0]["ok"], rows[0]["n_429"], rows[0]["failed"]) == (7, 1, 0), rows[0]
    assert (rows[1]["ok"], rows[1]["n_429"], rows[1]["failed"]) == (8, 0, 0), rows[1]
    assert rows[1]["input_tokens"] == sum(w["prompt_words"] for w in make_workload(8, (16, 256), (8, 16), 0))
    assert json.loads(json.dumps(rows)) == rows                                   # plain JSON


def test_poisson_arrivals(fake_url):
    # At 100 requests/s the 6 arrivals span ~60 ms; a rate misread by 1000x (s for ms) spreads them over
    # ~60 s and the level deadline cuts most of them: every request must have been answered (none cut).
    rows = run(fake_url, concurrency=(2,), n_requests=6, rate=100.0, output_len=(8, 16), api_key=KEY, timeout_s=10)
    assert rows[0]["rate"] == 100.0 and rows[0]["ok"] + rows[0]["n_429"] == 6 and rows[0]["failed"] == 0, rows
    check_row(rows[0], 6)


def test_auth_failure_and_deadline(fake_url):
    row = run(fake_url, concurrency=(2,), n_requests=3, output_len=(8, 16), timeout_s=5)[0]
    assert (row["ok"], row["failed"]) == (0, 3) and "HTTP 401" in row["errors"][0], row
    # The fake's first token of these comes after 1 s: a level that stopped at its 0.5 s deadline has the two
    # in flight cut (failed, 'deadline') and two never sent; one that waited would count them ok.
    row = run(fake_url, concurrency=(2,), n_requests=4, output_len=(1000, 1000), api_key=KEY, timeout_s=0.5)[0]
    assert (row["ok"], row["failed"], row["unsent"]) == (0, 2, 2), row
    assert "deadline" in row["errors"][0] and row["ttft_ms_p50"] is None, row


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8/v1",
                                 "http://127.0.0.1.evil.com:8000", "ftp://127.0.0.1:21", "127.0.0.1:8000"])
def test_refuses_non_loopback(url):
    with pytest.raises(ValueError, match="loopback"):
        run(url, n_requests=1, timeout_s=1)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/", "http://localhost:1", "http://[::1]:8000"])
def test_accepts_loopback(url):
    assert check_loopback(url) == url.rstrip("/")
