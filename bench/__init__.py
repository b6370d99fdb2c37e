"""`epserve bench BENCHMARK`: benchmarks that measure and print JSON. They are not tests. Each is its own
subcommand with only the flags it reads (bench/args.py; `epserve bench BENCHMARK --help`).

engine  offline tokens/s of one rank at several batch sizes, next to transformers' generate; with
        --device cuda: epserve.LLM through Ray on one GPU, rank-side decode step time per batch size,
        prefill tokens/s, and (V3-width checkpoints) the engine against layers x the layer benchmark;
        --ep-presets: decode on the EP144 rank, prefill on the EP32 rank (emulated, overlapped), each
        against bench step's step on the same rank and schedule; --arch v32: DeepSeek-V3.2 against V3 on their
        EP144-rank presets at one long --context, the --batches that fit in memory
units   the lockstep's control cost, old central loop against the rank-driven loop, 1/2/4/8 ranks
starts  one unit's start time against four units started at once
admission  requests/s the front door admits at max_tokens=1 with 1 and 2 ingress replicas
delta_path  decode-heavy tokens/s through the front door (32 streams x 64 tokens) and Ray calls per token
        on the delta path (rank -> stream sink -> ingress replica)
eplb    EPLB runtime and balance, improved vs DeepSeek's baseline, at production shapes
kernels FP8 GEMM TFLOPS / MLA decode GB/s on a GPU
step    one EP rank's prefill or decode step on a GPU: headline, the overlapped schedule on the emulated EP
        rank (--ep-ranks, --skew; exposed vs hidden exchange time per layer); secondary, one layer's one-batch
        work with no exchange at DeepSeek-V3 shapes (--no-ep: that only); --mtp: decode also with MTP k = 1 at
        a forced --acceptance (default 0.85), with and without it side by side; --arch v32: one layer of
        DeepSeek-V3.2 against V3 at long context (--context list, decode at 64 and 128 requests, prefill at
        32K), the indexer and sparse MLA timed as their own stages (--small: on CPU)
grammar grammar libraries (llguidance, xgrammar, outlines-core): compile ms per schema, mask us per token
prefix  TTFT at 0/50/90 % prefix hits from the on-disk KV store; KV-load vs raw read throughput
overlap step time with the overlapped schedules on/off/auto, prefill and decode, with and without injected latency;
        --gpus N: a unit of N ranks on N GPUs of this host (NCCL; DeepEP where it passes), no injected cost
handoff prefill -> decode KV handoff, pair group (collective) vs object store: GB/s, ms, share of TTFT
step --gpus N  real EP across N GPUs of this host: a V3 MoE layer's dispatch, experts and combine timed
deepep  DeepEP dispatch/combine bandwidth and latency at V3 shapes (7168, top-8, FP8 dispatch), normal and
        low-latency, against NVLink's rate (--gpus N, default 8)
overlap --profile DIR  PyTorch profiler traces of an overlapped prefill and decode step, every rank of a unit;
engine --device cuda --profile DIR  a trace of one rank's decode steps (graph replays vs launches)
chaos   one fault at a time (kill -9 of ranks, ledger, controllers, ingress, a node; full KV disk, corrupt
        blocks, a truncated ledger part, the whole server killed and restarted) under 32 streams: a table + JSON;
        --elastic: elastic units, a decode and a prefill rank killed: longest token gap, failures, equality,
        tokens/s before / shrunk / rejoined, and the EP144 recovery-time model (fleet/recovery_model.py)
soak    the server at its measured capacity for --duration-s: RSS of every process, failures, 429s above it
serve   HTTP load generator (Poisson arrivals, concurrency sweep) against a running server; --constrained:
        decode TPOT with half of a 32-request batch JSON-constrained vs none, grammar compile ms per schema
        (with no --url: starts the embedded default server, measures it, stops it)
"""
from __future__ import annotations

import importlib
import platform

from epserve.errors import InvalidRequest


