"""The error family (errors.py): every class's HTTP answer and CLI line, pickling through Ray, the
one context-length check and the one page size."""
from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pytest

from epserve import errors as E
from epserve.config import check_context, context_len, kv_pages, load_config

ROOT = Path(__file__).resolve().parents[1]

# class -> (an instance, HTTP status, OpenAI type, code, CLI exit code)
FAMILY = {
    E.EpserveError: (E.EpserveError("boom"), 500, "server_error", None, 1),
    E.RequestError: (E.RequestError("bad request"), 400, "invalid_request_error", None, 2),
    E.InvalidRequest: (E.InvalidRequest("top_p: must be in (0, 1], got 0", "top_p"), 400, "invalid_request_error",
                       None, 2),
    E.ContextTooLong: (E.ContextTooLong(2000, 100, 2048, "max_tokens"), 400, "invalid_request_error",
                       "context_length_exceeded", 2),
    E.RequestTooLarge: (E.RequestTooLarge("300 tokens need 5 KV pages; this rank has 4"), 400,
                        "invalid_request_error", None, 2),
    E.RequestRejected: (E.RequestRejected("a rank refused it"), 400, "invalid_request_error", None, 2),
    E.GrammarError: (E.GrammarError("response_format: bad schema", "response_format"), 400,
                     "invalid_request_error", None, 2),
    E.PayloadTooLarge: (E.PayloadTooLarge("the request body is 9; at most 8", None), 413, "invalid_request_error",
                        "request_too_large", 2),
    E.AuthenticationError: (E.AuthenticationError("invalid or missing API key"), 401, "authentication_error",
                            "invalid_api_key", 2),
    E.ModelNotFound: (E.ModelNotFound("model 'x' does not exist", "model"), 404, "invalid_request_error",
                      "model_not_found", 2),
    E.ClientClosed: (E.ClientClosed("the client left"), 499, "invalid_request_error", "client_closed", 2),
    E.Overloaded: (E.Overloaded("at capacity", retry_after=1), 429, "rate_limit_error", "overloaded", 6),
    E.KVCacheFull: (E.KVCacheFull("no decode rank has 11 free pages", retry_after=1), 429, "rate_limit_error",
                    "kv_cache_full", 6),
    E.TenantRateLimited: (E.TenantRateLimited("tenant 'a' is over its limit", retry_after=7), 429,
                          "rate_limit_error", "tenant_rate_limited", 6),
    E.ConfigError: (E.ConfigError("serve.port: must be in 1..65535, got 0"), 500, "server_error", None, 3),
    E.CheckpointError: (E.CheckpointError("/m: no config.json"), 500, "server_error", None, 3),
    E.Unavailable: (E.Unavailable("routing is unavailable; retry", retry_after=1), 503, "server_error",
                    "unavailable", 4),
    E.NoRankAvailable: (E.NoRankAvailable("decode", 2, 1, 1), 503, "server_error", "unavailable", 4),
    E.BackendUnavailable: (E.BackendUnavailable("kernels: triton cannot run on cpu"), 503, "server_error",
                           "unavailable", 4),
    E.DeepEPUnavailable: (E.DeepEPUnavailable("ep_dispatch: deepep cannot run"), 503, "server_error", "unavailable",
                          4),
    E.UnitFailure: (E.UnitFailure("a unit failed"), 500, "server_error", None, 5),
    E.UnitStartFailed: (E.UnitStartFailed("no decode unit could start"), 503, "server_error", None, 5),
    E.PlacementFailed: (E.PlacementFailed("unit 0: bundles not placed"), 503, "server_error", None, 5),
    E.DeviceAssignmentError: (E.DeviceAssignmentError("ranks 0 and 2 both hold GPU 1"), 500, "server_error",
                              None, 5),
    E.HandoffFailed: (E.HandoffFailed("the prefill rank did not send"), 500, "server_error", None, 5),
    E.UnitFailed: (E.UnitFailed("the unit failed this batch 3 times"), 500, "server_error", None, 5),
    E.PeerLost: (E.PeerLost("rank 2 of the unit is gone"), 503, "server_error", None, 5),
    E.ReformFailed: (E.ReformFailed("rank 1 died during the membership change"), 500, "server_error", None, 5),
    E.UnitLost: (E.UnitLost("the unit's supervisor is gone"), 503, "server_error", None, 5),
}


