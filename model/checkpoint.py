"""Checkpoint loading: Hugging Face DeepSeek-V3 safetensors -> this rank's Transformer.

Owns the one name table (HF tensor name -> model attribute), reading single-file
or sharded (model.safetensors.index.json) checkpoints, FP8 e4m3 weights with
128x128 `weight_scale_inv` blocks, and loading only what a rank needs: a rank
reads only the routed experts its slots hold, so an EP shard never touches the
other experts' bytes (safetensors reads lazily by tensor).
Never: guesses. A missing, mis-shaped or unreadable tensor is a CheckpointError
that names the tensor and the file.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from epserve.errors import CheckpointError, ConfigError
from epserve.kernels.reference import FP8, Weight
from epserve.model.deepseek_v3 import ModelArgs, Transformer
from epserve.kernels.reference_dsa import hadamard
from epserve.model.moe_dispatch import ExpertShard

log = logging.getLogger("epserve.checkpoint")


# HF name (relative to model.layers.{i}.) -> (attribute path on Block, is a Linear weight)
_LAYER_TABLE = {
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("ffn_norm", False),
    "self_attn.q_proj.weight": ("attn.wq", True),
    "self_attn.q_a_proj.weight": ("attn.wq_a", True),
    "self_attn.q_a_layernorm.weight": ("attn.q_norm", False),
    "self_attn.q_b_proj.weight": ("attn.wq_b", True),
    "self_attn.kv_a_proj_with_mqa.weight": ("attn.wkv_a", True),
    "self_attn.kv_a_layernorm.weight": ("attn.kv_norm", False),
    "self_attn.kv_b_proj.weight": ("attn.wkv_b", True),
    "self_attn.o_proj.weight": ("attn.wo", True),
    "self_attn.indexer.wq_b.weight": ("attn.indexer.wq_b", True),          # V3.2's indexer (model/dsa.py)
    "self_attn.indexer.wk.weight": ("attn.indexer.wk", True),
    "self_attn.indexer.k_norm.weight": ("attn.indexer.k_norm", False),
    "self_attn.indexer.k_norm.bias": ("attn.indexer.k_norm_bias", False),
    "self_attn.indexer.weights_proj.weight": ("attn.indexer.weights_proj", True),
    "mlp.gate_proj.weight": ("ffn.w1", True),
    "mlp.up_proj.weight": ("ffn.w3", True),
    "mlp.down_proj.weight": ("ffn.w2", True),
    "mlp.gate.weight": ("ffn.gate.weight", False),
    "mlp.gate.e_score_correction_bias": ("ffn.gate.bias", False),
    "mlp.shared_experts.gate_proj.weight": ("ffn.shared.w1", True),
    "mlp.shared_experts.up_proj.weight": ("ffn.shared.w3", True),
    "mlp.shared_experts.down_proj.weight": ("ffn.shared.w2", True),
}
_EXPERT_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
_FP32_ATTRS = ("ffn.gate.weight", "ffn.gate.bias")


def read_config(model_dir: str | os.PathLike, n_draft: int = 0) -> ModelArgs:
    """The checkpoint's ModelArgs; n_draft > 0 serves its MTP layer (ConfigError if it has none)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():      # a chat model may end its turns with another token (Kimi K2: <|im_end|>)
        try:
            extra = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{gen}: not valid JSON ({exc})") from None
        ids = [e for v in (cfg.get("eos_token_id"), extra) for e in (v if isinstance(v, list) else [v])
               if e is not None]
        cfg["eos_token_id"] = list(dict.fromkeys(ids))
    from epserve.model.mtp import with_mtp
    return with_mtp(ModelArgs.from_hf_config(cfg), n_draft)