def environment() -> dict:
    """What a result JSON must name: the card, the library versions, the commit and the command
    (benchmarks/results/ rule). The commit is git's, or EPSERVE_COMMIT where the tree was copied
    without its .git (the device runs)."""
    import os
    import subprocess
    import sys

    import torch
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("triton", "deep_gemm", "flash_mla", "deep_ep", "ray", "transformers"):
        try:
            versions[mod] = getattr(importlib.import_module(mod), "__version__", "installed")
        except Exception:        # absent or unimportable here: say so, never guess
            versions[mod] = None
    commit = os.environ.get("EPSERVE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
    return {"machine": platform.machine(), "python": platform.python_version(), **versions,
            "cpus": os.cpu_count(), "commit": commit, "command": " ".join(["epserve", *sys.argv[1:]]),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def run(args) -> dict:
    """Runs the benchmark `args.what` (parsed by bench/args.py) -> {"bench", "env", "results"}.
    Refuses, before any work, flags this mode of the benchmark would ignore and GPU runs on a host
    without CUDA (args.check)."""
    from epserve.bench.args import check
    check(args)
    what = args.what
    if what == "engine" and args.profile:
        from epserve.bench import engine
        return {"bench": "profile-decode", "env": environment(),
                "results": engine.profile_decode(args.profile, model=args.model, kernels=args.kernels or "auto")}
    if what == "overlap" and args.profile:
        from epserve.bench import overlap
        out = overlap.profile(args.profile, model=args.model, latency_ms=args.latency_ms or 0.0)
        return {"bench": "profile", "env": environment(), "results": out}
    mod = importlib.import_module(f"epserve.bench.{what}")
    if what == "engine":
        out = _bench_engine(mod, args)
    elif what == "step":
        out = _bench_step(mod, args)
    elif what == "overlap":
        out = mod.run(model=args.model, latency_ms=args.latency_ms, gpus=args.gpus)
    elif what in ("units", "prefix", "starts", "admission", "handoff", "delta_path"):
        out = mod.run(model=args.model)
    elif what == "grammar":
        out = mod.run(device=args.device)
    elif what == "deepep":
        out = mod.run(args.gpus)
    elif what == "kernels":
        out = mod.run(backends=tuple(args.backends.split(",")))
    elif what == "serve":
        out = _bench_serve(mod, args)
    elif what == "chaos":
        if args.elastic:
            from epserve.bench import chaos_elastic as mod
        faults = tuple(args.faults.split(",")) if args.faults else mod.FAULTS
        out = mod.run(faults=faults, n_streams=args.streams or (16 if args.elastic else 32), model=args.model,
                      workdir=args.workdir)
    elif what == "soak":
        out = mod.run(duration_s=args.duration_s, model=args.model, workdir=args.workdir)
    else:
        out = mod.run()
    return {"bench": what, "env": environment(), "results": out}


def _batches(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",")]
    except ValueError:
        raise InvalidRequest(f"--batches {text!r} is not a comma-separated list of sizes",
                             "--batches") from None


def _bench_engine(mod, args):
    if args.arch == "v32" and (args.device == "cuda" or args.small):
        from epserve.bench import engine_long
        small = args.small
        return engine_long.run(batches=_batches(args.batches or ("2,4" if small else "64,128")),
                               ctx=args.context or (64 if small else 65536), small=small,
                               kernels=args.kernels or ("reference" if small else "auto"))
    if args.device == "cuda" and args.ep_presets:
        from epserve.bench import engine_ep
        return engine_ep.run(batches=_batches(args.batches or "64,128,256"), ctx=args.context or 4096,
                             kernels=args.kernels or "auto", skew=args.skew or "lognormal")
    if args.device == "cuda":
        return mod.run_gpu(model=args.model, batches=_batches(args.batches or "1,32,128"), ctx=args.context or 64,
                           kernels=args.kernels or "auto", ep_emulate=args.ep_ranks, skew=args.skew or "lognormal")
    if args.mtp:
        return mod.run_mtp(model=args.model, batch=_batches(args.batches or "32")[-1], n_tokens=args.tokens or 64)
    return mod.run(model=args.model, batches=_batches(args.batches or "1,8,32"), n_tokens=args.tokens or 32,
                   with_transformers=not args.no_transformers)


def _bench_step(mod, args):
    if args.gpus:
        from epserve.bench import ep
        return ep.run_step(args.gpus, backend=args.backend, phase=args.phase or "decode", tokens=args.step_tokens)
    if args.arch == "v32":
        from epserve.bench import step_long
        return step_long.run(backend=args.backend, device=(args.device or "cpu") if args.small else "cuda",
                             small=args.small, contexts=args.context,
                             requests=(args.step_tokens,) if args.step_tokens else None,
                             phases=(args.phase,) if args.phase else ("decode", "prefill"), graphs=not args.eager,
                             ep_ranks=args.ep_ranks, skew=args.skew or "lognormal")
    acceptance = 0.85 if args.acceptance is None else args.acceptance
    if args.mtp and (args.small or args.no_ep):
        return mod.run_mtp(backend=args.backend, tokens=args.step_tokens, graphs=not args.eager, small=args.small,
                           device=(args.device or "cpu") if args.small else "cuda", acceptance=acceptance)
    return mod.run_step(backend=args.backend, phase=args.phase or "decode", tokens=args.step_tokens,
                        graphs=not args.eager, cached=args.cached or 0.0, ep_ranks=args.ep_ranks,
                        skew=args.skew or "lognormal", ep=not args.no_ep, mtp=args.mtp, acceptance=acceptance,
                        ctx=args.context[0] if args.context else None, kernel_table=args.kernel_table)


def _bench_serve(mod, args) -> list | dict:
    try:
        levels = tuple(int(c) for c in (args.concurrency or "1,4,16").split(","))
    except ValueError:
        raise InvalidRequest(f"--concurrency {args.concurrency!r} is not a comma-separated list of "
                             "levels", "--concurrency") from None

    def run(url, model, key, model_dir=None):
        if args.constrained:
            from epserve.bench import serve_constrained
            return serve_constrained.run(url, model, key, model_dir=model_dir)
        return mod.run(base_url=url, model=model, concurrency=levels, n_requests=args.requests or 32,
                       rate=args.rate, api_key=key)
    if args.url:
        return run(args.url, mod.served_model(args.url, args.api_key), args.api_key)
    import socket

    from epserve.config import load_config
    from epserve.serve.app import start_deployment
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(args.config, **({"model": args.model} if args.model else {}))
    import dataclasses
    cfg = dataclasses.replace(cfg, serve=dataclasses.replace(cfg.serve, port=port, host="127.0.0.1"))
    dep = start_deployment(cfg)
    try:
        return run(f"http://127.0.0.1:{port}", cfg.serve.model_name, None, dep.model_dir)
    finally:
        dep.shutdown()
