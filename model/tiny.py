"""make-tiny-model: a random-weight checkpoint in DeepSeek-V3's release layout.

Writes config.json (original release format: rope_scaling, quantization_config),
safetensors (one file, or shards with model.safetensors.index.json), FP8 e4m3
weights with 128x128 `weight_scale_inv` when asked, and a real byte-level BPE
tokenizer (tokenizer.json, tokenizer_config.json) with DeepSeek-V3's special tokens (BOS/EOS, roles,
tool calls, <think>, FIM) and DeepSeek's chat template (V3's tool format, or the R1 variant).
Same seed, same bytes: every process that makes the default model makes the same one.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from epserve.config import cache_root
from epserve.kernels.reference import per_block_quant_fp8

from epserve.model.chat_templates import BOS, EOS, PLAIN_TOKENS, USER, ASSISTANT, template_for
from epserve.model.family import MEMBERS, write_k2_tokenizer

# The default tiny shape: 3 layers (1 dense, 2 MoE), 16 experts in 4 groups, top-4 of 2 groups.
TINY_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "num_nextn_predict_layers": 0,
    "torch_dtype": "float32",
}

# V3's own widths (hidden 7168, 128 heads, MLA 1536/512/64/128/128, experts of 2048) with 4 layers,
# made to measure the engine on one GPU: "v3-4l" keeps all 256 experts (34 GB of FP8 experts);
# "v3-ep144-rank" and "v3-ep32-rank" keep the experts one GPU of DeepSeek's decode (EP144: 2 routed
# slots) and prefill (EP32: 9 slots) units holds, so one GPU runs that rank's per-layer work; run with
# `ep_dispatch: emulated` (model/ep_emulate.py) their MoE layers also receive that rank's rows (EP144:
# ~1,024 at 128 requests; EP32: ~131K at 16K tokens) and hold its exchanges for DeepEP's published time.
# "v3-mini" is small but keeps the MLA and expert dims DeepGEMM and FlashMLA take (GPU tests).
_V3 = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
       "num_hidden_layers": 4, "first_k_dense_replace": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
       "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
       "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
       "max_position_embeddings": 163840,
       "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
_V32 = {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "index_n_heads": 64,
        "index_head_dim": 128, "index_topk": 2048}
PRESETS = {
    "tiny": {},
    "v3-4l": _V3,
    "v3-ep144-rank": {**_V3, "n_routed_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "v3-ep32-rank": {**_V3, "n_routed_experts": 9, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1},
    # the whole depth of V3 (3 dense + 58 MoE layers) at an EP144 rank's 2 experts: ~23 GB of FP8, so
    # the engine's fixed per-step costs are weighed against 61 layers of work, as in production
    "v3-ep144-rank-61l": {**_V3, "n_routed_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
                          "num_hidden_layers": 61, "first_k_dense_replace": 3},
    # V3.2 (DeepSeek Sparse Attention, model/dsa.py) at the tiny shape: each query attends to at most 16 tokens
    "v32-tiny": {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "index_n_heads": 16,
                 "index_head_dim": 32, "index_topk": 16},
    # V3.2 at V3's widths with its released indexer (64 heads of 128, top-2,048): the EP144 / EP32 ranks
    # above with sparse attention, so bench step's emulated rank and bench engine run V3.2 against V3
    "v32-ep144-rank": {**_V3, **_V32, "n_routed_experts": 2, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1},
    "v32-ep32-rank": {**_V3, **_V32, "n_routed_experts": 9, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1},
    "v3-mini": {"vocab_size": 512, "hidden_size": 1024, "intermediate_size": 1024, "moe_intermediate_size": 256,
                "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 16,
                "num_key_value_heads": 16, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4,
                "topk_group": 2, "q_lora_rank": 256, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64, "v_head_dim": 128},
    # the V3 family (model/family.py): V3.1, R1-0528 and Kimi K2 at the tiny widths
    **{name: member.config for name, member in MEMBERS.items()},
}

_CORPUS = """\
DeepSeek serves V3 and R1 with cross-node expert parallelism. Prefill runs on units of four nodes
and decode on units of eighteen nodes. Each GPU is an attention data-parallel rank and an expert
shard. Tokens are dispatched to the ranks that hold their experts and combined on the way back.
Redundant experts are placed by the expert-parallel load balancer from recent load statistics.
An on-disk cache of key and value blocks lets repeated prefixes skip prefill. At night fewer nodes
serve inference and the rest train. The quick brown fox jumps over the lazy dog. Hello, world!
What is the capital of France? Paris is the capital of France. Write a short poem about the sea.
The sea is wide and deep and blue; it sings of storms and old ships too. 0123456789 + - * / = ( )
def main(): print("hello") return 0  # comments, code, numbers: 3.14159 2.71828 1.41421
"""


def _train_tokenizer(vocab_size: int, corpus_text: str | None = None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    # BOS/EOS and the role markers are special (dropped when decoding); the tool-call, <think> and FIM
    # tokens are added but not special, as in DeepSeek's tokenizer: they decode to their text, which the
    # tool-call and reasoning parsers read.
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(PLAIN_TOKENS), special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    chunks = range(0, len(corpus_text or ""), 65536)
    text = [_CORPUS] * 4 if corpus_text is None else [corpus_text[i:i + 65536] for i in chunks]
    tok.train_from_iterator(text, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in PLAIN_TOKENS])
    return tok


def write_tokenizer(out: Path, vocab_size: int, chat_template: str = "v3", corpus_text: str | None = None) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the tokenizer's vocabulary size.
    chat_template: "v3" (DeepSeek-V3's, with its tool-call format) or "r1" (the same, opening <think>).
    corpus_text: what the BPE merges are learnt from (None: the built-in snippet of the random models)."""
    tok = _train_tokenizer(vocab_size, corpus_text)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "model_max_length": TINY_CONFIG["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template_for(chat_template),
    }, indent=1))
    return tok.get_vocab_size()


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.15, fp8: bool = False,
                      device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random weights in HF names, on the host. std is large enough that greedy choices are decisive;
    wide presets (hidden > 256) scale linear weights by 8 / sqrt(fan_in) to keep activations in range.

    Each tensor is drawn on `device` (a GPU makes the V3-width presets in seconds), FP8-quantised
    there when asked (every Linear but the gate and the head), then moved to the host, so peak
    device memory is one tensor. Same seed and device, same bytes.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    wide = cfg["hidden_size"] > 256

    def put(name, *shape, s=std, center=0.0, linear=False, dtype=torch.float32):
        scale = s * 8.0 / shape[-1] ** 0.5 if wide and linear else s
        t = torch.randn(*shape, generator=g, device=device) * scale + center
        if fp8 and linear:
            q, sc = per_block_quant_fp8(t)
            sd[name], sd[name[: -len("weight")] + "weight_scale_inv"] = q.cpu(), sc.cpu()
        else:
            sd[name] = t.to(dtype).cpu()

    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    qk, ql, inter, mi = nope + rope, cfg["q_lora_rank"], cfg["intermediate_size"], cfg["moe_intermediate_size"]
    big = torch.bfloat16 if wide else torch.float32          # V3 ships embeddings and head in bf16
    put("model.embed_tokens.weight", cfg["vocab_size"], d, s=1.0, dtype=big)
    put("model.norm.weight", d, s=0.1, center=1.0)
    put("lm_head.weight", cfg["vocab_size"], d, s=std * (8.0 / d ** 0.5 if wide else 1.0), dtype=big)
    n_mtp = cfg.get("num_nextn_predict_layers", 0) or 0
    for i in range(cfg["num_hidden_layers"] + n_mtp):       # the MTP layers come after the last (release layout)
        p = f"model.layers.{i}."
        if i >= cfg["num_hidden_layers"]:
            put(p + "enorm.weight", d, s=0.1, center=1.0)
            put(p + "hnorm.weight", d, s=0.1, center=1.0)
            put(p + "eh_proj.weight", d, 2 * d, linear=True)
            put(p + "shared_head.norm.weight", d, s=0.1, center=1.0)
        put(p + "input_layernorm.weight", d, s=0.1, center=1.0)
        put(p + "post_attention_layernorm.weight", d, s=0.1, center=1.0)
        if ql:
            put(p + "self_attn.q_a_proj.weight", ql, d, linear=True)
            put(p + "self_attn.q_a_layernorm.weight", ql, s=0.1, center=1.0)
            put(p + "self_attn.q_b_proj.weight", h * qk, ql, linear=True)
        else:
            put(p + "self_attn.q_proj.weight", h * qk, d, linear=True)
        put(p + "self_attn.kv_a_proj_with_mqa.weight", kvl + rope, d, linear=True)
        put(p + "self_attn.kv_a_layernorm.weight", kvl, s=0.1, center=1.0)
        put(p + "self_attn.kv_b_proj.weight", h * (nope + v), kvl, linear=True)
        put(p + "self_attn.o_proj.weight", d, h * v, linear=True)
        if cfg.get("index_n_heads"):          # V3.2's indexer (weights_proj stays unquantised, as released)
            hi, di = cfg["index_n_heads"], cfg["index_head_dim"]
            put(p + "self_attn.indexer.wq_b.weight", hi * di, ql, linear=True)
            put(p + "self_attn.indexer.wk.weight", di, d, linear=True)
            put(p + "self_attn.indexer.k_norm.weight", di, s=0.1, center=1.0)
            put(p + "self_attn.indexer.k_norm.bias", di, s=0.1)
            put(p + "self_attn.indexer.weights_proj.weight", hi, d, s=std * (8.0 / d ** 0.5 if wide else 1.0))
        if i < cfg["first_k_dense_replace"]:
            for n, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
                put(p + f"mlp.{n}.weight", *shape, linear=True)
            continue
        e = cfg["n_routed_experts"]
        put(p + "mlp.gate.weight", e, d, s=0.5 * (8.0 / d ** 0.5 if wide else 1.0))
        put(p + "mlp.gate.e_score_correction_bias", e, s=0.05)
        for j in range(e):
            for n, shape in (("gate_proj", (mi, d)), ("up_proj", (mi, d)), ("down_proj", (d, mi))):
                put(p + f"mlp.experts.{j}.{n}.weight", *shape, linear=True)
        si = mi * cfg["n_shared_experts"]
        for n, shape in (("gate_proj", (si, d)), ("up_proj", (si, d)), ("down_proj", (d, si))):
            put(p + f"mlp.shared_experts.{n}.weight", *shape, linear=True)
    return sd


