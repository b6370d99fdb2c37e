"""The step of one EP rank as the engine runs it, on the emulated EP rank (model/ep_emulate.py):
the headline block of `bench step`.

Owns: a V3-width checkpoint of one rank's experts (model/tiny.py presets: decode `v3-ep144-rank`,
2 routed slots; prefill `v3-ep32-rank`, 9 slots; 4 layers: 1 dense + 3 MoE; V3.2's `v32-*` twins with
arch="v32"; or --model DIR) loaded by
a RankEngine whose dispatcher is `ep_dispatch: emulated`, so every MoE layer receives the EP rank's
rows (own + peers', skewed loads after EPLB, the busiest rank) and each dispatch and combine holds
for DeepEP's published time at that EP size. Timed per step (CUDA events, median), LM head and
greedy argmax included:
  overlapped        the production schedule (pipelines/overlap.py: two micro-batches, the phase's
                    figure), exchanges held; and the same with the holds at 0 (the work alone).
                    exposed = held step - unheld step; hidden = exchange time queued - exposed.
  sbo               SGLang's single-batch overlap (pipelines/overlap.py "sbo"): the batch whole, the
                    dispatch under the shared expert, each slot chunk's combine under the next
                    chunk's GEMMs (decode); at 61 layers the faster of it and two micro-batches is named.
  one_batch         the plain forward, exchanges held (decode: the CUDA-graph replay the engine
                    runs; every exchange exposed) and at 0.
Per layer figures (us) divide by the MoE layers. On CPU nothing is held (timings are noise there).
--mtp (decode): also the MTP k = 1 verify step, one batch and overlapped, at a forced acceptance
(bench/step_mtp_ep.py); tokens per step B x (1 + acceptance). --cached F (prefill): prompts whose
leading F (whole blocks) is a KV-store hit, as many as make the step's computed tokens; the store's
load of those blocks is timed on this host's disk (bench/kv_load.py) and counted as the engine
overlaps it: input tok/s = input tokens / (compute + exposed load).
Decode's overlapped step is one CUDA graph of both micro-batches (their embedding, RoPE and index
tensors prepared before it, untimed); the engine's own split steps still run eagerly.
`run()` returns a JSON-able dict. Not a test.
"""
from __future__ import annotations

import math

import torch

from epserve.bench.kernels import graphed, kernel_diff, kernel_profile, time_ms
from epserve.model.ep_emulate import KEYS
from epserve.placement.loads import KINDS
from epserve.model.deepseek_v3 import DecodeBatch
from epserve.model.sampling import SamplingParams
from epserve.config import cache_root
from epserve.model.tiny import make_tiny_model
from epserve.pipelines.batcher import Step
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.overlap import prepare_overlapped, run_overlapped
from epserve.pipelines.sequence import Sequence
from epserve.bench.kv_load import V3_KV_LAYERS, input_rate, time_prefix_loads
from epserve.bench.step_mtp_ep import check_acceptance, verify_steps

PRESET = {"decode": "v3-ep144-rank", "prefill": "v3-ep32-rank"}
PRESETS = {"v3": PRESET, "v32": {"decode": "v32-ep144-rank", "prefill": "v32-ep32-rank"}}   # by --arch
BLOCKS = ("overlapped", "sbo", "one_batch", "overlapped_mtp", "one_batch_mtp")
DEFAULT = {"decode": dict(ranks=144, tokens=128, ctx=5120), "prefill": dict(ranks=32, tokens=16384, prompt=4096)}


def preset_dir(preset: str, device: str, layers: int | None = None, mtp: bool = False) -> str:
    """The preset's random checkpoint in the user cache (made once; seconds on a GPU); layers: at
    that depth (the preset's dense layers, the rest MoE) instead of the preset's 4; mtp: with its
    MTP layer (num_nextn_predict_layers 1)."""
    out = cache_root() / (f"bench-{preset}" + (f"-{layers}l" if layers else "") + ("-mtp" if mtp else ""))
    over = {**({"num_hidden_layers": layers} if layers else {}), **({"num_nextn_predict_layers": 1} if mtp else {})}
    if not (out / "config.json").exists():
        make_tiny_model(out, preset=preset, device=device, config_overrides=over or None)
    return str(out)


