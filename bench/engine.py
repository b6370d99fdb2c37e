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