def make_tiny_model(out_dir: str | os.PathLike, *, fp8: bool = False, seed: int = 0, shards: int = 1,
                    config_overrides: dict | None = None, preset: str = "tiny", device: str = "cpu",
                    chat_template: str = "v3") -> Path:
    """Write the checkpoint atomically (temp dir + rename); returns the folder. `preset` picks a
    shape from PRESETS (the V3-width ones are FP8 and sharded like the release); a family member's
    preset also picks its chat template and tokenizer (model/family.py), over `chat_template`."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json exists)")
    if preset not in PRESETS:
        raise ValueError(f"preset {preset!r} is not one of {', '.join(PRESETS)}")
    cfg = {**TINY_CONFIG, **PRESETS[preset], **(config_overrides or {})}     # later ones win
    if cfg["hidden_size"] >= 4096:
        fp8, shards = True, max(shards, 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    member = MEMBERS.get(preset)
    try:
        if member is not None and member.tokenizer == "tiktoken":
            vocab = write_k2_tokenizer(tmp, cfg["vocab_size"] - 256, [_CORPUS] * 4, cfg["max_position_embeddings"])
        else:
            vocab = write_tokenizer(tmp, cfg["vocab_size"], member.chat if member else chat_template)
        if member is not None and member.generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(member.generation_config))
        if vocab > cfg["vocab_size"]:
            raise ValueError(f"tokenizer has {vocab} tokens, more than vocab_size={cfg['vocab_size']}")
        sd = random_state_dict(cfg, seed, fp8=fp8, device=device)
        if fp8:
            cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        names = sorted(sd)
        if shards <= 1:
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for k in range(shards):
                fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
                part = {n: sd[n] for n in names[k::shards]}
                save_file(part, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({n: fname for n in part})
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_model_dir() -> Path:
    """The embedded default: the tiny model in the user cache, made on first use."""
    out = cache_root() / "tiny-deepseek-v3-v2"     # v2: DeepSeek-V3's special tokens and chat template
    if not (out / "config.json").exists():
        try:
            make_tiny_model(out)
        except FileExistsError:
            pass  # another process made it first
        except OSError:
            if not (out / "config.json").exists():
                raise
    return out
