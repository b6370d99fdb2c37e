"""DeepSeek-V3.2's sparse attention (model/dsa.py) against transformers' DeepseekV32ForCausalLM:
same random weights, same greedy tokens, on shapes where index_topk is smaller than the context."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import prompts_of
from epserve.errors import ConfigError
from epserve.kernels import reference
from epserve.kernels.reference_dsa import dsa_index_select as select
from epserve.kernels.reference_dsa import sparse_mla
from epserve.model.deepseek_v3 import ModelArgs
from epserve.kernels.reference_dsa import hadamard
from epserve.model.tiny import PRESETS, TINY_CONFIG, make_tiny_model
from epserve.pipelines.local import make_local_engine
from test_model_vs_transformers import _dequantized_copy, engine_prompt_logits, run_engine

# Shape 2: other widths (index_head_dim 64 > qk_rope_head_dim), plain RoPE, one expert group, 4 layers.
SHAPE_2 = {"n_group": 1, "topk_group": 1, "rope_scaling": None, "num_experts_per_tok": 2, "n_routed_experts": 8,
           "first_k_dense_replace": 2, "num_hidden_layers": 4, "hidden_size": 96, "num_attention_heads": 3,
           "num_key_value_heads": 3, "q_lora_rank": 40, "index_n_heads": 12, "index_head_dim": 64, "index_topk": 8}
LENGTHS = [5, 23, 40, 70]     # all but the first longer than either shape's index_topk (16, 8)


@pytest.fixture(scope="module")
def v32_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v32")
    return {"tiny": str(make_tiny_model(root / "tiny", preset="v32-tiny", seed=5)),
            "shape2": str(make_tiny_model(root / "shape2", preset="v32-tiny", seed=6, config_overrides=SHAPE_2))}


def hf_v32(model_dir):
    from transformers import DeepseekV32ForCausalLM
    return DeepseekV32ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def hf_greedy(hf, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def with_config(model_dir: str, out: Path, **changes) -> str:
    """A copy of the checkpoint whose config.json has `changes`."""
    shutil.copytree(model_dir, out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, **changes}))
    return str(out)


@pytest.mark.parametrize("shape", ["tiny", "shape2"])
def test_greedy_tokens_and_logits_match_transformers_and_the_selection_prunes(shape, v32_dirs, tmp_path):
    model_dir = v32_dirs[shape]
    args = make_local_engine(model_dir).args
    assert args.is_dsa and args.index_topk < max(LENGTHS)
    hf = hf_v32(model_dir)
    engine = make_local_engine(model_dir)
    dense = make_local_engine(with_config(model_dir, tmp_path / "dense", index_topk=4096))
    prompts = prompts_of(LENGTHS, seed=1)
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        got = engine_prompt_logits(engine, p)
        assert (got - ref).abs().max().item() < 1e-4
        # the pruning changes the answer once the context outgrows index_topk (and only then)
        gap = (engine_prompt_logits(dense, p) - got).abs().amax(-1)
        assert gap[: args.index_topk].max() < 1e-4
        if len(p) > args.index_topk + 2:
            assert gap[args.index_topk + 2:].max() > 1e-3
    got = run_engine(engine, prompts, 8)         # batched: prefill, then fixed-shape decode steps
    for p, g in zip(prompts, got):
        assert g == hf_greedy(hf, p, 8)


def test_select_keeps_index_topk_of_the_visible_positions_by_relu_weighted_score():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(3, 4, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    w = torch.randn(3, 4, generator=g)
    idx, ok = select(q, w, keys, torch.tensor([2, 6, 10]), topk=5)
    assert ok.sum(1).tolist() == [2, 5, 5]                 # row 0 sees 2 positions: both, and no more
    for t, n in enumerate([2, 6, 10]):
        score = (w[t, :, None] * (q[t] @ keys[t, :n].T * 8 ** -0.5).relu()).sum(0)
        assert set(idx[t][ok[t]].tolist()) == set(score.topk(min(5, n)).indices.tolist())
    shared, _ = select(q[:1], w[:1], keys[:1], torch.tensor([10]), topk=5)      # [1, N, Di]: one sequence's keys
    assert torch.equal(shared, select(q[:1], w[:1], keys[:1].expand(1, -1, -1), torch.tensor([10]), 5)[0])
    h = hadamard(32, "cpu")
    assert torch.allclose(h @ h.T, torch.eye(32), atol=1e-6)


def test_sparse_mla_over_every_visible_row_is_dense_mla_decode():
    """With all of a sequence's rows chosen (in any order), sparse MLA is the paged decode it replaces."""
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(6, 4, 24, generator=g)                     # 6 pages of 4 rows, 24 = 20 latent + 4 extra
    table, lens = torch.tensor([[3, 0, 5], [1, 4, 2]]), torch.tensor([9, 5])
    q = torch.randn(2, 3, 20, generator=g)
    want, _ = reference.mla_decode(q, cache[..., :20], table, lens, 0.3, 16)
    rows = (table[:, :, None] * 4 + torch.arange(4)).flatten(1)    # [B, 12] cache row of each position
    slots = torch.where(torch.arange(12)[None] < lens[:, None], rows, -1).flip(1)
    assert torch.allclose(sparse_mla(q, cache.view(-1, 24), slots, 0.3, 16), want, atol=1e-5)


