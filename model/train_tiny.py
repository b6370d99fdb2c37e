"""train-tiny: a tiny DeepSeek-V3 (MLA, MoE, one MTP module) trained on CPU in minutes.

Random weights accept almost no MTP drafts, so serving features that depend on what a model has
learned (multi-token prediction above all) need a model that has learned something. This is that
model's trainer, small and plain on purpose: not a training framework.

- Corpus: the Python standard library's own top-level `*.py` source (every machine with Python
  has it). Files are sorted by name; every 10th is held out (`corpus(split="heldout")`) for
  measuring acceptance on text the model never saw.
- Tokenizer: a byte-level BPE trained on the training split, with DeepSeek-V3's special tokens
  (model/tiny.py's `write_tokenizer`).
- Model: the serving code's own pieces where they carry the math the engine must agree with
  (`ModelArgs`, `rope_inv_freq`, `apply_rope`, `rms_norm`, `Gate`); MLA in the naive form; the
  routed experts computed densely for all experts and weighted by the gate (tiny E, no dispatch).
  The gate's `e_score_correction_bias` follows the V3 report's auxiliary-loss-free rule
  (bias += gamma * sign(mean load - load) per step).
- MTP (V3 report, section 2.2, depth D = 1): h'_i = eh_proj([enorm(Emb(t_{i+1})); hnorm(h_i)]), one
  transformer block, the shared head after `shared_head.norm`, predicting t_{i+2}; h_i is the main
  model's final hidden state after its norm (as vLLM and SGLang feed it). Loss = CE_main +
  lambda x CE_mtp (lambda 0.3, the report's value for most of training).
- Saved in the original release layout: `model.layers.{n}.*` is the MTP layer (enorm, hnorm,
  eh_proj, the block's tensors, shared_head.norm, and copies of the embedding and head, as the
  release stores them), `num_nextn_predict_layers: 1`.
Same seed, same Python, same bytes (one thread: torch's CPU kernels are deterministic then).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from epserve.kernels.reference import apply_rope, rms_norm
from epserve.model.deepseek_v3 import Gate, ModelArgs
from epserve.model.rope import rope_inv_freq
from epserve.model.tiny import TINY_CONFIG, write_tokenizer

# The trained shape: 3 layers (1 dense, 2 MoE) + the MTP layer, 8 experts in 2 groups, top-2 of 1 group.
TRAIN_CONFIG = {
    **TINY_CONFIG,
    "vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
    "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
    "rope_scaling": None, "num_nextn_predict_layers": 1,
}


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 300
    batch: int = 16                # sequences per step
    seq_len: int = 128
    lr: float = 3e-3
    mtp_lambda: float = 0.3        # the V3 report's MTP loss weight
    bias_gamma: float = 1e-3       # auxiliary-loss-free balancing: bias update speed
    seed: int = 0
    max_seconds: float = 0.0       # stop early after this long (0: run all steps)
    config_overrides: tuple = ()   # ((key, value), ...) over TRAIN_CONFIG, e.g. a smaller test model


def corpus(split: str = "train") -> str:
    """The standard library's top-level source files, sorted; every 10th file is held out."""
    import glob
    root = os.path.dirname(os.__file__)
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    if not files:
        raise FileNotFoundError(f"no standard-library source under {root}")
    keep = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "heldout")]
    return "\n".join(Path(f).read_text(encoding="utf-8", errors="replace") for f in keep)


def _linear(x, w):
    return F.linear(x, w)


