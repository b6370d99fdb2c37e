"""Expert-parallel load balancer: DeepSeek's EPLB contract, better placements.

Owns: the choice of replica counts and of the slot of every replica, per MoE layer.
Pure: no Ray, no I/O, no clock. `placement/eplb_baseline.py` is the reference it
must never lose to; `placement/migration.py` relabels its output to match the live
placement and plans the weight copies.

Legend: L layers, E logical experts, R slots (= num_replicas), G GPUs, N nodes,
S = R / G slots per GPU, B = L x candidate policies. Slot p lives on GPU p // S,
GPU g on node g // (G / N). Cost model: expert e's load splits evenly over its
logcnt[e] replicas; a GPU's load is the sum over its slots; objective: the
largest GPU load of each layer.

Per layer, candidate policies are built and the best kept (the reference's own steps are in
`placement/eplb_baseline.py`, after DeepSeek's deepseek-ai/EPLB:eplb.py):
  - hierarchical: whole groups on one node, every replica on its group's node;
  - hybrid: the first replica of each expert on its group's node, spares anywhere;
  - global: every replica anywhere;
  - reference: DeepSeek's placement, so the result can never be worse than it.
The most node-local one wins unless another lowers the largest GPU load by more
than LOCALITY_SLACK (locality bounds inter-node traffic under group-limited routing).
Each policy: replica counts (greedy by load per replica, at most one replica per
GPU in scope; for 2 slots per GPU, a local search against the exact pairing
objective), LPT packing that avoids two replicas of one expert on a GPU, swap
refinement of the heaviest GPU, then duplicate repair. All layers and policies are
packed together as one batch: the loops run over items, never over layers.

This file is ~390 lines, over the 300-line rule on purpose: counts, packing,
refinement and policy choice share the item arrays and are one algorithm.
"""

import numpy as np
import torch

from epserve.placement import eplb_baseline
from epserve.placement.migration import match_placement

LOCALITY_SLACK = 0.01  # relative max-GPU-load gain needed to leave the node-local policy
_TOL = 1e-9            # relative tolerance when comparing loads


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int,
                      *, current_phy2log=None):
    """weight [L, E] (tokens per expert, >= 0) -> (phy2log [L, R], log2phy [L, E, X], logcnt [L, E]).

    All int64; log2phy padded with -1 to X = the largest replica count. Every expert
    gets >= 1 replica, every slot is used. An all-zero layer is placed as if uniform.
    current_phy2log [L, R]: the live placement; GPUs (whole nodes, for node-local
    layers) and slots are relabelled, and replicas traded between GPUs below the peak,
    to keep as many experts in place as possible; the peak GPU load is not raised.
    """
    w = _validate(weight, num_replicas, num_groups, num_nodes, num_gpus, current_phy2log)
    n_layers, n_experts = w.shape
    w = np.where(w.sum(1, keepdims=True) > 0, w, 1.0)
    gpn = num_gpus // num_nodes
    load, ex, pin, gpu, is_local = _candidates(w, num_replicas, num_groups, num_nodes, num_gpus)
    gpu = _refine(gpu, load, ex, pin, num_gpus, gpn, n_experts, max_iter=4 * num_gpus)
    gpu = _repair_duplicates(gpu, load, ex, pin, num_gpus, gpn)

    # Most local policy within LOCALITY_SLACK of the best, and never above the reference.
    peak = _gpu_load(gpu, load, num_gpus).max(1).reshape(len(is_local), n_layers)
    limit = np.minimum(peak[:-1].min(0) * (1 + LOCALITY_SLACK), peak[-1]) * (1 + _TOL)
    fits = peak[:-1] <= limit
    choice = np.where(fits.any(0), fits.argmax(0), len(is_local) - 1)
    rows = choice * n_layers + np.arange(n_layers)
    slot_order = np.argsort(gpu[rows], axis=1, kind="stable")
    phy2log = np.take_along_axis(ex[rows], slot_order, 1)
    if current_phy2log is not None:
        old = torch.as_tensor(current_phy2log).cpu().numpy()
        phy2log = match_placement(phy2log, old, num_gpus, num_nodes, keep_nodes=is_local[choice],
                                  slot_load=np.take_along_axis(load[rows], slot_order, 1))
    phy2log = torch.from_numpy(np.ascontiguousarray(phy2log)).to(torch.int64)
    log2phy, logcnt = mappings(phy2log, n_experts)
    return phy2log, log2phy, logcnt


