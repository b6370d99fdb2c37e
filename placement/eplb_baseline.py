"""DeepSeek's EPLB (deepseek-ai/EPLB:eplb.py, 2025-03), re-implemented as the yardstick.

Owns: the reference placement algorithm, unchanged in substance, so that
`placement/eplb.py` can be measured against it on the same inputs. It must never
grow improvements; fixes belong in `placement/eplb.py`.

Algorithm (as deepseek-ai/EPLB:eplb.py does it):
  - balanced packing: items by weight descending, each to the lightest pack that
    still has room; every pack takes the same number of items;
  - replication: each spare slot goes to the expert with the highest weight / count;
  - hierarchical (num_groups % num_nodes == 0): groups -> nodes by packing, replicate
    inside each node to R / N slots, pack each node's replicas onto its GPUs;
  - global otherwise: the hierarchical policy with one group and one node.

The reference loops in Python per layer; here the loops run over items or slots with
every layer at once (same decisions, ties broken by lowest index as the reference's
`min`/`max` do). Its known weak spots (duplicates on one GPU, all spares to expert 0
on an all-zero layer, `assert` on bad divisibility) are kept on purpose.

Legend: L layers, E logical experts, R physical slots (replicas), G GPUs, N nodes.
"""

import torch


def balanced_packing(weight: torch.Tensor, num_packs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack n items into num_packs packs of n / num_packs items each, LPT-greedy.

    weight: [L, n] float. Returns (pack_index [L, n], rank_in_pack [L, n]) int64.
    """
    num_layers, num_items = weight.shape
    assert num_items % num_packs == 0, f"{num_items} items do not split into {num_packs} packs"
    per_pack = num_items // num_packs
    if per_pack == 1:
        idx = torch.arange(num_items, dtype=torch.int64).expand(num_layers, -1).clone()
        return idx, torch.zeros_like(idx)

    rows = torch.arange(num_layers)
    order = weight.float().sort(dim=-1, descending=True, stable=True).indices
    pack_index = torch.full((num_layers, num_items), -1, dtype=torch.int64)
    rank_in_pack = torch.full_like(pack_index, -1)
    pack_weight = torch.zeros(num_layers, num_packs, dtype=torch.float64)
    pack_count = torch.zeros(num_layers, num_packs, dtype=torch.int64)
    for j in range(num_items):
        item = order[:, j]
        # lightest pack with room; argmin returns the first minimum, like min(..., key=).
        open_weight = torch.where(pack_count < per_pack, pack_weight, torch.inf)
        pack = open_weight.argmin(-1)
        pack_index[rows, item] = pack
        rank_in_pack[rows, item] = pack_count[rows, pack]
        pack_weight[rows, pack] += weight[rows, item].double()
        pack_count[rows, pack] += 1
    return pack_index, rank_in_pack


def replicate_experts(weight: torch.Tensor, num_phy: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give num_phy - n spare replicas, one at a time, to the highest weight / count.

    weight: [L, n]. Returns (phy2log [L, num_phy], rank [L, num_phy] = replica index of
    each slot within its expert, logcnt [L, n]), all int64. Slot p < n holds expert p.
    """
    num_layers, num_log = weight.shape
    assert num_phy >= num_log, f"{num_phy} slots cannot hold {num_log} experts"
    rows = torch.arange(num_layers)
    phy2log = torch.arange(num_phy, dtype=torch.int64).repeat(num_layers, 1)
    rank = torch.zeros(num_layers, num_phy, dtype=torch.int64)
    logcnt = torch.ones(num_layers, num_log, dtype=torch.int64)
    for p in range(num_log, num_phy):
        hottest = (weight / logcnt).max(-1).indices
        phy2log[:, p] = hottest
        rank[:, p] = logcnt[rows, hottest]
        logcnt[rows, hottest] += 1
    return phy2log, rank, logcnt


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """Row-wise inverse of a permutation [L, n]."""
    inv = torch.empty_like(perm)
    inv.scatter_(1, perm, torch.arange(perm.size(1), dtype=torch.int64).expand(perm.shape))
    return inv


def rebalance_experts_hierarchical(
    weight: torch.Tensor, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hierarchical policy. weight [L, E] -> (phy2log [L, R], phy rank [L, R], logcnt [L, E])."""
    num_layers, num_log = weight.shape
    assert num_log % num_groups == 0
    group_size = num_log // num_groups
    assert num_groups % num_nodes == 0
    groups_per_node = num_groups // num_nodes
    assert num_gpus % num_nodes == 0
    assert num_physical % num_gpus == 0
    slots_per_gpu = num_physical // num_gpus
    log_per_node = num_log // num_nodes

    # 1. whole groups -> nodes, the same number of groups per node.
    group_load = weight.unflatten(-1, (num_groups, group_size)).sum(-1)
    group_pack, group_rank = balanced_packing(group_load, num_nodes)
    # "mlog": experts renumbered node by node (node n owns mlog n*E/N .. (n+1)*E/N - 1).
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size).unsqueeze(-1)
                + torch.arange(group_size, dtype=torch.int64)).flatten(-2)
    mlog2log = _inverse(log2mlog)

    # 2. replicate inside each node: [L * N, E / N] -> R / N slots per node.
    mlog_load = weight.gather(-1, mlog2log).view(-1, log_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(mlog_load, num_physical // num_nodes)

    # 3. a node's replicas -> its GPUs, by per-replica load.
    phy_load = (mlog_load / mlogcnt).gather(-1, phy2mlog)
    pack, rank_in_pack = balanced_packing(phy_load, num_gpus // num_nodes)
    phy2pphy = pack * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)

    pphy2mlog = phy2mlog.gather(-1, pphy2phy)
    node_offset = torch.arange(0, num_log, log_per_node, dtype=torch.int64).view(1, -1, 1)
    pphy2mlog = (pphy2mlog.view(num_layers, num_nodes, -1) + node_offset).flatten(-2)
    pphy2log = mlog2log.gather(-1, pphy2mlog)
    pphy_rank = phy_rank.gather(-1, pphy2phy).view(num_layers, -1)
    logcnt = mlogcnt.view(num_layers, -1).gather(-1, log2mlog)
    return pphy2log, pphy_rank, logcnt


def rebalance_experts(
    weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference EPLB entry point.

    weight: [L, E] load per logical expert. Returns
      phy2log [L, R]: logical expert in each slot;
      log2phy [L, E, X]: slots of each expert, padded with -1 (X = max count);
      logcnt [L, E]: replicas per expert. All int64.
    """
    num_layers, num_log = weight.shape
    weight = weight.float().cpu()
    if num_groups % num_nodes == 0:
        phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, num_groups, num_nodes, num_gpus)
    else:
        phy2log, phy_rank, logcnt = rebalance_experts_hierarchical(
            weight, num_replicas, 1, 1, num_gpus)
    max_cnt = int(logcnt.max().item())
    log2phy = torch.full((num_layers, num_log, max_cnt), -1, dtype=torch.int64)
    log2phy.view(num_layers, -1).scatter_(
        -1, phy2log * max_cnt + phy_rank,
        torch.arange(num_replicas, dtype=torch.int64).expand(num_layers, -1))
    return phy2log, log2phy, logcnt
