"""Moving from one expert placement to the next with the fewest weight copies.

Owns: (1) `match_placement`: relabel the GPUs (whole nodes where the placement is
node-local) and the slots inside each GPU of a new placement, then trade replicas
between GPUs below the peak, so that as many slots as possible keep the expert they
hold now while the largest GPU load does not rise; (2) `plan_migration`: the copy
list that turns the old placement into the new one, each copy sourced from a live
replica where one exists.
Pure: no Ray, no I/O. Tensors or arrays in, arrays or dataclasses out.

Legend: L layers, R slots, G GPUs (ranks), N nodes, S = R / G slots per GPU.
Slot p lives on rank p // S; rank g on node g // (G / N).

Switch protocol assumed by the plan: ranks stage the copies (sources read from the
OLD placement, which stays live) and all ranks swap phy2log at the agreed step, so
a source slot being overwritten in the same switch is not a hazard.
"""

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Copy:
    """Slot dst_slot of layer must receive expert's weights from src_slot (None: checkpoint)."""
    layer: int
    dst_slot: int
    expert: int
    src_slot: int | None


@dataclass
class MigrationPlan:
    """All copies of one placement switch, in (layer, dst_slot) order."""
    copies: list[Copy] = field(default_factory=list)

    @property
    def n_copies(self) -> int:
        return len(self.copies)

    @property
    def n_from_checkpoint(self) -> int:
        return sum(c.src_slot is None for c in self.copies)


