"""Shared fixtures: tiny checkpoints (made once per session) and, for Ray tests, one
simulated multi-node cluster on loopback shared by every test that needs it."""
from __future__ import annotations

import contextlib
import json
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from epserve.model.tiny import TINY_CONFIG, make_tiny_model

# Shape B: no q_lora, one expert group, plain RoPE, greedy top-k routing without bias.
SHAPE_B = {"q_lora_rank": None, "n_group": 1, "topk_group": 1, "rope_scaling": None, "num_experts_per_tok": 2,
           "n_routed_experts": 8, "first_k_dense_replace": 2, "num_hidden_layers": 4, "hidden_size": 96,
           "num_attention_heads": 3, "num_key_value_heads": 3}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="session")
def tiny_b_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny_b", seed=1, shards=3,
                               config_overrides=SHAPE_B))


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny_fp8", fp8=True, seed=2))


def hf_model(model_dir):
    """transformers' DeepseekV3ForCausalLM on the same weights: the independent reference."""
    from transformers import DeepseekV3ForCausalLM
    return DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the prompt's logits from transformers, without its cache (plain recompute)."""
    ids = list(prompt)
    with torch.no_grad():
        prompt_logits = model(torch.tensor([ids])).logits[0]
        out = []
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
    return out, prompt_logits


def prompts_of(lengths, vocab=TINY_CONFIG["vocab_size"], seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]


def engine_outputs(engine, prompts, params) -> list[list[int]]:
    """Each prompt's tokens from an in-process engine, stepped until it has no work."""
    from epserve.pipelines.sequence import Sequence
    seqs = [Sequence(f"ref{i}", p, params) for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs]


def single_rank_outputs(model_dir, prompts, params) -> list[list[int]]:
    """Each prompt's tokens from one in-process rank with every expert local (the oracle units are held to)."""
    from epserve.pipelines.local import make_local_engine
    return engine_outputs(make_local_engine(model_dir), prompts, params)


def wait_unit_empty(unit, timeout_s: float = 30.0, poll_s: float = 0.05) -> list:
    """Poll a unit supervisor's rank stats until no rank runs a request or holds a KV page (or the
    time is up); -> the last stats (the caller asserts on them)."""
    import time

    import ray
    deadline = time.time() + timeout_s
    while True:
        stats = ray.get(unit.stats.remote())
        if sum(s.n_running + s.kv_blocks_used for s in stats) == 0 or time.time() > deadline:
            return stats
        time.sleep(poll_s)



def wait_dead(actor, timeout_s: float = 60.0) -> None:
    """Until calls to a killed actor fail because it died. ray.kill only asks for the kill: for a
    moment after it returns, the actor still answers calls. TimeoutError when it still answers
    after timeout_s."""
    import time

    import ray
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.__ray_ready__.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the killed actor still answers {timeout_s:g} s after ray.kill")
        time.sleep(0.2)


def decode_forward_without_sync(eng) -> tuple[torch.Tensor, int]:
    """Two warm-up steps of two sequences on `eng` (a CUDA engine), then one decode forward under
    torch's sync debug mode "error" (a host sync in it raises) -> (its logits, sequences in the step)."""
    from epserve.model.deepseek_v3 import DecodeBatch
    from epserve.model.sampling import SamplingParams
    from epserve.pipelines.sequence import Sequence
    seqs = [Sequence(f"s{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts_of([20, 65], vocab=500, seed=1))]
    for s in seqs:
        eng.add(s)
    eng.step()
    eng.step()                                                # JIT, device tables and caches warm
    step = eng.batcher.schedule()
    rows = eng.table.rows_for(step.seqs)
    t = torch.tensor([[s.last_token for s in step.seqs], [s.n_computed for s in step.seqs], rows], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = DecodeBatch.from_rows(t[0], t[1], t[2], eng.table.tables, eng.cache.page_size, eng.table.scratch_row,
                                      eng.kb.plan_mla_decode())
        logits = eng.model.forward(batch, eng.cache.kv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return logits, len(step.seqs)

def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def one_rank_server(model_dir: str, tmp_path_factory, model_name: str):
    """A real server (serve/app.py start_deployment) of `model_dir` with 1-rank prefill and decode units,
    reference kernels in float32, API key "k", on the shared cluster -> its base URL; shut down on exit."""
    from epserve.config import load_config
    from epserve.serve.app import start_deployment
    port = free_port()
    cfg = load_config({"model": model_dir, "dtype": "float32", "kernels": "reference", "kv_store": {"enabled": False},
                       "ledger": {"path": str(tmp_path_factory.mktemp("ledger")), "flush_interval_s": 3600},
                       "prefill": {"gpus_per_node": 1, "kv_pages": 32}, "decode": {"gpus_per_node": 1, "kv_pages": 64},
                       "serve": {"port": port, "model_name": model_name, "api_keys": ["k"]}})
    dep = start_deployment(cfg)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield base
    finally:
        dep.shutdown()


def wait_healthy(base: str, timeout_s: float = 90.0, poll_s: float = 0.5) -> dict:
    """Poll `base` + "/health" (it needs no API key) until it answers 200; -> its JSON body.

    Raises TimeoutError after timeout_s naming the last status and body, or the last connection
    error, so a server that never came up fails its fixture loudly instead of its first test."""
    import time

    import httpx
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = httpx.get(base + "/health", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{base}/health did not answer 200 within {timeout_s:g} s; last: {last}")
        time.sleep(poll_s)


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def ray_cluster():
    """One simulated cluster for the whole session: a CPU-less head and 4 fake nodes x 2 fake GPUs,
    all on 127.0.0.1. Tests share it (starting clusters is the expensive part on 2 cores)."""
    import ray
    from ray.cluster_utils import Cluster
    mb = 1 << 20
    cluster = Cluster(initialize_head=True, shutdown_at_exit=True, head_node_args=dict(
        num_cpus=0, include_dashboard=False, node_ip_address="127.0.0.1", object_store_memory=100 * mb))
    for i in range(4):
        cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address="127.0.0.1", object_store_memory=150 * mb,
                         resources={f"node{i}": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


# A small trained checkpoint with its MTP module (model/train_tiny.py at test size, ~20 s on 2 cores):
# enough training that drafts are accepted often, so verify steps take both branches.
TRAINED_TEST = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
                "n_routed_experts": 8, "q_lora_rank": 32, "kv_lora_rank": 32}


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory):
    from epserve.model.train_tiny import TrainSpec, train
    out = tmp_path_factory.mktemp("ckpt") / "trained"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(out, TrainSpec(steps=80, batch=8, seq_len=64, config_overrides=tuple(TRAINED_TEST.items())),
              log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return str(out)


@pytest.fixture(scope="session")
def tiny_mtp_dir(tmp_path_factory):
    """The random tiny model with a random MTP layer (num_nextn_predict_layers: 1)."""
    return str(make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny_mtp", seed=4,
                               config_overrides={"num_nextn_predict_layers": 1}))
