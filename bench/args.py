"""`epserve bench BENCHMARK [flags]`: one argparse subcommand per benchmark, each with only the flags
its run reads, and the checks of flags that are valid only together or only apart.

Contract: a flag a benchmark does not read is an argparse error; a flag valid only in one mode of a
benchmark (step's --phase against --mtp) is refused by `check()` with one line naming both flags; a
GPU benchmark on a machine without CUDA is refused by `check()` before it imports its kernels.
Every refusal here is one line on stderr (cli.py names the benchmark: `epserve bench step: error:
...`) and a non-zero exit, never a traceback. Flags whose meaning depends on the mode default to
None here, so "given" can be told from "defaulted"; `run()` in bench/__init__.py fills the real defaults.
"""
from __future__ import annotations

import argparse
import sys

from epserve.errors import InvalidRequest, Unavailable

SKEWS = "zipf | lognormal | hot_expert | hot_group | equal | dead"


class BenchParser(argparse.ArgumentParser):
    """A benchmark's parser: its errors are one line (`epserve bench NAME: error: ...`, exit 2), and
    an argument it does not take is its own error, naming the benchmark, not the top parser's."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if extra and getattr(self, "is_leaf", False):
            self.error(f"unrecognized arguments: {' '.join(extra)} ({self.prog} does not take them; "
                       f"see {self.prog} --help)")
        return ns, extra


def _leaf(sub, name: str, help_: str) -> BenchParser:
    p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)   # --backend is not --backends
    p.is_leaf = True
    return p


def add_parser(sub) -> None:
    """Adds `bench` and its benchmarks to the top-level subparsers `sub`."""
    b = sub.add_parser("bench", help="benchmarks; print JSON (not tests)",
                       description="benchmarks; each prints JSON (they are not tests)")
    bs = b.add_subparsers(dest="what", required=True, metavar="BENCHMARK", parser_class=BenchParser)

    e = _leaf(bs, "engine", "offline tokens/s of one rank vs transformers (cpu); --device cuda: epserve.LLM "
              "through Ray on one GPU; --mtp: acceptance and tokens/s with and without MTP")
    e.add_argument("--model", help="checkpoint folder")
    e.add_argument("--batches", default=None, help="batch sizes (default: 1,8,32; --device cuda: 1,32,128; "
                   "--mtp: the last one)")
    e.add_argument("--tokens", type=int, help="cpu / --mtp: output tokens per request (default 32; --mtp 64)")
    e.add_argument("--no-transformers", action="store_true", help="cpu: skip transformers' generate")
    e.add_argument("--mtp", action="store_true", help="cpu: with and without MTP (a trained checkpoint: --model "
                   "DIR, default: trained once into the user cache)")
    e.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cpu: one rank in-process; cuda: epserve.LLM through Ray rank actors on one GPU")
    e.add_argument("--kernels", help="--device cuda: kernel backend (default auto)")
    e.add_argument("--context", type=int, help="--device cuda: prompt tokens per request (default 64)")
    e.add_argument("--ep-ranks", "--ep-emulate", dest="ep_ranks", type=int,
                   help="--device cuda: run the engine on the emulated EP rank of this size")
    e.add_argument("--ep-presets", action="store_true", help="--device cuda: decode on the EP144 rank preset "
                   "(ranks 144) and prefill on the EP32 one (ranks 32), overlapped, against bench step's step on "
                   "the same rank and schedule")
    e.add_argument("--arch", choices=["v3", "v32"], help="--device cuda: v32: DeepSeek-V3.2 against V3, each on "
                   "its EP144-rank preset (v32-ep144-rank, v3-ep144-rank) at one long --context (default 65536), "
                   "--batches (default 64,128) that fit in memory")
    e.add_argument("--small", action="store_true", help="--arch v32: the tiny and v32-tiny checkpoints through Ray "
                   "on CPU (default --context 64, --batches 2,4)")
    e.add_argument("--skew", help=f"--device cuda --ep-ranks / --ep-presets: emulated per-expert loads ({SKEWS})")
    e.add_argument("--profile", metavar="DIR", help="--device cuda: a PyTorch profiler trace of one rank's "
                   "decode steps (graph replays vs launches) to DIR instead of the benchmark")

    for name, what in [("units", "the lockstep's control cost, old central loop vs rank-driven, 1/2/4/8 ranks"),
                       ("starts", "one unit's start time against four units started at once"),
                       ("admission", "requests/s the front door admits at max_tokens=1, 1 and 2 ingress replicas"),
                       ("prefix", "TTFT at 0/50/90 percent prefix hits from the on-disk KV store; KV-load vs raw read"),
                       ("handoff", "prefill -> decode KV handoff, pair group vs object store"),
                       ("delta_path", "decode-heavy tokens/s through the front door; Ray calls per token")]:
        _leaf(bs, name, what).add_argument("--model", help="checkpoint folder (default: the benchmark's own)")

    _leaf(bs, "eplb", "EPLB runtime and balance, improved vs DeepSeek's baseline, at production shapes")
    k = _leaf(bs, "kernels", "FP8 GEMM TFLOPS / MLA decode GB/s on a CUDA GPU")
    k.add_argument("--backends", default="native,triton", help="backends side by side in one run")

    s = _leaf(bs, "step", "one EP rank's prefill or decode step on a CUDA GPU (emulated EP rank, then one layer "
              "with no exchange); --mtp: a 1 + 1 verify step; --gpus N: real EP across N GPUs of this host")
    s.add_argument("--backend", default="triton", help="kernel backend (native | triton | reference)")
    s.add_argument("--phase", choices=["prefill", "decode"], help="default decode; --mtp: decode only")
    s.add_argument("--step-tokens", type=int, help="tokens (decode: requests) per GPU")
    s.add_argument("--context", type=_ints, help="decode: mean context per request (emulated rank: one, default "
                   "5120, DeepSeek's MTP profile 4096; --arch v32: a list, default 4096,32768,65536,131072)")
    s.add_argument("--arch", choices=["v3", "v32"], help="v32: one layer's one-batch figure of DeepSeek-V3.2 "
                   "against V3 at long context (decode at 64 and 128 requests per GPU, or --step-tokens; prefill "
                   "of one 32K prompt), the indexer and sparse MLA timed as their own stages; --small on CPU; "
                   "--ep-ranks N: also each decode point on the emulated EP rank of both archs' presets")
    s.add_argument("--eager", action="store_true", help="decode without CUDA graphs; not with --gpus")
    s.add_argument("--ep-ranks", "--ep-emulate", dest="ep_ranks", type=int,
                   help="emulated EP size (default: decode 144, prefill 32)")
    s.add_argument("--skew", help=f"emulated per-expert loads ({SKEWS}; default lognormal)")
    s.add_argument("--no-ep", action="store_true", help="only the one-batch, no-exchange layer figures")
    s.add_argument("--cached", type=float, help="--phase prefill: fraction of each prompt already in the KV "
                   "cache, in [0, 1) (the seed's day: 0.563)")
    s.add_argument("--mtp", action="store_true", help="decode with the MTP layer: the emulated rank's 1 + 1 verify "
                   "step at a forced acceptance beside the plain step (--no-ep / --small: the layer-level projection)")
    s.add_argument("--acceptance", type=float, help="--mtp: the forced draft acceptance in [0, 1] (default 0.85)")
    s.add_argument("--small", action="store_true", help="--mtp / --arch v32: small shapes (runs on CPU)")
    s.add_argument("--device", choices=["cpu", "cuda"], help="--small: where it runs (default cpu)")
    s.add_argument("--kernel-table", action="store_true", help="the emulated EP rank: also where the overlapped "
                   "schedule's extra time goes, kernel by kernel against the one batch (launches and us per MoE layer)")
    s.add_argument("--gpus", type=int, help="real EP across N GPUs of this host, dispatch and combine timed")

    o = _leaf(bs, "overlap", "step time with the overlapped schedules on/off/auto, with and without injected "
              "latency; --gpus N: a unit on N GPUs; --profile DIR: Chrome traces of an overlapped step")
    o.add_argument("--model", help="checkpoint folder (default: the 512-wide bench model)")
    o.add_argument("--latency-ms", type=float, help="injected per-exchange latency (default: comparable to compute)")
    o.add_argument("--gpus", type=int, help="a unit of N ranks on N GPUs of this host (NCCL), no injected cost")
    o.add_argument("--profile", metavar="DIR", help="write PyTorch profiler traces of an overlapped prefill and "
                   "decode step of a 2-rank unit to DIR (one Chrome trace per step and rank)")

    g = _leaf(bs, "grammar", "grammar libraries: compile ms per schema, mask us per token")
    g.add_argument("--device", default="cpu", help="also time the masks' cost inside sample() on this device")

    d = _leaf(bs, "deepep", "DeepEP dispatch/combine bandwidth and latency at V3 shapes against NVLink's rate")
    d.add_argument("--gpus", type=int, default=8, help="GPUs of this host, one rank each")

    c = _leaf(bs, "chaos", "one fault at a time under 32 streams against a live server: a table + JSON")
    c.add_argument("--faults", help="comma-separated faults (default: all of them)")
    c.add_argument("--streams", type=int, default=None, help="concurrent streams during each fault (default 32; "
                   "--elastic: 16)")
    c.add_argument("--elastic", action="store_true", help="elastic units (bench/chaos_elastic.py): a decode and a "
                   "prefill rank killed; longest token gap, tokens/s shrunk and rejoined; the EP144 recovery model")
    so = _leaf(bs, "soak", "the server at its measured capacity for --duration-s: RSS, failures, 429s")
    so.add_argument("--duration-s", type=float, default=600.0, help="seconds at capacity")
    for p in (c, so):
        p.add_argument("--model", help="checkpoint folder")
        p.add_argument("--workdir", help="folder for the server's config, KV store, ledger and logs")

    v = _leaf(bs, "serve", "HTTP load generator against a running server (--url) or the embedded default")
    v.add_argument("--url", help="measure this running server instead of starting one")
    v.add_argument("--api-key", help="--url: bearer key (the model name is read from /v1/models)")
    v.add_argument("--config", help="config of the server to start (default: the embedded default); not with --url")
    v.add_argument("--model", help="checkpoint of the server to start; not with --url")
    v.add_argument("--concurrency", help="concurrency levels (default 1,4,16); not with --constrained")
    v.add_argument("--requests", type=int, help="requests per level (default 32); not with --constrained")
    v.add_argument("--rate", type=float, help="Poisson arrival rate, requests/s (default: closed loop)")
    v.add_argument("--constrained", action="store_true", help="decode TPOT of a 32-request batch with half "
                   "JSON-constrained vs none, and grammar compile time per schema")


def _ints(text: str) -> tuple[int, ...]:
    """A comma-separated list of positive integers (argparse type): "4096,32768" -> (4096, 32768)."""
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return vals


def _given(a, flag: str) -> bool:
    v = getattr(a, flag.lstrip("-").replace("-", "_"))
    return v not in (None, False)


def _refuse(a, mode: str, flags: tuple[str, ...], why: str = "") -> None:
    for flag in flags:
        if _given(a, flag):
            raise InvalidRequest(f"{flag} does not apply with {mode}{why}", flag)


def _need(a, flag: str, mode: str) -> None:
    if _given(a, flag):
        raise InvalidRequest(f"{flag} needs {mode}", flag)


def needs_cuda(a) -> bool:
    """Whether this invocation runs on a CUDA GPU of this host (multi-GPU runs count their GPUs
    themselves, in bench/ep.py, and say how many they need)."""
    if a.what == "kernels" or (a.what == "engine" and a.device == "cuda"):
        return True
    if a.what == "grammar":
        return a.device != "cpu"
    if a.what == "step":
        return not a.gpus and not (a.small and (a.device or "cpu") == "cpu")   # check(): --small needs a mode
    return False


def check(a) -> None:
    """Refuses flag combinations that one mode would silently ignore, and GPU runs without a GPU."""
    if a.what == "engine" and a.small:
        if a.arch != "v32" or a.device == "cuda":
            raise InvalidRequest("--small needs --arch v32 and runs on CPU (not --device cuda)", "--small")
        _refuse(a, "--arch v32 --small (its tiny checkpoints)", ("--model", "--ep-ranks", "--ep-presets", "--profile",
                                                                 "--skew", "--tokens", "--no-transformers", "--mtp"))
    elif a.what == "engine":
        if a.device == "cuda":
            _refuse(a, "--device cuda", ("--tokens", "--no-transformers", "--mtp"))
            if a.profile:         # profile_decode traces batch 64 of the checkpoint's own shape
                _refuse(a, "--profile", ("--batches", "--context", "--ep-ranks", "--skew", "--ep-presets"))
            if a.ep_presets:      # the presets name their checkpoints and EP sizes
                _refuse(a, "--ep-presets", ("--model", "--ep-ranks"))
            if a.arch == "v32":   # the two presets are the checkpoints
                _refuse(a, "--arch v32", ("--model", "--ep-ranks", "--ep-presets", "--profile", "--skew"))
        else:
            for f in ("--kernels", "--context", "--ep-ranks", "--skew", "--profile", "--ep-presets", "--arch"):
                _need(a, f, "--device cuda")
            if a.mtp:
                _refuse(a, "--mtp", ("--no-transformers",))
        if a.skew is not None and a.ep_ranks is None and not a.ep_presets:
            _need(a, "--skew", "--ep-ranks or --ep-presets")
    elif a.what == "step" and a.arch == "v32":
        _refuse(a, "--arch v32 (one layer's one-batch figure, V3.2 against V3)",
                ("--gpus", "--no-ep", "--cached", "--mtp", "--acceptance", "--kernel-table"))
        if a.small or a.phase == "prefill":
            _refuse(a, "--arch v32 --small / --phase prefill (the emulated EP rank: decode on the V3-width "
                    "presets)", ("--ep-ranks", "--skew"))
        if a.skew is not None and a.ep_ranks is None:
            _need(a, "--skew", "--ep-ranks")
        if a.phase == "prefill":
            _refuse(a, "--arch v32 --phase prefill (one 32K prompt)", ("--context", "--step-tokens"))
        if not a.small:
            _need(a, "--device", "--small (without --small, --arch v32 runs on cuda)")
    elif a.what == "step":
        if a.context is not None and len(a.context) > 1:
            raise InvalidRequest(f"--context takes one value without --arch v32, got {len(a.context)}", "--context")
        if a.gpus:
            _refuse(a, "--gpus (real EP)", ("--eager", "--ep-ranks", "--skew", "--no-ep", "--cached", "--mtp", "--kernel-table",
                                            "--context", "--small", "--device"))
        elif a.mtp:
            if a.phase == "prefill":
                raise InvalidRequest("--phase prefill does not apply with --mtp (drafts are decode tokens)", "--phase")
            _refuse(a, "--mtp", ("--cached",))
            if a.small or a.no_ep:
                _refuse(a, "--small / --no-ep (the layer-level projection)", ("--ep-ranks", "--skew", "--context",
                                                                              "--kernel-table"))
            if not a.small:
                _need(a, "--device", "--mtp --small (without --small, --mtp runs on cuda)")
            if a.acceptance is not None and not 0 <= a.acceptance <= 1:
                raise InvalidRequest(f"--acceptance must be in [0, 1], got {a.acceptance}", "--acceptance")
        else:
            _need(a, "--small", "--mtp or --arch v32")
            _need(a, "--acceptance", "--mtp")
            _need(a, "--device", "--mtp --small")
            if a.no_ep:
                _refuse(a, "--no-ep", ("--ep-ranks", "--skew", "--context", "--kernel-table"))
            if a.context is not None and a.phase == "prefill":
                raise InvalidRequest("--context is a decode request's context (prefill: 4K prompts)", "--context")
            if a.cached is not None and a.phase != "prefill":
                raise InvalidRequest(f"--cached needs --phase prefill (got --phase {a.phase or 'decode'})",
                                     "--cached")
            if a.cached is not None and not 0 <= a.cached < 1:
                raise InvalidRequest(f"--cached must be in [0, 1), got {a.cached}", "--cached")
    elif a.what == "overlap":
        if a.gpus:
            _refuse(a, "--gpus", ("--latency-ms", "--profile"))
    elif a.what == "serve":
        if a.url:
            _refuse(a, "--url (they configure the server bench serve starts)", ("--config", "--model"))
        else:
            _need(a, "--api-key", "--url")
        if a.constrained:
            _refuse(a, "--constrained (it runs its own 32-request batch)", ("--concurrency", "--requests", "--rate"))
    if needs_cuda(a):
        import torch
        if not torch.cuda.is_available():
            raise Unavailable("needs a CUDA GPU; this machine has none")
