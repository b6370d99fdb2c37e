"""`epserve bench grammar`: the grammar libraries side by side on this CPU: compile time per JSON
schema and the cost of one next-token mask, on the tiny model's tokenizer and on a 32k-token
byte-level BPE trained here on the Python standard library's sources (no hub download; V3's 129k
vocabulary is not on this machine, and mask cost grows with the vocabulary).

Each library walks the same grammar: from the start state, repeatedly compute the mask, take the
first allowed non-EOS token of a seeded random permutation, advance. Reported: compile ms (a fresh
compile, no cache) and the median / p99 microseconds of one mask. Libraries that do not import are
listed as missing. This is how epserve chose its engine (model/grammar.py); it is not a test.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city"]}}, "required": ["name", "age"]}


def stdlib_tokenizer(vocab_size: int, out: Path) -> Path:
    """A byte-level BPE of `vocab_size` trained on this Python's standard library sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    files = sorted(Path(sys.prefix if not hasattr(sys, "base_prefix") else sys.base_prefix).glob(
        f"lib/python{sys.version_info.major}.{sys.version_info.minor}/*.py"))[:400]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer=trainer)
    path = out / f"bpe{vocab_size}.json"
    tok.save(str(path))
    return path


def _walk(mask_fn, advance_fn, n_vocab: int, eos: int, steps: int) -> list[float]:
    """Per-step mask seconds along a seeded walk; mask_fn() -> bool [n_vocab] allowed."""
    order = torch.randperm(n_vocab, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        allowed = mask_fn()
        times.append(time.perf_counter() - t)
        ok = allowed[order] & (order != eos)
        if not ok.any():
            break
        advance_fn(int(order[ok.nonzero()[0, 0]]))
    return times


def _llguidance(tok_json: str, eos: int, n_vocab: int, steps: int) -> dict:
    import llguidance
    import llguidance.torch as lt
    tok = llguidance.LLTokenizer(tok_json, n_vocab=n_vocab, eos_token=eos)
    t = time.perf_counter()
    m = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - t
    bm = lt.allocate_token_bitmask(1, n_vocab)
    bits = 1 << torch.arange(32, dtype=torch.int32)

    def mask():
        lt.fill_next_token_bitmask(m, bm, 0)
        return ((bm[0, :, None] & bits) != 0).flatten()[:n_vocab]
    return {"compile_ms": compile_s * 1e3, "times": _walk(mask, m.consume_token, n_vocab, eos, steps)}


def _xgrammar(tok_path: str, eos: int, n_vocab: int, steps: int) -> dict:
    import transformers
    import xgrammar as xgr
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=tok_path)
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=n_vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - t
    m = xgr.GrammarMatcher(compiled)
    bm = xgr.allocate_token_bitmask(1, n_vocab)
    bits = 1 << torch.arange(32, dtype=torch.int32)

    def mask():
        m.fill_next_token_bitmask(bm)
        return ((bm[0, :, None] & bits) != 0).flatten()[:n_vocab]
    return {"compile_ms": compile_s * 1e3, "times": _walk(mask, m.accept_token, n_vocab, eos, steps)}


def _outlines_core(tok_path: str, eos: int, n_vocab: int, steps: int) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(tok_path)
    vocab: dict[str, list[int]] = {}
    for i in range(tk.get_vocab_size()):
        if i != eos:
            vocab.setdefault(tk.decode([i]), []).append(i)
    t = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(eos, vocab))
    compile_s = time.perf_counter() - t
    g = Guide(index)

    def mask():
        allowed = torch.zeros(n_vocab, dtype=torch.bool)
        allowed[torch.tensor(g.get_tokens(), dtype=torch.long)] = True
        return allowed
    return {"compile_ms": compile_s * 1e3, "times": _walk(mask, g.advance, n_vocab, eos, steps)}