def test_paged_select_chooses_the_top_scored_visible_rows_through_a_scattered_block_table():
    """Decode's paged form: each query's chosen cache rows are the rows of its top-k visible positions
    by I[t, s], read through its row's block table (pages out of order), -1 past what is visible."""
    from epserve.kernels.reference_dsa import dsa_paged_select
    g = torch.Generator().manual_seed(5)
    cache = torch.randn(7, 4, 28, generator=g)                  # 7 pages of 4 rows: 20 latent + 8 index key
    table = torch.tensor([[6, 2, 4], [1, 5, 3]])                # 2 rows x 3 pages, s_q = 2 queries each
    lens = torch.tensor([10, 11, 3, 4])
    q, w = torch.randn(4, 2, 8, generator=g), torch.rand(4, 2, generator=g)
    got = dsa_paged_select(q, w, cache, 20, table, lens, 2, 5)
    flat = cache.view(-1, 28)
    for t in range(4):
        rows = (table[t // 2][:, None] * 4 + torch.arange(4)).flatten()[: int(lens[t])]   # visible positions' rows
        score = torch.stack([(w[t] * (q[t] @ flat[r, 20:] / 8 ** 0.5).relu()).sum() for r in rows])
        want = rows[score.topk(min(5, len(rows))).indices]
        assert sorted(got[t][got[t] >= 0].tolist()) == sorted(want.tolist())
        assert int((got[t] < 0).sum()) == 5 - len(want)


def test_native_dsa_imports_without_cuda_and_runs_the_reference_off_its_shapes():
    """kernels/native_dsa.py on this CPU box: importable, its self-test declines, its adapters give the
    reference's answers (what they run when a shape or device is outside the kernels' reach)."""
    from epserve.kernels import native_dsa
    ok, why = native_dsa.self_test("cpu")
    assert not ok and "CUDA" in why
    g = torch.Generator().manual_seed(2)
    q, rows = torch.randn(3, 4, 20, generator=g), torch.randn(30, 24, generator=g)
    slots = torch.tensor([[0, 5, -1], [29, 3, 7], [-1, -1, -1]])
    assert torch.equal(native_dsa.sparse_mla(q, rows, slots, 0.2, 16), sparse_mla(q, rows, slots, 0.2, 16))
    iq, keys, w = torch.randn(3, 4, 8, generator=g), torch.randn(1, 10, 8, generator=g), torch.randn(3, 4, generator=g)
    lens = torch.tensor([3, 10, 7])
    assert all(torch.equal(a, b) for a, b in zip(native_dsa.dsa_index_select(iq, w, keys, lens, 4),
                                                 select(iq, w, keys, lens, 4)))
    cache, table = torch.randn(4, 4, 28, generator=g), torch.tensor([[2, 0], [3, 1]])
    from epserve.kernels.reference_dsa import dsa_paged_select
    assert torch.equal(native_dsa.dsa_paged_select(iq[:2], w[:2], cache, 20, table, lens[:2], 1, 4),
                       dsa_paged_select(iq[:2], w[:2], cache, 20, table, lens[:2], 1, 4))


def test_fp8_checkpoint_matches_transformers_and_fp8_index_keys_stay_close(tmp_path):
    fp8_dir = str(make_tiny_model(tmp_path / "fp8", preset="v32-tiny", fp8=True, seed=7))
    hf = hf_v32(_dequantized_copy(fp8_dir, tmp_path / "deq"))
    prompts = prompts_of([7, 33], seed=3)    # V3's FP8 test's lengths; 33 > index_topk = 16
    engine = make_local_engine(fp8_dir)                # FP8 weights dequantised on use: exact
    assert engine.model.layers[0].attn.indexer.wk.is_fp8 and not engine.model.layers[0].attn.indexer.fp8
    for p, g in zip(prompts, run_engine(engine, prompts, 6)):
        assert g == hf_greedy(hf, p, 6)
    # the seed's recipe: 1x128 FP8 activations, and FP8 index keys and queries (Hadamard-rotated)
    engine_q = make_local_engine(fp8_dir, fp8_activations=True)
    assert all(b.attn.indexer.fp8 for b in engine_q.model.layers)
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        got = engine_prompt_logits(engine_q, p)
        diff = 1 - 2 * (got.double() * ref.double()).sum() / (got.double() ** 2 + ref.double() ** 2).sum()
        # the calc_diff bound test_model_vs_transformers holds V3's FP8 to. (Longer prompts drift further:
        # FP8 noise flips some of the indexer's top-k choices, ~0.055 at 57 tokens on this random model.)
        assert diff < 0.05, diff
    odd = make_tiny_model(tmp_path / "odd", preset="v32-tiny", fp8=True, config_overrides={"index_head_dim": 48})
    with pytest.raises(ConfigError, match="index_head_dim=48 must be a power of two"):
        make_local_engine(str(odd), fp8_activations=True)         # refused at load, not mid-step


def test_transformers_saved_checkpoint_loads_the_same_model(v32_dirs, tmp_path):
    hf = hf_v32(v32_dirs["tiny"])
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and "rope_parameters" in cfg
    p = prompts_of([40], seed=9)[0]
    a = engine_prompt_logits(make_local_engine(v32_dirs["tiny"]), p)
    b = engine_prompt_logits(make_local_engine(str(tmp_path / "hf")), p)
    assert (a - b).abs().max() < 1e-5


def test_mtp_greedy_equals_plain_greedy_with_sparse_attention(tmp_path):
    model_dir = str(make_tiny_model(tmp_path / "mtp", preset="v32-tiny", seed=8,
                                    config_overrides={"num_nextn_predict_layers": 1}))
    prompts = prompts_of([5, 40, 70], seed=2)
    want = run_engine(make_local_engine(model_dir, dtype="float32"), prompts, 8)
    for k in (1, 2):
        engine = make_local_engine(model_dir, dtype="float32", mtp_draft=k)
        assert engine.model.mtp.block.attn.indexer is not None
        assert run_engine(engine, prompts, 8) == want
        assert engine.drafter.counters.proposed > 0


def test_v32_config_is_read_and_bad_values_are_named():
    cfg = {**TINY_CONFIG, **PRESETS["v32-tiny"]}
    a = ModelArgs.from_hf_config(cfg)
    assert (a.index_n_heads, a.index_head_dim, a.index_topk) == (16, 32, 16)
    assert a.cache_dim == a.kv_dim + 32 and not ModelArgs.from_hf_config(TINY_CONFIG).is_dsa
    with pytest.raises(ConfigError, match="index_topk"):
        ModelArgs.from_hf_config({k: v for k, v in cfg.items() if k != "index_topk"})
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelArgs.from_hf_config({**cfg, "q_lora_rank": None})
    with pytest.raises(ConfigError, match="index_head_dim=8"):
        ModelArgs.from_hf_config({**cfg, "index_head_dim": 8})


def test_make_tiny_model_cli_writes_a_v32_checkpoint(tmp_path):
    from epserve.cli import main
    assert main(["make-tiny-model", str(tmp_path / "m"), "--preset", "v32-tiny"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["index_topk"] == 16
    assert make_local_engine(str(tmp_path / "m")).args.is_dsa