class TinyV3:
    """Parameters by their release names; forward(ids) -> (main logits, MTP logits)."""

    def __init__(self, cfg: dict, seed: int):
        self.cfg, self.args = cfg, ModelArgs.from_hf_config(cfg)
        from epserve.model.tiny import random_state_dict
        sd = random_state_dict({**cfg, "num_hidden_layers": cfg["num_hidden_layers"] + 1}, seed, std=0.02)
        a, n = self.args, cfg["num_hidden_layers"]
        d = a.dim
        g = torch.Generator().manual_seed(seed + 1)
        for k in list(sd):           # norms start at 1, linears at N(0, 0.02) (random_state_dict's std)
            if k.endswith("layernorm.weight") or k == "model.norm.weight":
                sd[k] = torch.ones_like(sd[k])
            if k.endswith("e_score_correction_bias"):
                sd[k] = torch.zeros_like(sd[k])
        p = f"model.layers.{n}."
        sd[p + "enorm.weight"], sd[p + "hnorm.weight"] = torch.ones(d), torch.ones(d)
        sd[p + "eh_proj.weight"] = torch.randn(d, 2 * d, generator=g) * 0.02
        sd[p + "shared_head.norm.weight"] = torch.ones(d)
        sd["model.embed_tokens.weight"] = torch.randn(a.vocab_size, d, generator=g) * 0.02
        self.params = {k: v.float().requires_grad_(not k.endswith("e_score_correction_bias")) for k, v in sd.items()}
        inv, self.rope_factor = rope_inv_freq(a)
        self.inv_freq = inv
        self.n = n

    def trainable(self) -> list[torch.Tensor]:
        return [v for v in self.params.values() if v.requires_grad]

    def _attn(self, pre: str, x: torch.Tensor, cos, sin) -> torch.Tensor:
        a, p = self.args, self.params
        b, s, _ = x.shape
        q = _linear(rms_norm(_linear(x, p[pre + "self_attn.q_a_proj.weight"]),
                             p[pre + "self_attn.q_a_layernorm.weight"], a.rms_norm_eps),
                    p[pre + "self_attn.q_b_proj.weight"]).view(b * s, a.n_heads, a.qk_head_dim)
        q_nope, q_pe = q.split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        q_pe = apply_rope(q_pe, cos, sin, a.rope_interleave)
        kv = _linear(x, p[pre + "self_attn.kv_a_proj_with_mqa.weight"]).view(b * s, -1)
        c_kv, k_pe = kv.split([a.kv_lora_rank, a.qk_rope_head_dim], -1)
        c_kv = rms_norm(c_kv, p[pre + "self_attn.kv_a_layernorm.weight"], a.rms_norm_eps)
        k_pe = apply_rope(k_pe, cos, sin, a.rope_interleave)
        kvb = _linear(c_kv, p[pre + "self_attn.kv_b_proj.weight"]).view(b * s, a.n_heads, -1)
        k_nope, v = kvb.split([a.qk_nope_head_dim, a.v_head_dim], -1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, a.n_heads, -1)], -1)
        qh, kh, vh = (t.view(b, s, a.n_heads, -1).transpose(1, 2) for t in (torch.cat([q_nope, q_pe], -1), k, v))
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=a.softmax_scale)
        return _linear(o.transpose(1, 2).reshape(b, s, -1), p[pre + "self_attn.o_proj.weight"])

    def _mlp(self, pre: str, x: torch.Tensor) -> torch.Tensor:
        p = self.params
        return _linear(F.silu(_linear(x, p[pre + "gate_proj.weight"])) * _linear(x, p[pre + "up_proj.weight"]),
                       p[pre + "down_proj.weight"])

    def _moe(self, pre: str, x: torch.Tensor, loads: list) -> torch.Tensor:
        a, p = self.args, self.params
        t = x.reshape(-1, a.dim)
        gate = Gate(a, p[pre + "mlp.gate.weight"], p[pre + "mlp.gate.e_score_correction_bias"])
        w, idx = gate.forward(t)
        route = torch.zeros(t.shape[0], a.n_routed_experts, dtype=t.dtype).scatter(1, idx, w.to(t.dtype))
        loads.append((pre, torch.bincount(idx.flatten(), minlength=a.n_routed_experts)))
        e = range(a.n_routed_experts)
        w1 = torch.stack([p[f"{pre}mlp.experts.{j}.gate_proj.weight"] for j in e])     # [E, I, D]
        w3 = torch.stack([p[f"{pre}mlp.experts.{j}.up_proj.weight"] for j in e])
        w2 = torch.stack([p[f"{pre}mlp.experts.{j}.down_proj.weight"] for j in e])     # [E, D, I]
        # legend: t tokens, e experts, i expert inter dim, d hidden; every expert runs, the gate weighs
        h = F.silu(torch.einsum("td,eid->tei", t, w1)) * torch.einsum("td,eid->tei", t, w3)
        y = torch.einsum("tei,edi,te->td", h, w2, route)
        return (y + self._mlp(pre + "mlp.shared_experts.", t)).view_as(x)

    def _block(self, i: int, h: torch.Tensor, cos, sin, loads: list) -> torch.Tensor:
        a, p, pre = self.args, self.params, f"model.layers.{i}."
        h = h + self._attn(pre, rms_norm(h, p[pre + "input_layernorm.weight"], a.rms_norm_eps), cos, sin)
        x = rms_norm(h, p[pre + "post_attention_layernorm.weight"], a.rms_norm_eps)
        return h + (self._moe(pre, x, loads) if i >= a.n_dense_layers else self._mlp(pre + "mlp.", x))

    def forward(self, ids: torch.Tensor, loads: list) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, S] -> (logits [B, S, V] for t_{i+1}, MTP logits [B, S-1, V] for t_{i+2})."""
        a, p = self.args, self.params
        b, s = ids.shape
        ang = torch.arange(s, dtype=torch.float32)[:, None] * self.inv_freq[None]
        cos = (ang.cos() * self.rope_factor).repeat(b, 1)
        sin = (ang.sin() * self.rope_factor).repeat(b, 1)
        emb = p["model.embed_tokens.weight"]
        h = emb[ids]
        for i in range(self.n):
            h = self._block(i, h, cos, sin, loads)
        hn = rms_norm(h, p["model.norm.weight"], a.rms_norm_eps)
        logits = _linear(hn, p["lm_head.weight"])
        pre = f"model.layers.{self.n}."
        x = _linear(torch.cat([rms_norm(emb[ids[:, 1:]], p[pre + "enorm.weight"], a.rms_norm_eps),
                               rms_norm(hn[:, :-1], p[pre + "hnorm.weight"], a.rms_norm_eps)], -1),
                    p[pre + "eh_proj.weight"])
        cos1, sin1 = (c.view(b, s, -1)[:, :-1].reshape(b * (s - 1), -1) for c in (cos, sin))
        m = self._block(self.n, x, cos1, sin1, loads)
        mtp_logits = _linear(rms_norm(m, p[pre + "shared_head.norm.weight"], a.rms_norm_eps), p["lm_head.weight"])
        return logits, mtp_logits

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Release layout: the MTP layer also carries the embedding and head it shares."""
        sd = {k: v.detach().clone().contiguous() for k, v in self.params.items()}
        pre = f"model.layers.{self.n}."
        sd[pre + "embed_tokens.weight"] = sd["model.embed_tokens.weight"].clone()
        sd[pre + "shared_head.head.weight"] = sd["lm_head.weight"].clone()
        return sd