class TensorIndex:
    """Which file holds which tensor; opens files lazily, once."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: malformed index ({exc!r})") from None
            self.where = {name: self.dir / f for name, f in weight_map.items()}
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.dir}: no *.safetensors files")
            self.where = {}
            for f in files:
                for name in self._open(f).keys():
                    self.where[name] = f
        self._handles: dict[Path, object] = {}

    def _open(self, path: Path):
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None

    def has(self, name: str) -> bool:
        return name in self.where

    def get(self, name: str) -> torch.Tensor:
        path = self.where.get(name)
        if path is None:
            raise CheckpointError(f"{self.dir}: tensor {name!r} is missing")
        if path not in self._handles:
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the index but not on disk")
            self._handles[path] = self._open(path)
        try:
            return self._handles[path].get_tensor(name)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot read tensor {name!r} ({exc}); the file may be truncated") from None


@dataclass
class LoadOptions:
    dtype: torch.dtype = torch.float32
    fp8_activations: bool = False   # quantise activations 1x128 for FP8 GEMMs (the seed's recipe)
    progress: bool = True


def _weight(index: TensorIndex, name: str, shape: tuple[int, int], opts: LoadOptions, device) -> Weight:
    w = index.get(name)
    if tuple(w.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, expected {shape} from config.json")
    if w.dtype == FP8:
        scale_name = name[: -len("weight")] + "weight_scale_inv"
        if not index.has(scale_name):
            raise CheckpointError(f"FP8 tensor {name!r} has no {scale_name!r}")
        s = index.get(scale_name).float()
        want = ((shape[0] + 127) // 128, (shape[1] + 127) // 128)
        if tuple(s.shape) != want:
            raise CheckpointError(f"{scale_name!r} has shape {tuple(s.shape)}, expected {want} (128x128 blocks)")
        return Weight(w.to(device), s.to(device), act_quant=opts.fp8_activations)
    return Weight(w.to(device=device, dtype=opts.dtype))


def _linear_shapes(a: ModelArgs) -> dict[str, tuple[int, int]]:
    h = a.n_heads
    return {
        "attn.wq": (h * a.qk_head_dim, a.dim), "attn.wq_a": (a.q_lora_rank or 0, a.dim),
        "attn.wq_b": (h * a.qk_head_dim, a.q_lora_rank or 0), "attn.wkv_a": (a.kv_dim, a.dim),
        "attn.wkv_b": (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
        "attn.wo": (a.dim, h * a.v_head_dim),
        "attn.indexer.wq_b": (a.index_n_heads * a.index_head_dim, a.q_lora_rank or 0),
        "attn.indexer.wk": (a.index_head_dim, a.dim), "attn.indexer.weights_proj": (a.index_n_heads, a.dim),
        "ffn.w1": (a.inter_dim, a.dim), "ffn.w3": (a.inter_dim, a.dim), "ffn.w2": (a.dim, a.inter_dim),
        "ffn.shared.w1": (a.moe_inter_dim * a.n_shared_experts, a.dim),
        "ffn.shared.w3": (a.moe_inter_dim * a.n_shared_experts, a.dim),
        "ffn.shared.w2": (a.dim, a.moe_inter_dim * a.n_shared_experts),
        "w1": (a.moe_inter_dim, a.dim), "w3": (a.moe_inter_dim, a.dim), "w2": (a.dim, a.moe_inter_dim),
    }


def _wanted(a: ModelArgs, layer: int) -> list[str]:
    names = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.kv_a_proj_with_mqa.weight",
             "self_attn.kv_a_layernorm.weight", "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight"]
    names += (["self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight", "self_attn.q_b_proj.weight"]
              if a.q_lora_rank else ["self_attn.q_proj.weight"])
    if a.is_dsa:
        names += [n for n in _LAYER_TABLE if ".indexer." in n]
    if a.is_moe_layer(layer):
        names += ["mlp.gate.weight"]
        if a.topk_method == "noaux_tc":
            names += ["mlp.gate.e_score_correction_bias"]
        if a.n_shared_experts:
            names += [f"mlp.shared_experts.{p}.weight" for p in _EXPERT_PROJ]
    else:
        names += [f"mlp.{p}.weight" for p in _EXPERT_PROJ]
    return names


# The MTP layer's own tensors (relative to model.layers.{n_layers}.) -> MTPModule attribute. The
# release stores copies of the embedding and head there; a checkpoint without them shares the main ones.
_MTP_TABLE = {"enorm.weight": "enorm", "hnorm.weight": "hnorm", "eh_proj.weight": "eh_proj",
              "shared_head.norm.weight": "norm", "embed_tokens.weight": "embed", "shared_head.head.weight": "head"}
_MTP_REQUIRED = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


def _check_mtp_layer(index: TensorIndex, a: ModelArgs) -> None:
    missing = [n for n in _MTP_REQUIRED if not index.has(f"model.layers.{a.n_layers}.{n}")]
    if missing:
        raise CheckpointError(f"{index.dir}: MTP is on but the checkpoint has no MTP layer: "
                              f"model.layers.{a.n_layers}.{missing[0]} is missing (config.json says "
                              f"num_nextn_predict_layers={a.n_nextn_layers}); turn mtp off or use a checkpoint "
                              "that keeps the module")


def _load_mtp_tensor(model: Transformer, index: TensorIndex, name: str, rel: str, opts: LoadOptions) -> None:
    a, dev = model.args, model.device
    attr = _MTP_TABLE[rel]
    if attr == "eh_proj":
        value = _weight(index, name, (a.dim, 2 * a.dim), opts, dev)
    else:
        value = index.get(name)
        want = (a.vocab_size, a.dim) if attr in ("embed", "head") else (a.dim,)
        if tuple(value.shape) != want:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {want}")
        value = value.to(device=dev, dtype=model.dtype)
    setattr(model.mtp, attr, value)


def _set(obj, path: str, value) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, leaf, value)


def load_expert(index: TensorIndex, a: ModelArgs, layer: int, expert: int, opts: LoadOptions,
                device="cpu") -> dict[str, Weight]:
    """One routed expert's three weights {w1, w3, w2}: what a rank stages for a new slot."""
    shapes = _linear_shapes(a)
    return {attr: _weight(index, f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight", shapes[attr], opts,
                          device) for proj, attr in _EXPERT_PROJ.items()}