def test_the_table_covers_every_class_errors_py_defines():
    defined = {v for v in vars(E).values() if isinstance(v, type) and issubclass(v, E.EpserveError)}
    assert defined == set(FAMILY)


@pytest.mark.parametrize("cls", list(FAMILY), ids=lambda c: c.__name__)
def test_each_class_maps_once_to_a_status_an_openai_body_and_a_cli_line(cls):
    exc, status, type_, code, exit_code = FAMILY[cls]
    got_status, body, headers = E.http_error(exc)
    assert got_status == status
    assert body == {"error": {"message": str(exc), "type": type_, "param": exc.param, "code": code}}
    assert headers == ({"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {})
    line, got_exit = E.cli_error(exc, "generate")
    assert line == f"epserve generate: error: {exc}" and "\n" not in line and got_exit == exit_code


def test_the_families_keep_their_builtin_bases():
    assert issubclass(E.RequestError, ValueError) and issubclass(E.ConfigError, ValueError)
    assert issubclass(E.Unavailable, RuntimeError) and issubclass(E.UnitFailure, RuntimeError)
    assert issubclass(E.ContextTooLong, E.InvalidRequest) and issubclass(E.CheckpointError, E.ConfigError)


def test_fields_and_messages_name_the_value_and_the_limit():
    e = E.ContextTooLong(2000, 100, 2048, "max_tokens")
    assert str(e) == ("this model's maximum context length is 2048 tokens; you requested 2100 "
                      "(2000 in the prompt, 100 to generate)")
    assert (e.n_prompt, e.max_tokens, e.max_len, e.param) == (2000, 100, 2048, "max_tokens")
    n = E.NoRankAvailable("decode", 2, 1, 1)
    assert str(n) == "no decode rank available: 0 of 2 ranks eligible (1 dead, 1 draining)"
    assert n.headers == {"Retry-After": "5"}
    assert E.InvalidRequest("x", "stop", code="unsupported_parameter").code == "unsupported_parameter"
    assert E.InvalidRequest("y").code is None                 # an instance's code never leaks into its class


def test_anything_outside_the_family_is_a_500_and_exit_1():
    status, body, headers = E.http_error(KeyError("k"))
    assert status == 500 and body["error"]["type"] == "server_error" and "KeyError" in body["error"]["message"]
    assert E.cli_error(FileExistsError("/m already holds a checkpoint\nsecond line"), "make-tiny-model") == \
        ("epserve make-tiny-model: error: /m already holds a checkpoint", 1)


def _local_errors():
    from epserve.fleet.kv_block_format import BlockFormatError
    from epserve.model.kv_cache import OutOfPages
    return [BlockFormatError("truncated", "12 bytes"), OutOfPages("asked for 3 KV pages, 1 free of 4")]


@pytest.mark.parametrize("exc", [v[0] for v in FAMILY.values()] + _local_errors(), ids=lambda e: type(e).__name__)
def test_every_error_pickles_with_its_class_and_fields(exc):
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.args == exc.args
    assert vars(back) == vars(exc)


def test_every_exception_class_in_the_package_is_in_the_family():
    """No exception class outside errors.py's family (a local one may live elsewhere, but derives from it)."""
    bases = {"Exception", "ValueError", "RuntimeError", "TypeError", "KeyError", "OSError"} | \
        {c.__name__ for c in FAMILY}
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in {".venv", "tests", "build"} or any(p.startswith(".") for p in rel.parts):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")) in bases or
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception")) for b in node.bases):
                mod = ".".join(("epserve", *rel.with_suffix("").parts)).removesuffix(".__init__")
                found.append((mod, node.name))
    assert len(found) >= len(FAMILY) + 2
    for mod, name in found:
        cls = getattr(importlib.import_module(mod), name)
        assert issubclass(cls, E.EpserveError), f"{mod}.{name} is outside the error family"


@pytest.fixture(scope="module")
def raising(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def throw(exc):
        raise exc

    @ray.remote(num_cpus=0)
    def give(exc):
        return {"error": exc}

    return throw, give


@pytest.mark.parametrize("exc", [FAMILY[c][0] for c in (E.ContextTooLong, E.RequestTooLarge, E.InvalidRequest,
                                                          E.NoRankAvailable, E.TenantRateLimited, E.UnitFailed)],
                         ids=lambda e: type(e).__name__)
def test_an_error_crosses_ray_as_its_own_class(raising, exc):
    """Raised in a Ray task it arrives as the same class (the wrapper's cause, no text to parse);
    returned as a value it arrives as itself."""
    import ray
    throw, give = raising
    with pytest.raises(type(exc)) as info:
        ray.get(throw.remote(exc), timeout=60)
    got = E.unwrap(info.value)
    assert type(got) is type(exc) and vars(got) == vars(exc)
    assert E.http_error(info.value) == E.http_error(exc)
    value = ray.get(give.remote(exc), timeout=60)["error"]
    assert type(value) is type(exc) and vars(value) == vars(exc)


# ---- the one context check and the one page size -------------------------------------------------
@pytest.mark.parametrize("n_prompt,max_len,max_tokens,param", [
    (10, 2048, None, None), (2047, 2048, None, None), (2048, 2048, None, "prompt"), (5000, 2048, None, "prompt"),
    (2000, 2048, 48, None), (2000, 2048, 49, "max_tokens"), (1, 1, 1, "prompt"), (2048, 2048, 1, "prompt"),
])
def test_check_context_table(n_prompt, max_len, max_tokens, param):
    if param is None:
        check_context(n_prompt, max_len, max_tokens)
        return
    with pytest.raises(E.ContextTooLong) as info:
        check_context(n_prompt, max_len, max_tokens)
    e = info.value
    assert (e.param, e.code, e.max_len, e.n_prompt) == (param, "context_length_exceeded", max_len, n_prompt)
    assert f"maximum context length is {max_len} tokens" in str(e)


def test_check_context_names_the_chat_prompt_param():
    with pytest.raises(E.ContextTooLong) as info:
        check_context(9, 8, prompt_param="messages")
    assert info.value.param == "messages" and str(info.value).endswith("the prompt has 9")


@pytest.mark.parametrize("max_model_len,max_pos,want", [(None, 2048, 2048), (1024, 2048, 1024), (4096, 2048, 2048)])
def test_context_len_is_the_config_capped_by_the_checkpoint(max_model_len, max_pos, want):
    assert context_len(max_model_len, max_pos) == want


@pytest.mark.parametrize("n,page,want", [(1, 64, 1), (64, 64, 1), (65, 64, 2), (704, 64, 11), (65, 32, 3)])
def test_kv_pages_table(n, page, want):
    assert kv_pages(n, page) == want


def test_the_page_size_comes_from_the_config_to_the_ranks():
    from epserve.actors.launch import rank_spec
    cfg = load_config({"kv_page_tokens": 32})
    assert rank_spec(cfg, "/m", cfg.decode).page_size == 32
    assert rank_spec(load_config(None), "/m", cfg.decode).page_size == 64
    with pytest.raises(E.ConfigError, match="kv_page_tokens: must be >= 1, got 0"):
        load_config({"kv_page_tokens": 0})


def test_no_literal_page_size_in_the_request_path():
    """llm.py and the router size pages from the config, never from a literal 64."""
    for rel in ("llm.py", "serve/router.py"):
        tree = ast.parse((ROOT / rel).read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == 64], rel