def _candidates(w, num_replicas, num_groups, num_nodes, num_gpus):
    """Every policy's items for all layers, stacked policy-major: B = L x policies.

    Returns load, expert, pin (node or -1), gpu [B, R] and is_local [policies], in the
    order hierarchical, hybrid (both only when groups split evenly over > 1 node),
    global, reference. Our policies are LPT-packed here; the reference comes packed.
    """
    n_layers, n_experts = w.shape
    gpn, spg = num_gpus // num_nodes, num_replicas // num_gpus
    counts = _greedy_counts(w, num_replicas, num_gpus)
    if spg == 2:
        counts = _search_pair_counts(w, counts, num_gpus)
    load, ex = _items(w, counts)
    pins, is_local = [np.full_like(ex, -1)], [False]
    is_hier = num_nodes > 1 and num_groups % num_nodes == 0
    if is_hier:
        node_of_expert = np.repeat(_groups_to_nodes(w, num_groups, num_nodes), n_experts // num_groups, 1)
        local_counts = _node_counts(w, node_of_expert, num_replicas // num_nodes, num_nodes, gpn)
        local_load, local_ex = _items(w, local_counts)
        primary = np.diff(ex, axis=1, prepend=-1) != 0
        hybrid_pin = np.where(primary, np.take_along_axis(node_of_expert, ex, 1), -1)
        load, ex = np.concatenate([local_load, load, load]), np.concatenate([local_ex, ex, ex])
        pins, is_local = [np.take_along_axis(node_of_expert, local_ex, 1), hybrid_pin, pins[0]], [True, True, False]
    gpu = _lpt(load, ex, np.concatenate(pins), num_gpus, gpn, n_experts)

    # The reference placement is a candidate too (refined with the others), so the
    # result never loses to it; it wins only in corner cases where a duplicate helps.
    ref = eplb_baseline.rebalance_experts(torch.from_numpy(w), num_replicas, num_groups, num_nodes, num_gpus)[0]
    ref = ref.numpy()
    ref_gpu = np.broadcast_to(np.arange(num_replicas) // spg, ref.shape)
    ref_count = np.stack([np.bincount(r, minlength=n_experts) for r in ref])
    pins.append(ref_gpu // gpn if is_hier else np.full_like(ref, -1))
    is_local.append(is_hier)
    load = np.concatenate([load, np.take_along_axis(w / ref_count, ref, 1)])
    return (load, np.concatenate([ex, ref]), np.concatenate(pins), np.concatenate([gpu, ref_gpu]),
            np.array(is_local))


def gpu_loads(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """weight [L, E], phy2log [L, R] -> load of each GPU [L, G] (float64), tokens split evenly."""
    w = torch.as_tensor(weight, dtype=torch.float64).cpu()
    phy2log = torch.as_tensor(phy2log, dtype=torch.int64).cpu()
    cnt = torch.zeros_like(w).scatter_add_(1, phy2log, torch.ones_like(phy2log, dtype=torch.float64))
    per_slot = (w / cnt.clamp(min=1)).gather(1, phy2log)
    return per_slot.view(w.shape[0], num_gpus, -1).sum(-1)


def balancedness(weight, phy2log, num_gpus: int) -> torch.Tensor:
    """[L]: max / mean GPU load per layer (1.0 = perfect; 1.0 for an all-zero layer)."""
    g = gpu_loads(weight, phy2log, num_gpus)
    mean = g.mean(1)
    return torch.where(mean > 0, g.max(1).values / mean.clamp(min=1e-300), torch.ones_like(mean))


def mappings(phy2log: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """phy2log [L, R] -> (log2phy [L, E, X] padded -1, logcnt [L, E]); replicas in slot order."""
    n_layers, n_slots = phy2log.shape
    logcnt = torch.zeros(n_layers, num_experts, dtype=torch.int64)
    logcnt.scatter_add_(1, phy2log, torch.ones_like(phy2log))
    order = phy2log.argsort(dim=1, stable=True)                   # slots grouped by expert
    expert = phy2log.gather(1, order)
    start = logcnt.cumsum(1) - logcnt
    rank = torch.arange(n_slots).expand(n_layers, -1) - start.gather(1, expert)
    log2phy = torch.full((n_layers, num_experts, int(logcnt.max())), -1, dtype=torch.int64)
    layer = torch.arange(n_layers).unsqueeze(1).expand(-1, n_slots)
    log2phy[layer, expert, rank] = order
    return log2phy, logcnt


# ---- validation -------------------------------------------------------------------

def _validate(weight, num_replicas, num_groups, num_nodes, num_gpus, current) -> np.ndarray:
    for name, val in (("num_replicas", num_replicas), ("num_groups", num_groups),
                      ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {val!r}")
    w = torch.as_tensor(weight).detach().cpu().double().numpy()
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise ValueError(f"weight must be 2-D [layers, experts] with both >= 1, got shape {tuple(w.shape)}")
    if not np.isfinite(w).all() or (w < 0).any():
        bad = np.argwhere(~np.isfinite(w) | (w < 0))[0]
        raise ValueError(f"weight must be finite and >= 0, got {w[tuple(bad)]} at [layer {bad[0]}, expert {bad[1]}]")
    n_layers, n_experts = w.shape
    if num_replicas < n_experts:
        raise ValueError(f"num_replicas={num_replicas} must be >= the number of experts {n_experts}")
    if num_replicas % num_gpus:
        raise ValueError(f"num_replicas={num_replicas} must be a multiple of num_gpus={num_gpus}")
    if num_gpus % num_nodes:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if n_experts % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide the number of experts {n_experts}")
    if current is not None:
        cur = torch.as_tensor(current)
        if tuple(cur.shape) != (n_layers, num_replicas) or cur.is_floating_point():
            raise ValueError(f"current_phy2log must be an integer tensor of shape ({n_layers}, {num_replicas}), "
                             f"got {cur.dtype} {tuple(cur.shape)}")
        if cur.numel() and (cur.min() < 0 or cur.max() >= n_experts):
            raise ValueError(f"current_phy2log values must lie in [0, {n_experts}), "
                             f"got [{int(cur.min())}, {int(cur.max())}]")
    return w


# ---- replica counts ---------------------------------------------------------------

def _greedy_counts(w: np.ndarray, total: int, cap: int) -> np.ndarray:
    """w [B, n] -> counts [B, n] summing to total: each spare to the highest w / count,
    never above cap (the GPUs in scope) unless every expert is at cap."""
    counts = np.ones(w.shape, dtype=np.int64)
    rows = np.arange(w.shape[0])
    for _ in range(total - w.shape[1]):
        per_replica = w / counts
        capped = np.where(counts < cap, per_replica, -1.0)
        pick = np.where(capped.max(1) >= 0, capped.argmax(1), per_replica.argmax(1))
        counts[rows, pick] += 1
    return counts


def _pair_peak(w: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exact max GPU load with 2 slots per GPU (largest replica with smallest).
    w [B, n], counts [B, K, n] -> [B, K]."""
    b, k, _ = counts.shape
    per_replica = np.broadcast_to((w[:, None, :] / counts), counts.shape)
    x = np.sort(np.repeat(per_replica.ravel(), counts.ravel()).reshape(b, k, -1), -1)
    half = x.shape[-1] // 2
    return (x[..., :half] + x[..., ::-1][..., :half]).max(-1)


def _search_pair_counts(w, counts, cap, iters=16, n_donors=8, n_hot=8, n_cold=16):
    """Local search on counts [B, n] for 2 slots per GPU: move one replica from a
    donor (smallest w / (c - 1)) to a hot or a cold expert while the exact peak drops.
    Spares given to cold experts become small partners for hot replicas."""
    b_all, n = w.shape
    counts = counts.copy()
    peak = _pair_peak(w, counts[:, None])[:, 0]
    active = np.arange(b_all)
    for _ in range(iters):
        if not len(active):
            break
        wa, ca = w[active], counts[active]
        order = np.argsort(-(wa / ca), 1, kind="stable")
        receivers = np.concatenate([order[:, :n_hot], order[:, np.linspace(n // 2, n - 1, n_cold).astype(int)]], 1)
        donor_piece = np.where(ca >= 2, wa / np.maximum(ca - 1, 1), np.inf)
        donors = np.argsort(donor_piece, 1, kind="stable")[:, :n_donors]
        rec = np.repeat(receivers, donors.shape[1], 1)
        don = np.tile(donors, (1, receivers.shape[1]))
        ok = ((rec != don) & np.isfinite(np.take_along_axis(donor_piece, don, 1))
              & (np.take_along_axis(ca, rec, 1) < cap))
        k = rec.shape[1]
        trial = np.repeat(ca[:, None], k, 1)
        bi, ki = np.repeat(np.arange(len(active)), k), np.tile(np.arange(k), len(active))
        trial[bi, ki, don.ravel()] -= ok.ravel()
        trial[bi, ki, rec.ravel()] += ok.ravel()
        val = np.where(ok, _pair_peak(wa, trial), np.inf)
        pick = val.argmin(1)
        new_peak = val[np.arange(len(active)), pick]
        better = new_peak < peak[active] * (1 - _TOL)
        counts[active[better]] = trial[better, pick[better]]
        peak[active[better]] = new_peak[better]
        active = active[better]
    return counts


def _node_counts(w, node_of_expert, slots_per_node, num_nodes, gpus_per_node):
    """Hierarchical counts: each node's experts share its slots_per_node slots. -> [L, E]."""
    n_layers, n_experts = w.shape
    by_node = np.argsort(node_of_expert, 1, kind="stable")      # experts, node by node
    local = np.take_along_axis(w, by_node, 1).reshape(n_layers * num_nodes, -1)
    c = _greedy_counts(local, slots_per_node, gpus_per_node).reshape(n_layers, n_experts)
    counts = np.empty_like(c)
    np.put_along_axis(counts, by_node, c, 1)
    return counts


def _items(w, counts):
    """counts [B, E] (rows sum to R) -> (replica load [B, R], expert [B, R]), experts ascending."""
    b, n = counts.shape
    ex = np.repeat(np.tile(np.arange(n), b), counts.ravel()).reshape(b, -1)
    return np.take_along_axis(w / counts, ex, 1), ex


def _groups_to_nodes(w, num_groups, num_nodes):
    """Whole groups onto nodes, the same number per node, by group load. -> [L, num_groups]."""
    group_load = w.reshape(w.shape[0], num_groups, -1).sum(-1)
    ids = np.broadcast_to(np.arange(num_groups), group_load.shape)
    free = np.full(group_load.shape, -1)
    node = _lpt(group_load, ids, free, num_nodes, num_nodes, num_groups)
    return _refine(node, group_load, ids, free, num_nodes, num_nodes, num_groups, max_iter=4 * num_nodes)


# ---- packing ----------------------------------------------------------------------

def _gpu_load(gpu, load, num_gpus):
    """gpu, load [B, R] -> [B, G]."""
    b = gpu.shape[0]
    flat = (gpu + num_gpus * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, weights=load.ravel(), minlength=b * num_gpus).reshape(b, num_gpus)


def _lpt(load, ex, pin, num_gpus, gpus_per_node, num_experts):
    """Items [B, R] (load, expert, pinned node or -1) -> GPU per item [B, R].

    Heaviest item first, onto the lightest GPU with a free slot (R / G slots each) that
    its pin allows and that does not hold its expert yet (if any such GPU exists).
    A free item never takes a node's last slots still owed to that node's pinned items.
    """
    b, n_items = load.shape
    per_gpu = n_items // num_gpus
    node = np.arange(num_gpus) // gpus_per_node
    n_nodes = num_gpus // gpus_per_node
    rows = np.arange(b)
    order = np.argsort(-load, 1, kind="stable")
    gpu = np.empty((b, n_items), dtype=np.int64)
    g_load = np.zeros((b, num_gpus))
    room = np.full((b, num_gpus), per_gpu)
    holds = np.zeros((b, num_gpus, num_experts), dtype=bool)
    node_room = np.full((b, n_nodes), per_gpu * gpus_per_node)
    owed = np.stack([(pin == k).sum(1) for k in range(n_nodes)], 1)
    for j in range(n_items):
        it = order[:, j]
        x, e, p = load[rows, it], ex[rows, it], pin[rows, it]
        spare = (node_room - owed)[:, node] > 0
        ok = (room > 0) & np.where(p[:, None] >= 0, node[None, :] == p[:, None], spare)
        fresh = ok & ~holds[rows, :, e]
        ok = np.where(fresh.any(1, keepdims=True), fresh, ok)
        g = np.where(ok, g_load, np.inf).argmin(1)
        gpu[rows, it] = g
        g_load[rows, g] += x
        room[rows, g] -= 1
        holds[rows, g, e] = True
        node_room[rows, node[g]] -= 1
        owed[rows, node[g]] -= p >= 0
    return gpu


def _refine(gpu, load, ex, pin, num_gpus, gpus_per_node, num_experts, max_iter):
    """Swap refinement: repeatedly swap one item of the heaviest GPU with one item
    elsewhere when that lowers the pair's larger load below the heaviest load, keeping
    pins and creating no duplicate. Returns the new gpu [B, R]."""
    gpu = gpu.copy()
    b, n_items = gpu.shape
    per_gpu = n_items // num_gpus
    node = np.arange(num_gpus) // gpus_per_node
    g_load = _gpu_load(gpu, load, num_gpus)
    holds = np.zeros((b, num_gpus, num_experts), dtype=np.int16)
    np.add.at(holds, (np.arange(b)[:, None], gpu, ex), 1)
    active = np.arange(b)
    for _ in range(max_iter):
        if not len(active):
            break
        r = np.arange(len(active))
        gb, xb, eb, pb, lb = gpu[active], load[active], ex[active], pin[active], g_load[active]
        h = lb.argmax(1)
        top = lb[r, h]
        on_h = np.argsort(gb != h[:, None], 1, kind="stable")[:, :per_gpu]      # [n, S]
        xa, ea, pa = (np.take_along_axis(a, on_h, 1) for a in (xb, eb, pb))
        d = xa[:, :, None] - xb[:, None, :]                                     # [n, S, R]
        new_peak = np.maximum(top[:, None, None] - d, np.take_along_axis(lb, gb, 1)[:, None, :] + d)
        ok = (d > 0) & (new_peak < top[:, None, None] * (1 - _TOL)) & (gb != h[:, None])[:, None, :]
        ok &= (pa[:, :, None] < 0) | (pa[:, :, None] == node[gb][:, None, :])
        ok &= ((pb < 0) | (pb == node[h][:, None]))[:, None, :]
        ok &= holds[active[:, None, None], gb[:, None, :], ea[:, :, None]] == 0
        ok &= (holds[active[:, None], h[:, None], eb] == 0)[:, None, :]
        score = np.where(ok, new_peak, np.inf).reshape(len(active), -1)
        k = score.argmin(1)
        found = np.isfinite(score[r, k])
        active, r, k, h = active[found], r[found], k[found], h[found]
        a, q = on_h[r, k // n_items], k % n_items
        _swap(gpu, g_load, holds, load, ex, active, a, q, h)
    return gpu


def _swap(gpu, g_load, holds, load, ex, rows, a, q, h):
    """In place: item a (on GPU h) and item q trade GPUs, for each row in rows."""
    g = gpu[rows, q]
    xa, xq, ea, eq = load[rows, a], load[rows, q], ex[rows, a], ex[rows, q]
    gpu[rows, a], gpu[rows, q] = g, h
    g_load[rows, h] += xq - xa
    g_load[rows, g] += xa - xq
    holds[rows, h, ea] -= 1
    holds[rows, g, ea] += 1
    holds[rows, g, eq] -= 1
    holds[rows, h, eq] += 1


def _repair_duplicates(gpu, load, ex, pin, num_gpus, gpus_per_node):
    """Where a GPU still holds one expert twice, swap one copy with an item elsewhere if
    that keeps pins, adds no duplicate and does not raise the layer's peak. Rare: per row."""
    gpu = gpu.copy()
    node = np.arange(num_gpus) // gpus_per_node
    n_keys = int(ex.max()) + 1
    key = np.sort(gpu * n_keys + ex, 1)
    for row in np.flatnonzero((np.diff(key, axis=1) == 0).any(1)):
        g_load = _gpu_load(gpu[row:row + 1], load[row:row + 1], num_gpus)[0]
        while _repair_one(gpu[row], load[row], ex[row], pin[row], g_load, node, n_keys):
            pass
    return gpu


def _repair_one(gpu, load, ex, pin, g_load, node, n_keys) -> bool:
    """One row, in place: fix one duplicate if any can be fixed; True if one was."""
    _, inverse, cnt = np.unique(gpu * n_keys + ex, return_inverse=True, return_counts=True)
    for a in np.flatnonzero(cnt[inverse] > 1):
        h, e = gpu[a], ex[a]
        holds_e = np.isin(gpu, gpu[ex == e])                     # q's GPU already holds e
        d = load[a] - load                                        # load moving from h to q's GPU
        peak = np.maximum(g_load[h] - d, g_load[gpu] + d)
        ok = ((gpu != h) & ~holds_e & ~np.isin(ex, ex[gpu == h])
              & ((pin[a] < 0) | (pin[a] == node[gpu])) & ((pin < 0) | (pin == node[h]))
              & (peak <= g_load.max() * (1 + _TOL)))
        if ok.any():
            q = int(np.argmin(np.where(ok, peak, np.inf)))
            g = gpu[q]
            gpu[a], gpu[q] = g, h
            g_load[h] -= d[q]
            g_load[g] += d[q]
            return True
    return False
