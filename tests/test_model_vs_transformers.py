"""The engine's math against transformers' DeepseekV3ForCausalLM: same weights, same tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hf_greedy, hf_model, prompts_of
from epserve.kernels.reference import dequant_block
from epserve.model.sampling import SamplingParams
from epserve.pipelines.local import make_local_engine
from epserve.pipelines.sequence import Sequence


def run_engine(engine, prompts, n, logits_hook=None):
    seqs = [Sequence(f"r{i}", p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            for i, p in enumerate(prompts)]
    for s in seqs:
        engine.add(s)
    while engine.has_work:
        engine.step()
    return [s.output_ids for s in seqs]


@pytest.mark.parametrize("which", ["tiny_dir", "tiny_b_dir"])
def test_greedy_tokens_and_logits_match_transformers(which, request):
    model_dir = request.getfixturevalue(which)
    hf = hf_model(model_dir)
    prompts = prompts_of([5, 17, 64, 90], vocab=hf.config.vocab_size)
    engine = make_local_engine(model_dir)
    for p in prompts:  # logits of every prompt position, prefill in the naive form
        seq_logits = engine_prompt_logits(engine, p)
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (seq_logits - ref).abs().max().item() < 1e-4
    got = run_engine(engine, prompts, 8)       # batched together, absorbed decode
    for p, g in zip(prompts, got):
        want, _ = hf_greedy(hf, p, 8)
        assert g == want


def engine_prompt_logits(engine, prompt):
    from epserve.model.deepseek_v3 import Batch
    cache = engine.cache
    pages = cache.allocate(cache.pages_for(len(prompt)))
    try:
        batch = Batch(torch.tensor(prompt), torch.arange(len(prompt)), [len(prompt)], [0],
                      torch.tensor([pages]), torch.tensor(cache.slots(pages, 0, len(prompt))))
        return engine.model.forward(batch, cache.kv, all_logits=True)
    finally:
        cache.free(pages)


def _dequantized_copy(fp8_dir: str, out: Path) -> str:
    out.mkdir()
    sd = load_file(str(Path(fp8_dir) / "model.safetensors"))
    dense = {}
    for name, t in sd.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = sd.get(name[: -len("weight")] + "weight_scale_inv")
        dense[name] = dequant_block(t, scale) if scale is not None else t
    save_file(dense, str(out / "model.safetensors"))
    cfg = json.loads((Path(fp8_dir) / "config.json").read_text())
    cfg.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_fp8_checkpoint_agrees_with_transformers_on_dequantized_weights(tiny_fp8_dir, tmp_path):
    hf = hf_model(_dequantized_copy(tiny_fp8_dir, tmp_path / "deq"))
    prompts = prompts_of([7, 33], seed=3)
    engine = make_local_engine(tiny_fp8_dir)          # FP8 weights kept, dequantised on use
    assert engine.model.layers[0].attn.wkv_a.is_fp8
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (engine_prompt_logits(engine, p) - ref).abs().max().item() < 1e-4
    for p, g in zip(prompts, run_engine(engine, prompts, 6)):
        assert g == hf_greedy(hf, p, 6)[0]
    # the seed's full recipe (1x128 FP8 activations too) stays close to the dequantised reference
    engine_q = make_local_engine(tiny_fp8_dir, fp8_activations=True)
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        got = engine_prompt_logits(engine_q, p)
        diff = 1 - 2 * (got.double() * ref.double()).sum() / (got.double() ** 2 + ref.double() ** 2).sum()
        assert diff < 0.05, diff   # calc_diff; e4m3 through ~30 chained GEMMs of a random model


def test_transformers_style_config_with_rope_parameters_loads_the_same_model(tiny_dir, tmp_path):
    """A checkpoint saved by transformers (rope_parameters instead of rope_scaling) gives the same logits."""
    hf = hf_model(tiny_dir)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in cfg and "rope_scaling" not in cfg
    p = prompts_of([40], seed=9)[0]
    a = engine_prompt_logits(make_local_engine(tiny_dir), p)
    b = engine_prompt_logits(make_local_engine(str(tmp_path / "hf")), p)
    assert (a - b).abs().max() < 1e-5