def batches(ids: torch.Tensor, spec: TrainSpec):
    g = torch.Generator().manual_seed(spec.seed)
    while True:
        starts = torch.randint(0, ids.numel() - spec.seq_len - 1, (spec.batch,), generator=g)
        yield torch.stack([ids[s: s + spec.seq_len] for s in starts.tolist()])


def train(out_dir: str | os.PathLike, spec: TrainSpec = TrainSpec(), log=print) -> dict:
    """Train and save the checkpoint (atomically: temp dir + rename); returns the run's summary."""
    out = Path(out_dir)
    if (out / "config.json").exists():
        raise FileExistsError(f"{out} already holds a checkpoint (config.json exists)")
    torch.manual_seed(spec.seed)
    cfg = {**TRAIN_CONFIG, **dict(spec.config_overrides)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=out.parent))
    try:
        text = corpus("train")
        write_tokenizer(tmp, cfg["vocab_size"], corpus_text=text)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
        model = TinyV3(cfg, spec.seed)
        params = model.trainable()
        opt = torch.optim.AdamW(params, lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
        t0, hist = time.perf_counter(), []
        data = batches(ids, spec)
        step = 0
        for step in range(1, spec.steps + 1):
            lr = spec.lr * min(1.0, step / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / spec.steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            x = next(data)
            loads: list = []
            logits, mtp = model.forward(x, loads)
            v = cfg["vocab_size"]
            main_loss = F.cross_entropy(logits[:, :-1].reshape(-1, v), x[:, 1:].reshape(-1))
            mtp_loss = F.cross_entropy(mtp[:, :-1].reshape(-1, v), x[:, 2:].reshape(-1))
            loss = main_loss + spec.mtp_lambda * mtp_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():        # auxiliary-loss-free balancing (V3 report, 2.1.2)
                for pre, count in loads:
                    bias = model.params[pre + "mlp.gate.e_score_correction_bias"]
                    bias += spec.bias_gamma * torch.sign(count.float().mean() - count.float())
            if step % 25 == 0 or step == 1:
                hist.append({"step": step, "loss": round(main_loss.item(), 4), "mtp_loss": round(mtp_loss.item(), 4),
                             "s": round(time.perf_counter() - t0, 1)})
                log(json.dumps(hist[-1]))
            if spec.max_seconds and time.perf_counter() - t0 > spec.max_seconds:
                break
        summary = {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "train_tokens": int(ids.numel()),
                   "history": hist, "spec": {k: v for k, v in spec.__dict__.items() if k != "config_overrides"},
                   "corpus": f"Python {'.'.join(map(str, __import__('sys').version_info[:3]))} standard library"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        (tmp / "training.json").write_text(json.dumps(summary, indent=1))
        save_file(model.state_dict(), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists() and not any(out.iterdir()):
            out.rmdir()
        os.replace(tmp, out)
        return summary
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