def at_61_layers(shallow: dict, deep: dict, n_layers: int = 61) -> dict:
    """Two runs of the same schedule on checkpoints that differ only in their number of MoE layers
    -> per MoE layer ms (the difference over the extra layers: fixed per-step costs such as the LM
    head, sampling and the graph launch cancel) and the step at V3's 61 layers: the deep step plus
    its missing layers, each counted as a MoE layer (V3's two further dense layers cost less than
    that: an upper bound on the step)."""
    extra = deep["shape"]["moe_layers"] - shallow["shape"]["moe_layers"]
    assert extra > 0, "the deep run needs more MoE layers than the shallow one"
    missing = n_layers - deep["shape"]["layers"]
    out = {}
    for name in (n for n in BLOCKS if n in shallow):
        row = {}
        for held in ("held", "no_exchange_time"):
            per_layer = (deep[name][held]["step_ms"] - shallow[name][held]["step_ms"]) / extra
            step = deep[name][held]["step_ms"] + missing * per_layer
            row[held] = {"moe_layer_ms": round(per_layer, 4), "step_ms": round(step, 3),
                         "tokens_per_s_per_gpu": round(deep["tokens_per_step_of"][name] / step * 1e3, 1)}
        row["exposed_exchange_share"] = round(1 - row["no_exchange_time"]["step_ms"] / row["held"]["step_ms"], 4)
        out[name] = row
    split = out["overlapped"]["no_exchange_time"]["moe_layer_ms"] / out["one_batch"]["no_exchange_time"]["moe_layer_ms"]
    if "sbo" in out:           # keep the faster of the two overlap schedules for this phase and batch
        two, one = out["overlapped"]["held"]["step_ms"], out["sbo"]["held"]["step_ms"]
        out["faster_overlap_schedule"] = "sbo" if one < two else "two_micro_batches"
        out["sbo_over_two_micro_batches_step"] = round(one / two, 4)
    cp = deep.get("cached_prefix")
    if cp:                     # the same load against the 61-layer step's compute
        out["cached_prefix"] = {k: input_rate(cp["input_tokens_per_step"], out[k]["held"]["step_ms"],
                                              cp["kv_store_load"]) for k in ("overlapped", "sbo", "one_batch")
                                if k in out}
    if "overlapped_mtp" in out:
        out["mtp_speedup_overlapped"] = round(out["overlapped_mtp"]["held"]["tokens_per_s_per_gpu"]
                                              / out["overlapped"]["held"]["tokens_per_s_per_gpu"], 4)
    return {"layers": n_layers, "from_depths": [shallow["shape"]["layers"], deep["shape"]["layers"]], **out,
            "two_micro_batch_compute_tax": round(split - 1, 4),
            "note": "per MoE layer = (deep - shallow step) / extra MoE layers; 61-layer step = deep step + "
                    f"{missing} more layers at that cost (the 2 further dense layers counted as MoE: an upper bound)"}


