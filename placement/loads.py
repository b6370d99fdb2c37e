"""Seeded synthetic per-expert loads: what EPLB's bench places and what the emulated EP rank
(model/ep_emulate.py) receives. Pure: numpy in, a tensor out; no clock, no I/O.

Kinds (each layer's routed-token counts over its experts, rounded, summing to `tokens`):
  zipf        popularity ~ 1 / rank (exponent 1), a different ranking per layer: max/mean ~42 at 256 experts
  lognormal   lognormal(0, 1) per expert: max/mean ~9 at 256 experts
  hot_expert  lognormal(0, 0.3), one expert per layer with ~40x the typical load
  hot_group   lognormal(0, 0.5), one or two expert groups x12
  equal       every expert the same load
  dead        lognormal(0, 1) with a quarter of the experts never routed and layer 0 all idle
"""
from __future__ import annotations

import numpy as np
import torch

KINDS = ("zipf", "lognormal", "hot_expert", "hot_group", "equal", "dead")
N_LAYERS, N_EXPERTS, TOKENS = 58, 256, 65536  # tokens x top-8 routed per window


def synthetic_loads(kind: str, rng: np.random.Generator, n_layers: int = N_LAYERS,
                    n_experts: int = N_EXPERTS, num_groups: int = 8, tokens: int = TOKENS) -> torch.Tensor:
    """[n_layers, n_experts] float64 routed-token counts of one kind (see KINDS)."""
    shape = (n_layers, n_experts)
    if kind == "zipf":        # popularity ~ 1 / rank, a different ranking per layer
        w = 1.0 / np.arange(1, n_experts + 1) ** 1.0
        w = np.stack([rng.permutation(w) for _ in range(n_layers)])
    elif kind == "lognormal":
        w = rng.lognormal(0.0, 1.0, shape)
    elif kind == "hot_expert":  # one expert per layer with ~40x the typical load
        w = rng.lognormal(0.0, 0.3, shape)
        w[np.arange(n_layers), rng.integers(0, n_experts, n_layers)] *= 40
    elif kind == "hot_group":   # one or two groups carry most of the load
        w = rng.lognormal(0.0, 0.5, shape).reshape(n_layers, num_groups, -1)
        for layer in range(n_layers):
            w[layer, rng.choice(num_groups, rng.integers(1, 3), replace=False)] *= 12
        w = w.reshape(shape)
    elif kind == "equal":
        w = np.ones(shape)
    elif kind == "dead":        # a quarter of the experts never routed; layer 0 all idle
        w = rng.lognormal(0.0, 1.0, shape)
        w[rng.random(shape) < 0.25] = 0
        w[0] = 0
    else:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    total = w.sum(1, keepdims=True)
    return torch.from_numpy(np.round(w * tokens / np.where(total > 0, total, 1)))