def _tokenizers(tmp: Path) -> list[tuple[str, str, int, int]]:
    from epserve.model.tiny import make_tiny_model
    tiny = make_tiny_model(tmp / "tiny")
    big = stdlib_tokenizer(32000, tmp)
    from tokenizers import Tokenizer
    return [("tiny-512", str(tiny / "tokenizer.json"), 1, Tokenizer.from_file(str(tiny / "tokenizer.json"))
             .get_vocab_size()),
            ("bpe-32k", str(big), 0, Tokenizer.from_file(str(big)).get_vocab_size())]


def device_mask_cost(device: str, batch: int = 32, constrained: int = 16, vocab: int = 129280,
                     reps: int = 50) -> dict:
    """What a grammar mask adds to one decode step's sampling on `device`, with the engine's own pieces
    (SamplerState's bitmask rows, LogitAdjust, sample()): `constrained` of `batch` greedy rows carry
    an llguidance JSON-schema mask over a 32k stdlib BPE, padded to V3's vocabulary width (129,280;
    ids past the BPE are never allowed). Timed apart: the masks' fill on this host's CPU (the
    background job a step hides under its forward), the mask rows' host-to-device copy, and
    sample() with and without the masks (the step's critical path)."""
    import llguidance
    import llguidance.torch as lt

    from epserve.model.logit_adjust import LogitAdjust
    from epserve.model.sampling import SamplingParams, sample
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory() as d:
        path = stdlib_tokenizer(32000, Path(d))
        tok = llguidance.LLTokenizer(Path(path).read_text(), n_vocab=vocab, eos_token=0)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA))
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(constrained)]
    bits = lt.allocate_token_bitmask(constrained, vocab)
    t = time.perf_counter()
    for _ in range(reps):
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bits, i)
    fill_ms = (time.perf_counter() - t) / reps * 1e3
    logits = torch.randn(batch, vocab, device=dev)
    params = [SamplingParams(max_tokens=16, temperature=0.0)] * batch
    done = [0] * batch
    rows = torch.arange(constrained, device=dev) * (batch // constrained)

    def adjust():
        a = LogitAdjust()
        a.mask_rows, a.mask_bits = rows, bits.to(dev, non_blocking=True)
        return a

    def timed(fn) -> float:
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t) / reps * 1e3
    copy_ms = timed(lambda: bits.to(dev, non_blocking=True))
    plain = timed(lambda: sample(logits, params, done))
    masked = timed(lambda: sample(logits, params, done, adjust()))
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "batch": batch,
            "constrained_rows": constrained, "vocab_width": vocab, "grammar_vocab": 32000,
            "mask_fill_cpu_ms_all_rows": round(fill_ms, 3), "mask_copy_h2d_ms": round(copy_ms, 4),
            "sample_ms_unconstrained": round(plain, 4), "sample_ms_with_masks": round(masked, 4),
            "mask_cost_on_step_ms": round(masked - plain, 4),
            "note": "fill runs on a background thread under the next forward; only sample_ms_with_masks - "
                    "sample_ms_unconstrained sits on the step's path"}


def run(steps: int = 60, device: str = "cpu") -> list[dict] | dict:
    if device != "cpu":
        return {"libraries": run(steps), "device_mask": device_mask_cost(device)}
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name, path, eos, n_vocab in _tokenizers(Path(d)):
            tok_json = Path(path).read_text()
            for lib, fn, arg in (("llguidance", _llguidance, tok_json), ("xgrammar", _xgrammar, path),
                                 ("outlines-core", _outlines_core, path)):
                try:
                    out = fn(arg, eos, n_vocab, steps)
                except ImportError as exc:
                    rows.append({"tokenizer": name, "library": lib, "missing": str(exc)})
                    continue
                ts = sorted(out["times"])
                rows.append({"tokenizer": name, "vocab": n_vocab, "library": lib,
                             "compile_ms": round(out["compile_ms"], 2), "mask_steps": len(ts),
                             "mask_us_p50": round(statistics.median(ts) * 1e6, 1),
                             "mask_us_p99": round(ts[min(len(ts) - 1, int(len(ts) * 0.99))] * 1e6, 1)})
    return rows