def _seqs(engine, phase: str, p: dict, g: torch.Generator) -> tuple[list[Sequence], Step]:
    """The step's sequences with pages allocated: decode B requests at context ~ctx (0.8-1.2x),
    one new token each; prefill prompts of p["prompt"] tokens whose first p["cached"] tokens are in
    the pages (a KV-store hit), as many as make p["tokens"] computed tokens (at least one). KV content
    is whatever the pages hold: attention costs the same."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    vocab = engine.args.vocab_size
    if phase == "decode":
        lens = ((torch.rand(p["tokens"], generator=g) * 0.4 + 0.8) * p["ctx"]).long().tolist()
        n_new = [1] * len(lens)
    else:
        lens = [p["prompt"]] * max(1, p["tokens"] // (p["prompt"] - p["cached"]))
        n_new = [n - p["cached"] for n in lens]
    seqs = []
    for i, n in enumerate(lens):
        total = n + 2 if phase == "decode" else n     # decode: the last token and (MTP) one draft
        s = Sequence(f"b{i}", torch.randint(4, vocab, (total,), generator=g).tolist(), params)
        s.pages = engine.cache.allocate(engine.cache.pages_for(total + 1))
        s.n_computed = n if phase == "decode" else p["cached"]
        seqs.append(s)
    return seqs, Step(seqs, n_new, phase == "prefill")


def run(phase: str = "decode", device: str = "cuda", backend: str = "native", tokens: int | None = None,
        ranks: int | None = None, skew: str = "lognormal", seed: int = 0, model: str | None = None,
        graphs: bool = True, reps: int | None = None, ctx: int | None = None, layers: int | None = None,
        mtp: bool = False, acceptance: float = 0.85, cached: float = 0.0, prompt: int | None = None,
        kv_root: str | None = None, store_layers: int | None = None, arch: str = "v3", kernel_table: bool = False,
        **ep_emulate) -> dict:
    """The headline block for `phase` (see the module docstring); mtp (decode): also the MTP k = 1
    verify step at a forced `acceptance` (bench/step_mtp_ep.py); cached (prefill): that fraction of
    each prompt (whole 64-token blocks) is a KV-store hit whose load is timed on this host's disk
    (bench/kv_load.py: blocks of store_layers layers, default V3's 61 for the presets, under kv_root)
    and counted as the engine overlaps it; ep_emulate: other `ep_emulate` keys (experts, groups,
    top_k) for checkpoints other than the presets. arch: whose presets (v3, or v32: DeepSeek-V3.2's
    sparse attention at the same widths), when no model is given. kernel_table: also where the
    overlapped schedule's extra time goes, kernel by kernel against the one batch (both with no
    exchange time, as they are timed: graph replays on CUDA), per MoE layer."""
    if phase not in DEFAULT:
        raise ValueError(f"phase must be one of {', '.join(DEFAULT)}, got {phase!r}")
    if mtp and phase != "decode":
        raise ValueError(f"mtp: a decode step's drafts; got phase {phase!r}")
    check_acceptance(acceptance)
    if skew not in KINDS:                  # before minutes of checkpoint making and loading
        raise ValueError(f"--skew: {skew!r} is not one of {', '.join(KINDS)}")
    if cached and (phase != "prefill" or not 0 <= cached < 1):
        raise ValueError(f"cached: a prefill prefix-hit fraction in [0, 1), got {cached!r} for {phase}")
    p = {**DEFAULT[phase], **{k: v for k, v in (("tokens", tokens), ("ranks", ranks), ("ctx", ctx),
                                                ("prompt", prompt)) if v}}
    p["cached"] = int(p.get("prompt", 0) * cached) // 64 * 64      # whole blocks of the store
    # decode's presets always carry the MTP layer (served only with mtp), so the runs with and without
    # MTP share one checkpoint per depth: a fresh GPU host's disk holds every preset a session makes
    if arch not in PRESETS:
        raise ValueError(f"arch must be one of {', '.join(PRESETS)}, got {arch!r}")
    model_dir = model or preset_dir(PRESETS[arch][phase], device, layers, phase == "decode")
    emu = {**KEYS, **ep_emulate, "ranks": p["ranks"], "skew": skew, "seed": seed}
    if phase == "decode":
        pages = p["tokens"] * (math.ceil(p["ctx"] * 1.2 / 64) + 2) + 64
    else:
        n_seq = max(1, p["tokens"] // (p["prompt"] - p["cached"]))
        pages = n_seq * (math.ceil(p["prompt"] / 64) + 1) + 64
    cuda = device.startswith("cuda")
    eng = make_local_engine(model_dir, kernels=backend, device=device, dtype="bfloat16" if cuda else "float32",
                            fp8_activations=cuda, ep_dispatch="emulated", ep_emulate=emu, kv_pages=pages,
                            max_batch_size=max(p["tokens"], 1) if phase == "decode" else 128,
                            max_batch_tokens=max(p["tokens"], 16384), cuda_graphs=graphs, mtp_draft=int(mtp))
    d, a = eng.dispatcher, eng.args
    g = torch.Generator().manual_seed(seed)
    seqs, step = _seqs(eng, phase, p, g)
    batch = eng.prepare(step)
    n_moe = a.n_moe_layers
    reps = reps or (20 if phase == "decode" else 5)

    cuda_graph_overlap = cuda and graphs and phase == "decode"

    # decode: the step as the DecodeBatch the engine's decode graphs replay; the overlapped schedules
    # split its rows (pipelines/overlap.py split_decode), so each micro-batch keeps the fixed-shape
    # decode path. The micro-batches are prepared once on the host, then both run as one CUDA graph
    # (masked-layout MoE, no host sync), as the one-batch decode is; prefill runs eagerly (its
    # launches are small next to its work)
    src = batch
    if phase == "decode":
        t = torch.tensor([[s.last_token for s in seqs], [s.n_computed for s in seqs], eng.table.rows_for(seqs)],
                         dtype=torch.long).to(eng.device)
        src = DecodeBatch.from_rows(t[0], t[1], t[2], eng.table.tables, eng.cache.page_size, eng.table.scratch_row,
                                    eng.kb.plan_mla_decode())
    n_out = src.n_tokens if phase == "decode" else len(batch.seq_new)
    mbs, rows = prepare_overlapped(eng.model, src, static=cuda_graph_overlap)

    def overlapped():
        return run_overlapped(eng.model, mbs, rows, eng.cache.kv, n_out, phase).argmax(-1)

    plain = src      # the one batch, when the engine has no decode graphs to replay it

    def one_batch():
        if phase == "decode" and eng.graphs is not None:
            return eng.decode(step).argmax(-1)
        return eng.model.forward(plain, eng.cache.kv).argmax(-1)

    # SGLang's single-batch overlap: the batch whole, the dispatch under the shared expert, each
    # chunk's combine under the next chunk's expert GEMMs (pipelines/overlap.py "sbo")
    sbo_mbs, sbo_rows = prepare_overlapped(eng.model, src, static=cuda_graph_overlap, schedule="sbo")

    def sbo():
        return run_overlapped(eng.model, sbo_mbs, sbo_rows, eng.cache.kv, n_out, "sbo").argmax(-1)

    fns = {"overlapped": overlapped, "sbo": sbo, "one_batch": one_batch}
    layers_of = dict.fromkeys(fns, n_moe)
    tokens_of = dict.fromkeys(fns, batch.n_tokens)
    mtp_info = None
    if mtp:     # the engine serves the MTP layer, so it has no plain decode graphs: one_batch is graphed here
        verify, mtp_info = verify_steps(eng, seqs, acceptance, seed, cuda_graph_overlap)
        fns.update(verify)
        layers_of.update({k: n_moe + 1 for k in verify})
        tokens_of.update({k: mtp_info["output_tokens_per_step"] for k in verify})
    bench_graphed = set(fns) - ({"one_batch"} if eng.graphs is not None else set())   # else the engine's graphs

    def eager_hold_us(fn, n_layers: int) -> dict:
        """us of exchange holds one call queues per MoE layer (an eager call: a graph replay runs no host code)."""
        d.take_held_us()
        fn()
        disp, comb = d.take_held_us()
        return {"dispatch": round(disp / n_layers, 3), "combine": round(comb / n_layers, 3)}

    out, capture_failed = {}, {}
    with torch.inference_mode():
        for name, fn in fns.items():
            row = {}
            for held in (True, False):
                d.hold_scale = 1.0 if held else 0.0
                if eng.graphs is not None:
                    eng.graphs.clear()              # a captured graph keeps the hold it was captured with
                timed = fn
                if name in bench_graphed and cuda_graph_overlap:
                    try:
                        timed = graphed(fn)
                    except RuntimeError as exc:     # reported, and timed eagerly instead
                        capture_failed[name] = f"{type(exc).__name__}: {exc}"[:300]
                        torch.cuda.synchronize()
                ms = time_ms(timed, warmup=3, reps=reps)
                row["held" if held else "no_exchange_time"] = {"step_ms": round(ms, 3)}
                if held:
                    row["exchange_us_per_layer"] = eager_hold_us(
                        (lambda: eng.model.forward(plain, eng.cache.kv)) if name == "one_batch" else fn,
                        layers_of[name])
            exposed = (row["held"]["step_ms"] - row["no_exchange_time"]["step_ms"]) / layers_of[name] * 1e3
            queued = sum(row["exchange_us_per_layer"].values())
            row["per_moe_layer_us"] = {"exchange": round(queued, 3), "exposed": round(exposed, 3),
                                       "hidden": round(queued - exposed, 3)}
            out[name] = row
    table = None
    if kernel_table:           # the same calls as timed above, the exchange holds at 0
        d.hold_scale = 0.0
        if eng.graphs is not None:
            eng.graphs.clear()
        with torch.inference_mode():
            prof = {}
            for name in ("overlapped", "one_batch"):
                fn = fns[name]
                if name in bench_graphed and cuda_graph_overlap and name not in capture_failed:
                    fn = graphed(fn)
                prof[name] = kernel_profile(fn)
        table = {"a": "overlapped", "b": "one_batch", "exchange": "not held (0)",
                 **kernel_diff(prof["overlapped"], prof["one_batch"], n_moe)}
    prefix = None
    if p["cached"]:            # the store's load of the step's cached blocks, on this host's disk
        n_layers = store_layers or (V3_KV_LAYERS if model is None else a.n_kv_layers)
        load = time_prefix_loads(len(seqs), p["cached"] // 64, n_layers, a.kv_dim, eng.dtype, eng.device,
                                 root=kv_root)
        n_input = len(seqs) * p["prompt"]
        prefix = {"cached_fraction_asked": cached, "cached_fraction": round(p["cached"] / p["prompt"], 4),
                  "cached_tokens_per_prompt": p["cached"],
                  "prompt_tokens": p["prompt"], "prompts": len(seqs), "input_tokens_per_step": n_input, "computed_tokens_per_step": batch.n_tokens,
                  "kv_store_load": load, **{k: input_rate(n_input, out[k]["held"]["step_ms"], load) for k in out}}
    layer = a.n_dense_layers
    rows = d.rows_for(layer, batch.n_tokens)
    half = d.rows_for(layer, batch.n_tokens // 2)
    return {
        "headline": "overlapped", "phase": phase, "model": model_dir,
        "shape": {"layers": a.n_layers, "moe_layers": n_moe, "dim": a.dim, "slots": d.map.slots_per_rank,
                  "top_k_model": a.n_activated_experts},
        "ep_emulate": {**emu, "busiest_rank_over_mean": round(float(d.share.imbalance.mean()), 4),
                       "received_rows_one_batch_first_moe_layer": rows, "received_rows_per_micro_batch": half,
                       "exchange_model": "bytes / DeepEP's published bandwidth at this EP size (model/ep_emulate.py)"},
        "exchange_held_on": "a side CUDA stream (torch.cuda._sleep)" if cuda else "nothing (CPU: no-op)",
        "tokens_per_step": batch.n_tokens, "tokens_per_step_of": tokens_of, "mtp": mtp_info,
        "cuda_graphs_one_batch": phase == "decode" and (eng.graphs is not None or cuda_graph_overlap),
        "cuda_graphs_overlapped": cuda_graph_overlap and "overlapped" not in capture_failed,
        "capture_failed": capture_failed or None,
        **out,
        "tokens_per_s": {k: round(tokens_of[k] / out[k]["held"]["step_ms"] * 1e3, 1) for k in out},
        "cached_prefix": prefix,
        **({"kernel_table": table} if kernel_table else {}),
    }
