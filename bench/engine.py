"""Offline throughput of one rank (the whole model in-process) vs transformers' generate."""
from __future__ import annotations

import time

import torch

from epserve.model.sampling import SamplingParams
from epserve.model.tiny import default_model_dir
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence


def _prompts(batch: int, vocab: int, length: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(batch)
    return [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def time_engine(engine, prompts, n_tokens) -> float:
    params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
    seqs = [Sequence(f"b{i}", p, params) for i, p in enumerate(prompts)]
    t = time.perf_counter()
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return time.perf_counter() - t


def time_transformers(model, prompts, n_tokens) -> float:
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


def run(model: str | None = None, batches=(1, 8, 32), n_tokens: int = 32, with_transformers: bool = True) -> list:
    model_dir = str(model or default_model_dir())
    torch.manual_seed(0)
    engine = make_local_engine(model_dir, kv_pages=512, dtype="float32")
    hf = None
    if with_transformers:
        from transformers import DeepseekV3ForCausalLM
        hf = DeepseekV3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for b in batches:
        prompts = _prompts(b, engine.args.vocab_size)
        time_engine(engine, prompts[:1], 2)                 # warm-up
        dt = time_engine(engine, prompts, n_tokens)
        row = {"batch": b, "output_tokens": b * n_tokens, "epserve_tok_s": round(b * n_tokens / dt, 1)}
        if hf is not None:
            time_transformers(hf, prompts[:1], 2)
            dt_hf = time_transformers(hf, prompts, n_tokens)
            row["transformers_tok_s"] = round(b * n_tokens / dt_hf, 1)
            row["speedup"] = round(dt_hf / dt, 2)
        rows.append(row)
    return rows


# ---------------------------------------------------------------- MTP on the trained tiny model

def trained_model_dir():
    """The train-tiny checkpoint in the user cache, trained on first use (~3 min on 2 cores)."""
    from epserve.config import cache_root
    from epserve.model.train_tiny import train
    out = cache_root() / "trained-tiny-v1"
    if not (out / "config.json").exists():
        torch.set_num_threads(1)
        train(out)
    return out


def heldout_prompts(tokenizer_file: str, n: int, length: int = 48) -> list[list[int]]:
    """n prompts of `length` tokens cut at even intervals from the held-out standard-library files."""
    from tokenizers import Tokenizer
    from epserve.model.train_tiny import corpus
    ids = Tokenizer.from_file(tokenizer_file).encode(corpus("heldout")[:400_000]).ids
    stride = (len(ids) - length) // n
    return [ids[i * stride: i * stride + length] for i in range(n)]


def run_mtp(model: str | None = None, batch: int = 32, n_tokens: int = 64) -> dict:
    """Greedy decoding of held-out prompts with and without MTP, side by side in one run: output
    tokens/s, acceptance rate, tokens per target step, and whether the tokens agree (they must)."""
    model_dir = str(model or trained_model_dir())
    prompts = heldout_prompts(f"{model_dir}/tokenizer.json", batch)
    out = {"model": model_dir, "prompts": f"{batch} x 48 tokens of held-out standard-library source",
           "output_tokens_per_request": n_tokens}
    tokens = {}
    for name, k in (("without_mtp", 0), ("mtp_k1", 1), ("mtp_k2", 2)):
        engine = make_local_engine(model_dir, kv_pages=512, dtype="float32", mtp_draft=k)
        time_engine(engine, prompts[:2], 4)                       # warm-up
        if engine.drafter is not None:
            engine.drafter.counters = type(engine.drafter.counters)()
        params = SamplingParams(max_tokens=n_tokens, temperature=0.0, ignore_eos=True)
        seqs = [Sequence(f"m{i}", p, params) for i, p in enumerate(prompts)]
        t = time.perf_counter()
        for s_ in seqs:
            engine.add(s_)
        steps = 0
        while engine.has_work:
            engine.step()
            steps += 1
        dt = time.perf_counter() - t
        tokens[name] = [s_.output_ids for s_ in seqs]
        row = {"output_tok_s": round(batch * n_tokens / dt, 1), "steps": steps, "seconds": round(dt, 2)}
        if engine.drafter is not None:
            c = engine.drafter.counters.as_dict()
            row.update(acceptance_rate=round(c["acceptance_rate"], 4),
                       tokens_per_target_step=round(c["tokens_per_step"], 3),
                       drafts_proposed=c["proposed"], drafts_accepted=c["accepted"],
                       same_tokens_as_without_mtp=tokens[name] == tokens["without_mtp"])
        out[name] = row
    out["speedup_k1"] = round(out["mtp_k1"]["output_tok_s"] / out["without_mtp"]["output_tok_s"], 3)
    out["speedup_k2"] = round(out["mtp_k2"]["output_tok_s"] / out["without_mtp"]["output_tok_s"], 3)
    return out


# ---------------------------------------------------------------- the real engine on a GPU

def _loop(unit) -> dict:
    import ray
    st = ray.get(unit.status.remote())
    return {"steps": st["steps"], **(st["loop_timing"][0] if st["loop_timing"] else {})}


def _wait(cond, timeout: float = 600.0, every: float = 0.01) -> None:
    t = time.time()
    while not cond():
        if time.time() - t > timeout:
            raise TimeoutError("the engine did not reach the benchmark's state in time")
        time.sleep(every)


def _decode_window(unit, n_running: int, n_steps: int) -> dict:
    """Rank-side ms per decode step while exactly n_running requests decode, over n_steps steps."""
    import ray
    _wait(lambda: ray.get(unit.stats.remote())[0].n_running == n_running and
          ray.get(unit.stats.remote())[0].n_waiting == 0)
    s0 = _loop(unit)
    _wait(lambda: _loop(unit)["steps"] >= s0["steps"] + 4)          # a new bucket's graph is captured
    a = _loop(unit)
    t = time.perf_counter()
    _wait(lambda: _loop(unit)["steps"] >= a["steps"] + n_steps)
    wall = time.perf_counter() - t
    b = _loop(unit)
    n = b["steps"] - a["steps"]
    ms = {k: (b[k] - a[k]) * 1e3 / n for k in ("total", "step", "agree", "inbox", "push")}
    return {"steps": n, "step_ms": round(ms["total"], 3), "engine_step_ms": round(ms["step"], 3),
            "control_ms": round(ms["total"] - ms["step"] - ms["agree"], 3), "push_ms": round(ms["push"], 3),
            "wall_ms_per_step": round(wall * 1e3 / n, 3), "output_tok_s": round(n_running * n / wall, 1)}


def run_gpu(model: str | None = None, batches=(1, 32, 128), ctx: int = 64, kernels: str = "auto",
            prefill_tokens: int = 16384, decode_steps: int = 50, compare_layers: bool = True,
            ep_emulate: int | None = None, skew: str = "lognormal") -> dict:
    """epserve.LLM through Ray rank actors, one unit on one GPU, with continuous batching.
    ep_emulate N: the unit is the emulated rank of an EP unit of N GPUs (`ep_dispatch: emulated`,
    model/ep_emulate.py: every MoE layer receives that rank's rows under `skew` loads, exchanges held
    for DeepEP's published time) and runs the overlapped schedules (`overlap: on`).

    For each batch size B: B requests of `ctx` prompt tokens, decoding until the rank-side step
    time is measured over `decode_steps` steps with all B running (CUDA-graph replays). Then a
    prefill of prefill_tokens per step. With a V3-width checkpoint, the same GPU times one layer
    of that shape (bench step) so the engine's overhead over the kernels is a number.
    """
    import ray

    import epserve
    from epserve.model.checkpoint import read_config
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    pages = max(batches) * (-(-(ctx + 2 * decode_steps + 64) // 64)) + 64
    cfg = {"dtype": "bfloat16", "kernels": kernels, "eplb": {"enabled": False}, "kv_store": {"enabled": False},
           "decode": {"units": 1, "nodes_per_unit": 1, "gpus_per_node": 1, "max_batch_size": max(batches),
                      "kv_pages": max(pages, 2 * prefill_tokens // 64 + 64), "max_batch_tokens": prefill_tokens}}
    if ep_emulate:
        cfg.update(ep_dispatch="emulated", overlap="on", ep_emulate={"ranks": ep_emulate, "skew": skew},
                   prefill={"nodes_per_unit": 1, "gpus_per_node": 1})
    out = {"model": model_dir, "shape": {"dim": args.dim, "layers": args.n_layers, "dense": args.n_dense_layers,
                                         "experts": args.n_routed_experts, "topk": args.n_activated_experts},
           "context": ctx, "decode": {},
           "ep_emulate": cfg.get("ep_emulate"), "overlap": cfg.get("overlap", "auto (a one-rank unit: off)")}
    g = torch.Generator().manual_seed(0)
    with epserve.LLM(model=model_dir, config=cfg) as llm:
        unit = llm.units[0]
        out["backend"] = ray.get(unit.status.remote())["ranks"][0].get("kernels")
        for b in batches:
            params = SamplingParams(max_tokens=decode_steps * 3 + 8, temperature=0.0, ignore_eos=True)
            items = [(Sequence(f"d{b}-{i}", torch.randint(4, args.vocab_size, (ctx,), generator=g).tolist(), params), 0)
                     for i in range(b)]
            ref = unit.generate.remote(items)
            out["decode"][b] = _decode_window(unit, b, decode_steps)
            ray.get(ref)
        # prefill: prompts of min(ctx, 4096) tokens filling prefill_tokens per step; first round warms up
        n = min(4096, max(ctx, 512))
        per_step = max(1, prefill_tokens // n)
        params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for rnd in ("warm", "timed"):
            items = [(Sequence(f"p{rnd}{i}", torch.randint(4, args.vocab_size, (n,), generator=g).tolist(), params), 0)
                     for i in range(per_step * 3)]
            t = time.perf_counter()
            ray.get(unit.generate.remote(items))
            dt = time.perf_counter() - t
        out["prefill"] = {"prompt_tokens": n, "prompts_per_step": per_step, "steps": 3,
                          "input_tok_s": round(per_step * 3 * n / dt, 1), "step_ms": round(dt * 1e3 / 3, 2)}
    if compare_layers and args.dim >= 1024 and torch.cuda.is_available():
        from epserve.bench.step import layer_ms
        cmp = {}
        for b, d in out["decode"].items():
            ms = layer_ms(args, "decode", b, ctx + 2 * decode_steps, args.n_routed_experts, kernels if kernels != "auto"
                          else "native")
            layers = args.n_dense_layers * (ms["attention"] + ms["dense_ffn"]) + \
                args.n_moe_layers * (ms["attention"] + ms["moe_ffn"]) + ms.get("mla_plan_per_step", 0.0)
            cmp[b] = {"layers_x_layer_ms": round(layers, 3), "engine_step_ms": d["step_ms"],
                      "engine_over_layers": round(d["step_ms"] / layers, 3)}
        out["engine_vs_layer_bench"] = cmp
    return out


def profile_decode(out_dir: str, model: str | None = None, batch: int = 64, kernels: str = "auto",
                   n_steps: int = 3) -> dict:
    """PyTorch profiler trace of decode steps of one rank on a GPU (in-process): what a step
    launches. With CUDA graphs the step is one cudaGraphLaunch plus the sampler's few kernels.
    Writes out_dir/decode_steps.json (Chrome trace) and returns the launch counts per step."""
    import os

    from torch.profiler import ProfilerActivity, profile

    from epserve.model.checkpoint import read_config
    model_dir = str(model or default_model_dir())
    args = read_config(model_dir)
    eng = make_local_engine(model_dir, kernels=kernels, device="cuda", dtype="bfloat16",
                            fp8_activations=args.fp8_block is not None, max_batch_size=batch,
                            kv_pages=batch * 4 + 16)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=n_steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add(Sequence(f"pr{i}", torch.randint(4, args.vocab_size, (32,), generator=g).tolist(), params))
    for _ in range(4):                        # prefill, then decode steps that capture the bucket's graph
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n_steps):
            eng.step()
        torch.cuda.synchronize()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "decode_steps.json")
    prof.export_chrome_trace(path)
    counts = {}
    for ev in prof.key_averages():
        if ev.key in ("cudaGraphLaunch", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                      "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaStreamSynchronize"):
            counts[ev.key] = ev.count / n_steps
    return {"trace": path, "per_step": counts, "cuda_graphs": eng.graphs is not None, "batch": batch,
            "backend": eng.kb.__name__.rsplit(".", 1)[-1]}