def load_weights(model: Transformer, model_dir: str | os.PathLike, opts: LoadOptions,
                 index: TensorIndex | None = None) -> dict[str, int]:
    """Fill `model` from the checkpoint: dense parts fully, routed experts for this rank's slots only.

    Returns {"tensors": n, "experts": n distinct (layer, expert) loaded} for the caller's log.
    """
    a, dev = model.args, model.device
    index = index or TensorIndex(model_dir)
    shapes = _linear_shapes(a)
    jobs: list[tuple[str, object]] = [("model.embed_tokens.weight", None), ("model.norm.weight", None)]
    if not a.tie_word_embeddings:
        jobs.append(("lm_head.weight", None))
    for i in range(a.n_kv_layers):
        jobs += [(f"model.layers.{i}.{n}", (i, n)) for n in _wanted(a, i)]
    if a.n_mtp_layers:
        _check_mtp_layer(index, a)
        jobs += [(f"model.layers.{a.n_layers}.{n}", ("mtp", n)) for n in _MTP_TABLE
                 if n in _MTP_REQUIRED or index.has(f"model.layers.{a.n_layers}.{n}")]
    n_experts = 0
    bar = tqdm(total=len(jobs), desc="loading checkpoint", unit="tensor", disable=not opts.progress, leave=False)
    for name, where in jobs:
        if where is None:
            t = index.get(name)
            want = (a.vocab_size, a.dim) if name != "model.norm.weight" else (a.dim,)
            if tuple(t.shape) != want:
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
            t = t.to(device=dev, dtype=model.dtype)   # the head too: logits are a model-dtype GEMM, read as fp32
            {"model.embed_tokens.weight": lambda: setattr(model, "embed", t),
             "model.norm.weight": lambda: setattr(model, "norm", t),
             "lm_head.weight": lambda: setattr(model, "head", t)}[name]()
        elif where[0] == "mtp":
            _load_mtp_tensor(model, index, name, where[1], opts)
        else:
            i, rel = where
            attr, is_linear = _LAYER_TABLE[rel]
            if is_linear:
                value = _weight(index, name, shapes[attr], opts, dev)
            else:
                value = index.get(name)
                dtype = torch.float32 if attr in _FP32_ATTRS else model.dtype
                want = {"ffn.gate.weight": (a.n_routed_experts, a.dim), "ffn.gate.bias": (a.n_routed_experts,),
                        "attn.q_norm": (a.q_lora_rank,), "attn.kv_norm": (a.kv_lora_rank,),
                        "attn.indexer.k_norm": (a.index_head_dim,), "attn.indexer.k_norm_bias": (a.index_head_dim,),
                        }.get(attr, (a.dim,))
                if tuple(value.shape) != want:
                    raise CheckpointError(f"tensor {name!r} has shape {tuple(value.shape)}, expected {want}")
                value = value.to(device=dev, dtype=dtype)
            _set(model.block(i), attr, value)
        bar.update(1)
    if a.tie_word_embeddings:
        model.head = model.embed
    index_fp8 = a.is_dsa and opts.fp8_activations and a.fp8_block is not None
    if index_fp8:                                       # FP8 index keys with the seed's FP8 activations:
        hadamard(a.index_head_dim, "cpu")               # a width they cannot rotate fails here, not mid-step
    for i in range(a.n_kv_layers if a.is_dsa else 0):
        model.block(i).attn.indexer.fp8 = index_fp8
    bar.close()
    for i in range(a.n_kv_layers):
        if not a.is_moe_layer(i):
            continue
        cache: dict[int, dict[str, Weight]] = {}
        slots = []
        for slot in model.dispatcher.slots_for(i):
            e = int(model.dispatcher.map.phy2log[i - a.n_dense_layers, slot])
            if e not in cache:   # read on the host, stacked into the rank's device buffers once
                cache[e] = load_expert(index, a, i, e, opts, "cpu")
                n_experts += 1
            slots.append(cache[e])
        model.block(i).ffn.experts = ExpertShard.from_weights(slots, dev)
    return {"tensors": len(jobs), "experts": n_experts}


def check_model_dir(model_dir: str | os.PathLike) -> ModelArgs:
    """Validate a checkpoint folder up front: config parses, tensors are indexed."""
    try:
        args = read_config(model_dir)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    TensorIndex(model_dir)
    return args


