"""make-tiny-model: a random-weight checkpoint in DeepSeek-V3's release layout.

Writes config.json (original release format: rope_scaling, quantization_config),
safetensors (one file, or shards with model.safetensors.index.json), FP8 e4m3
weights with 128x128 `weight_scale_inv` when asked, and a real byte-level BPE
tokenizer (tokenizer.json, tokenizer_config.json with a chat template).
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

from epserve.kernels.reference import per_block_quant_fp8

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}" + USER + "{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}" + ASSISTANT + "{{ m['content'] }}" + EOS +
    "{% endif %}{% endfor %}{% if add_generation_prompt %}" + ASSISTANT + "{% endif %}"
)

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


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, USER, ASSISTANT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def write_tokenizer(out: Path, vocab_size: int) -> int:
    """Write tokenizer.json + tokenizer_config.json; returns the tokenizer's vocabulary size."""
    tok = _train_tokenizer(vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
        "model_max_length": TINY_CONFIG["max_position_embeddings"], "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    return tok.get_vocab_size()


def random_state_dict(cfg: dict, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """Random float32 weights in HF names. std is large enough that greedy choices are decisive."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=std):
        return torch.randn(*shape, generator=g) * s

    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v, kvl = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    qk, ql, inter, mi = nope + rope, cfg["q_lora_rank"], cfg["intermediate_size"], cfg["moe_intermediate_size"]
    sd = {"model.embed_tokens.weight": rnd(cfg["vocab_size"], d, s=1.0),
          "model.norm.weight": 1 + rnd(d, s=0.1), "lm_head.weight": rnd(cfg["vocab_size"], d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + rnd(d, s=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + rnd(d, s=0.1)
        if ql:
            sd[p + "self_attn.q_a_proj.weight"] = rnd(ql, d)
            sd[p + "self_attn.q_a_layernorm.weight"] = 1 + rnd(ql, s=0.1)
            sd[p + "self_attn.q_b_proj.weight"] = rnd(h * qk, ql)
        else:
            sd[p + "self_attn.q_proj.weight"] = rnd(h * qk, d)
        sd[p + "self_attn.kv_a_proj_with_mqa.weight"] = rnd(kvl + rope, d)
        sd[p + "self_attn.kv_a_layernorm.weight"] = 1 + rnd(kvl, s=0.1)
        sd[p + "self_attn.kv_b_proj.weight"] = rnd(h * (nope + v), kvl)
        sd[p + "self_attn.o_proj.weight"] = rnd(d, h * v)
        if i < cfg["first_k_dense_replace"]:
            for n, shape in (("gate_proj", (inter, d)), ("up_proj", (inter, d)), ("down_proj", (d, inter))):
                sd[p + f"mlp.{n}.weight"] = rnd(*shape)
            continue
        e = cfg["n_routed_experts"]
        sd[p + "mlp.gate.weight"] = rnd(e, d, s=0.5)
        sd[p + "mlp.gate.e_score_correction_bias"] = rnd(e, s=0.05)
        for j in range(e):
            for n, shape in (("gate_proj", (mi, d)), ("up_proj", (mi, d)), ("down_proj", (d, mi))):
                sd[p + f"mlp.experts.{j}.{n}.weight"] = rnd(*shape)
        si = mi * cfg["n_shared_experts"]
        for n, shape in (("gate_proj", (si, d)), ("up_proj", (si, d)), ("down_proj", (d, si))):
            sd[p + f"mlp.shared_experts.{n}.weight"] = rnd(*shape)
    return sd


def _quantize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """FP8 e4m3 with 128x128 dequant scales for every Linear but the gate and the head."""
    out = {}
    for name, t in sd.items():
        if t.dim() == 2 and "proj" in name and name.endswith(".weight"):
            q, s = per_block_quant_fp8(t)
            out[name], out[name[: -len("weight")] + "weight_scale_inv"] = q, s
        else:
            out[name] = t
    return out


def make_tiny_model(out_dir: str | os.PathLike, *, fp8: bool = False, seed: int = 0, shards: int = 1,
                    config_overrides: dict | None = None) -> Path:
    """Write the checkpoint atomically (temp dir + rename); returns the folder."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json exists)")
    cfg = dict(TINY_CONFIG, **(config_overrides or {}))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        vocab = write_tokenizer(tmp, cfg["vocab_size"])
        if vocab > cfg["vocab_size"]:
            raise ValueError(f"tokenizer has {vocab} tokens, more than vocab_size={cfg['vocab_size']}")
        sd = random_state_dict(cfg, seed)
        if fp8:
            sd = _quantize(sd)
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


def cache_root() -> Path:
    """epserve's user cache ($EPSERVE_CACHE, default ~/.cache/epserve): default model, KV store, ledger."""
    return Path(os.environ.get("EPSERVE_CACHE", Path.home() / ".cache" / "epserve"))


def default_model_dir() -> Path:
    """The embedded default: the tiny model in the user cache, made on first use."""
    out = cache_root() / "tiny-deepseek-v3-v1"
    if not (out / "config.json").exists():
        try:
            make_tiny_model(out)
        except FileExistsError:
            pass  # another process made it first
        except OSError:
            if not (out / "config.json").exists():
                raise
    return out