def plan_migration(old_phy2log, new_phy2log, num_gpus: int, gpus_per_node: int | None = None) -> MigrationPlan:
    """old, new [L, R] -> MigrationPlan: one Copy per slot whose expert changes.

    Source preference for expert e: an old slot on the destination rank itself, then
    one on the same node (when gpus_per_node is given), then any rank; among equals the
    source used least so far (spreads the sends); no old replica -> checkpoint (None).
    """
    old = np.asarray(torch.as_tensor(old_phy2log).cpu(), dtype=np.int64)
    new = np.asarray(torch.as_tensor(new_phy2log).cpu(), dtype=np.int64)
    if old.shape != new.shape or old.ndim != 2:
        raise ValueError(f"old and new phy2log must be [L, R] of one shape, got {old.shape} and {new.shape}")
    n_slots = old.shape[1]
    if num_gpus < 1 or n_slots % num_gpus:
        raise ValueError(f"num_gpus={num_gpus} must be >= 1 and divide the {n_slots} slots")
    if gpus_per_node is not None and (gpus_per_node < 1 or num_gpus % gpus_per_node):
        raise ValueError(f"gpus_per_node={gpus_per_node} must be >= 1 and divide num_gpus={num_gpus}")
    spg = n_slots // num_gpus
    gpn = gpus_per_node or num_gpus
    plan = MigrationPlan()
    for layer in np.flatnonzero((old != new).any(1)):
        by_expert = np.argsort(old[layer], kind="stable")
        bounds = np.searchsorted(old[layer][by_expert], np.arange(int(max(old.max(), new.max())) + 2))
        sends = np.zeros(n_slots, dtype=np.int64)
        for dst in np.flatnonzero(old[layer] != new[layer]):
            expert = int(new[layer, dst])
            holders = by_expert[bounds[expert]:bounds[expert + 1]]
            if not len(holders):
                plan.copies.append(Copy(int(layer), int(dst), expert, None))
                continue
            rank = holders // spg
            # lexicographic: same rank, then same node, then fewest sends, then lowest slot.
            key = np.lexsort((holders, sends[holders], rank // gpn != dst // spg // gpn, rank != dst // spg))
            src = int(holders[key[0]])
            sends[src] += 1
            plan.copies.append(Copy(int(layer), int(dst), expert, src))
    return plan


def copies_for_rank(plan: MigrationPlan, rank: int, slots_per_rank: int) -> list[Copy]:
    """The copies rank must stage: those whose dst_slot lives on it."""
    return [c for c in plan.copies if c.dst_slot // slots_per_rank == rank]


def match_placement(new, old, num_gpus: int, num_nodes: int = 1, keep_nodes=None,
                    slot_load=None, max_rounds: int = 64) -> np.ndarray:
    """Relabel new [L, R] to keep the most slots of old [L, R]; returns [L, R].

    1. GPUs: layers with keep_nodes[l] True move whole nodes (then GPUs inside each
       node) so a node-local placement stays node-local; other layers permute GPUs
       freely. Exact assignment problems; per-GPU loads unchanged.
    2. Slots inside a GPU follow the old GPU's slots (exact assignment).
    3. With slot_load [L, R] (load of each slot of new): replicas on two GPUs of one
       zone (node for keep_nodes layers, else all GPUs) trade places, in rounds, when
       that puts an expert back where it was, neither GPU rises above the layer's
       largest GPU load, and no GPU gets an expert twice. The max / mean balance is
       unchanged or better; the per-GPU loads below the peak may change.
    """
    new, old = np.asarray(new, dtype=np.int64), np.asarray(old, dtype=np.int64)
    n_layers, n_slots = new.shape
    spg, gpn = n_slots // num_gpus, num_gpus // num_nodes
    keep = np.zeros(n_layers, bool) if keep_nodes is None else np.asarray(keep_nodes, bool)
    keep &= num_nodes > 1
    nb, ob = new.reshape(n_layers, num_gpus, spg), old.reshape(n_layers, num_gpus, spg)
    # overlap[l, a, b]: experts shared by new GPU a and old GPU b.
    overlap = (nb[:, :, None, :, None] == ob[:, None, :, None, :]).sum((3, 4)).astype(float)
    target = np.empty((n_layers, num_gpus), dtype=np.int64)  # new GPU a -> old GPU label
    if (~keep).any():
        target[~keep] = assign(-overlap[~keep])
    if keep.any():
        k = int(keep.sum())
        blocks = overlap[keep].reshape(k, num_nodes, gpn, num_nodes, gpn).transpose(0, 1, 3, 2, 4)
        inner = assign(-blocks.reshape(-1, gpn, gpn))                     # [k*N*N, gpn]
        value = np.take_along_axis(blocks.reshape(-1, gpn, gpn), inner[:, :, None], 2).sum((1, 2))
        node_to = assign(-value.reshape(k, num_nodes, num_nodes))         # [k, N]
        inner = inner.reshape(k, num_nodes, num_nodes, gpn)
        chosen = np.take_along_axis(inner, node_to[:, :, None, None], 2)[:, :, 0]   # [k, N, gpn]
        target[keep] = (node_to[:, :, None] * gpn + chosen).reshape(k, num_gpus)
    src = np.empty((n_layers, num_gpus, spg), dtype=np.int64)  # src[l, p]: slot of new now in p
    np.put_along_axis(src, target[:, :, None], np.arange(n_slots).reshape(1, num_gpus, spg), 1)
    src = _align_slots(src.reshape(n_layers, n_slots), new, old, spg)
    if slot_load is not None:
        zone = np.where(keep, gpn, num_gpus)
        src = _trade_replicas(src, new, old, np.asarray(slot_load, dtype=float), num_gpus, zone, max_rounds)
        src = _align_slots(src, new, old, spg)
    return np.take_along_axis(new, src, 1)


def _align_slots(src, new, old, spg):
    """Permute slots inside each GPU so each expert sits where old had it. src, -> [L, R]."""
    n_layers, n_slots = src.shape
    cur = np.take_along_axis(new, src, 1).reshape(n_layers, -1, spg)
    same = cur[:, :, :, None] == old.reshape(cur.shape)[:, :, None, :]        # [L, G, S, S]
    slot = assign(-same.reshape(-1, spg, spg).astype(float)).reshape(cur.shape)
    out = np.empty_like(cur)
    np.put_along_axis(out, slot, src.reshape(cur.shape), 2)
    return out.reshape(n_layers, n_slots)


def _trade_replicas(src, new, old, slot_load, num_gpus, zone, max_rounds):
    """Step 3 of match_placement, in rounds over the layers still improving. -> src [L, R]."""
    src = src.copy()
    n_layers, n_slots = src.shape
    x = np.take_along_axis(slot_load, src, 1)
    g_load = x.reshape(n_layers, num_gpus, -1).sum(2)
    cap = g_load.max(1) * (1 + 1e-12)
    gpu = np.arange(n_slots) // (n_slots // num_gpus)
    active = np.arange(n_layers)
    for _ in range(max_rounds):
        if not len(active):
            break
        sub, p, q = _proposals(np.take_along_axis(new[active], src[active], 1), old[active],
                               x[active], g_load[active], cap[active], zone[active], gpu)
        ll = active[sub]
        d = x[ll, q] - x[ll, p]
        g_load[ll, gpu[p]] += d
        g_load[ll, gpu[q]] -= d
        src[ll, p], src[ll, q] = src[ll, q], src[ll, p]
        x[ll, p], x[ll, q] = x[ll, q], x[ll, p]
        active = np.unique(ll)
    return src


def _proposals(cur, old, x, g_load, cap, zone, gpu):
    """One round of trades. cur, old, x [B, R]; g_load [B, G]; cap, zone [B].

    Every slot p whose expert differs from old[p] proposes its best partner q: a slot
    of another GPU of its zone that holds old[p] and is not in place itself (gain 2 when
    q then matches too), with both GPUs staying <= cap and no expert twice on a GPU.
    A proposal is taken when it is the strongest at both of its GPUs, so taken trades
    touch disjoint GPUs and their checks hold together. -> (row, p, q) of taken trades.
    """
    b, n_slots = cur.shape
    n_gpus, n_experts = g_load.shape[1], int(max(cur.max(), old.max())) + 1
    lr, lr3 = np.arange(b)[:, None], np.arange(b)[:, None, None]
    holds = np.zeros((b, n_gpus, n_experts), dtype=bool)
    holds[lr, gpu[None, :], cur] = True
    cnt = np.zeros((b, n_experts), dtype=np.int64)
    np.add.at(cnt, (lr, cur), 1)
    start = np.cumsum(cnt, 1) - cnt
    k_max = int(cnt.max())
    kk = np.arange(k_max)
    # q[b, p, k]: the k-th slot of cur holding old[p]  (valid where k < its count)
    valid = kk < cnt[lr, old][:, :, None]                                  # [B, R, K]
    by_expert = np.argsort(cur, 1, kind="stable")
    pos = np.minimum(start[lr, old][:, :, None] + kk, n_slots - 1).reshape(b, -1)
    q = np.take_along_axis(by_expert, pos, 1).reshape(valid.shape)
    gp, gq = gpu[None, :, None], gpu[q]
    zone = zone[:, None, None]
    d = x[lr3, q] - x[:, :, None]                                          # load into p's GPU
    ok = valid & (cur != old)[:, :, None] & (gq != gp) & (gq // zone == gp // zone)
    ok &= cur[lr3, q] != old[lr3, q]
    ok &= (g_load[:, gpu][:, :, None] + d <= cap[:, None, None]) & (g_load[lr3, gq] - d <= cap[:, None, None])
    ok &= ~holds[lr, gpu[None, :], old][:, :, None] & ~holds[lr3, gq, cur[:, :, None]]
    gain = 1 + (old[lr3, q] == cur[:, :, None])                            # 2: q lands in place too
    tie = np.arange(n_slots * k_max).reshape(valid.shape[1:])               # unique priorities
    score = np.where(ok, gain * (n_slots * k_max) + tie, -1)
    kbest = score.argmax(2)
    prio = np.take_along_axis(score, kbest[:, :, None], 2)[:, :, 0]        # [B, R], unique per row
    qbest = np.take_along_axis(q, kbest[:, :, None], 2)[:, :, 0]
    top = np.full((b, n_gpus), -1, dtype=np.int64)
    rows = np.broadcast_to(lr, prio.shape)
    np.maximum.at(top, (rows, np.broadcast_to(gpu, prio.shape)), prio)
    np.maximum.at(top, (rows, gpu[qbest]), prio)
    take = (prio >= 0) & (top[:, gpu] == prio) & (top[lr, gpu[qbest]] == prio)
    sub, p = np.nonzero(take)
    return sub, p, qbest[sub, p]


def assign(cost: np.ndarray) -> np.ndarray:
    """Batched min-cost assignment: cost [B, n, n] -> col [B, n] (row i gets column col[i]).

    Hungarian method with potentials u, v (shortest augmenting paths, O(n^3) worst
    case). Start: u = row minima, and each row takes a free zero-reduced-cost column
    if it finds one; only the rows left over are augmented. The B problems advance in
    lockstep, one Dijkstra step per iteration; a problem whose path is found augments
    and starts its next pending row at once, so iterations ~ the longest problem.
    """
    b, n, _ = cost.shape
    a = np.zeros((b, n + 1, n + 1))                # row / column 0: the e-maxx sentinel
    a[:, 1:, 1:] = cost
    rows = np.arange(b)
    u, v = np.zeros((b, n + 1)), np.zeros((b, n + 1))
    u[:, 1:] = cost.min(2)
    match = np.zeros((b, n + 1), dtype=np.int64)   # match[j]: row holding column j, 0 = none
    way = np.zeros((b, n + 1), dtype=np.int64)
    tight = cost == u[:, 1:, None]
    for i in range(n):
        cand = tight[:, i] & (match[:, 1:] == 0)
        j = cand.argmax(1)
        ok = cand[rows, j]
        match[rows[ok], j[ok] + 1] = i + 1
    unmatched = np.ones((b, n + 1), dtype=bool)
    unmatched[rows[:, None], match] = False
    unmatched[:, 0] = False
    pending = np.argsort(~unmatched, 1, kind="stable")  # the unmatched rows first
    n_pending, ptr = unmatched.sum(1), np.zeros(b, dtype=np.int64)
    active = n_pending > 0
    match[:, 0] = np.where(active, pending[:, 0], 0)
    j0 = np.zeros(b, dtype=np.int64)
    minv, used = np.full((b, n + 1), np.inf), np.zeros((b, n + 1), dtype=bool)
    while active.any():
        used[rows[active], j0[active]] = True
        i0 = match[rows, j0]
        cur = a[rows, i0] - u[rows, i0][:, None] - v
        better = active[:, None] & ~used & (cur < minv)
        minv = np.where(better, cur, minv)
        way = np.where(better, j0[:, None], way)
        free = np.where(used, np.inf, minv)
        j1 = free.argmin(1)
        delta = np.where(active, free[rows, j1], 0.0)
        ur, uc = np.nonzero(used & active[:, None])
        u[ur, match[ur, uc]] += delta[ur]
        v -= np.where(used, delta[:, None], 0.0)
        minv -= np.where(used, 0.0, delta[:, None])
        j0 = np.where(active, j1, j0)
        done = active & (match[rows, j0] == 0)      # reached a free column: augment
        if done.any():
            jj = np.where(done, j0, 0)
            while (jj != 0).any():
                m = jj != 0
                prev = way[rows, jj]
                match[rows[m], jj[m]] = match[rows[m], prev[m]]
                jj = np.where(m, prev, jj)
            ptr[done] += 1
            active &= ~done | (ptr < n_pending)
            nxt = done & active
            match[nxt, 0] = pending[nxt, ptr[nxt]]
            j0[done], minv[done], used[done] = 0, np.inf, False
    col = np.empty((b, n), dtype=np.int64)
    col[rows[:, None], match[:, 1:] - 1] = np.arange(n)
    return col
