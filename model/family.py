"""The V3 family by configuration: each member's shape, chat format and tokenizer kind as data.

DeepSeek-V3.1 / V3.1-Terminus and R1-0528 are V3's architecture with another chat template; Kimi K2
is V3's architecture at 384 routed experts in one group (8 per token, 1 shared, 1 dense layer) with
a tiktoken tokenizer and its own chat format. `MEMBERS` gives make-tiny-model a random checkpoint of
each in its release layout; `SHAPES` gives `epserve plan` the real dimensions when no weights are at hand.
Never: holds model code (every member runs model/deepseek_v3.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from epserve.model import chat_templates as ct
from epserve.model.tiktoken_bpe import PATTERNS, train_ranks, write_ranks


@dataclass(frozen=True)
class Member:
    config: dict                       # config.json keys over the tiny default (model/tiny.py)
    chat: str                          # a model/chat_formats.py FORMATS name
    tokenizer: str = "bpe"             # bpe (tokenizer.json) | tiktoken (tiktoken.model, as Kimi K2 ships)
    generation_config: dict = field(default_factory=dict)


# Kimi K2's routing and RoPE (its config.json), at the tiny widths
_K2_ROUTING = {"n_group": 1, "topk_group": 1, "n_shared_experts": 1, "first_k_dense_replace": 1,
               "routed_scaling_factor": 2.827, "rope_theta": 50000.0, "topk_method": "noaux_tc",
               "scoring_func": "sigmoid", "norm_topk_prob": True}
K2_TINY_BPE = 384                      # tiny K2: 384 BPE ranks + 256 special ids = vocab 640
MEMBERS = {
    "v31-tiny": Member({"num_nextn_predict_layers": 1}, "v3.1"),
    "r1-0528-tiny": Member({"num_nextn_predict_layers": 1}, "r1-0528"),
    "kimi-k2-tiny": Member({**_K2_ROUTING, "n_routed_experts": 12, "num_experts_per_tok": 4,
                            "vocab_size": K2_TINY_BPE + 256, "bos_token_id": K2_TINY_BPE,
                            "eos_token_id": K2_TINY_BPE + 1,
                            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
                                             "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0,
                                             "mscale_all_dim": 1.0}},
                           "kimi-k2", "tiktoken", {"eos_token_id": K2_TINY_BPE + 2}),   # turns end at <|im_end|>
}

# The released dimensions (config.json), for planning without weights
SHAPES = {
    "kimi-k2": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
                "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
                "num_hidden_layers": 61, "num_attention_heads": 64, "num_key_value_heads": 64,
                "n_routed_experts": 384, "num_experts_per_tok": 8, **_K2_ROUTING,
                "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "v_head_dim": 128, "max_position_embeddings": 131072, "num_nextn_predict_layers": 0,
                "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                "bos_token_id": 163584, "eos_token_id": 163585,
                "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                        "weight_block_size": [128, 128]}},
}


def write_k2_tokenizer(out: Path, n_bpe: int, corpus: list[str], model_max_length: int) -> int:
    """Kimi K2's tokenizer files: tiktoken.model (n_bpe ranks learnt from `corpus`) and
    tokenizer_config.json (the 256 special ids after them, K2's chat template); -> vocab size."""
    cls = "TikTokenTokenizer"
    ranks = train_ranks(corpus, n_bpe, PATTERNS[cls])
    if len(ranks) != n_bpe:
        raise ValueError(f"the corpus gives {len(ranks)} BPE ranks, not {n_bpe}")
    write_ranks(out / "tiktoken.model", ranks)
    names = {i: ct.K2_SPECIALS.get(i, f"<|reserved_token_{i}|>") for i in range(256)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": {str(n_bpe + i): {"content": c, "special": True, "normalized": False,
                                                  "lstrip": False, "rstrip": False, "single_word": False}
                                 for i, c in names.items()},
        "bos_token": ct.K2_BOS, "eos_token": ct.K2_IM_END, "pad_token": names[255], "unk_token": names[254],
        "add_bos_token": False, "tokenizer_class": cls, "model_max_length": model_max_length,
        "chat_template": ct.K2_TEMPLATE}, indent=1, ensure_ascii=False))
    return n_bpe + 256
