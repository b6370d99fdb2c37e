"""placement/eplb.py (the default) and placement/eplb_baseline.py (the reference).

Validity on every input for both; the default never worse than the reference and
better on average at production shapes; no avoidable duplicate on a GPU; bad inputs
raise ValueError naming the argument; a loose timing bound. Seeded throughout.
"""

import time

import numpy as np
import pytest
import torch

from epserve.bench.eplb import KINDS, SHAPES, synthetic_loads
from epserve.placement import eplb, eplb_baseline

ALGOS = {"baseline": eplb_baseline.rebalance_experts, "improved": eplb.rebalance_experts}

# (layers, experts, num_replicas, num_groups, num_nodes, num_gpus)
SMALL = [
    (3, 16, 16, 4, 2, 4),    # no spare slot, hierarchical
    (3, 16, 24, 4, 2, 4),    # hierarchical, 6 slots per GPU
    (3, 16, 24, 4, 3, 6),    # groups % nodes != 0: global
    (2, 12, 18, 3, 1, 3),    # one node
    (4, 8, 16, 2, 2, 8),     # 2 slots per GPU, hierarchical allowed
    (2, 6, 12, 1, 1, 1),     # a single GPU
    (2, 4, 12, 2, 2, 2),     # more replicas than GPUs: duplicates unavoidable
    (3, 64, 96, 8, 4, 16),   # mid-size
]
LOADS = ["lognormal", "integers", "one_hot", "equal", "with_zero_layer"]


def small_weight(kind, n_layers, n_experts, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        w = rng.lognormal(0, 1, (n_layers, n_experts))
    elif kind == "integers":
        w = rng.integers(0, 6, (n_layers, n_experts)).astype(float)
    elif kind == "one_hot":
        w = np.ones((n_layers, n_experts))
        w[:, rng.integers(0, n_experts)] = 100
    elif kind == "equal":
        w = np.full((n_layers, n_experts), 7.0)
    else:
        w = rng.lognormal(0, 1, (n_layers, n_experts))
        w[0] = 0
    return torch.tensor(w)


def assert_valid(weight, out, num_replicas, num_gpus):
    """The EPLB contract: shapes, dtypes, logcnt and log2phy consistent with phy2log."""
    phy2log, log2phy, logcnt = out
    n_layers, n_experts = weight.shape
    assert phy2log.shape == (n_layers, num_replicas) and phy2log.dtype == torch.int64
    assert logcnt.shape == (n_layers, n_experts) and logcnt.dtype == torch.int64
    assert log2phy.shape[:2] == (n_layers, n_experts) and log2phy.dtype == torch.int64
    assert log2phy.shape[2] == int(logcnt.max())
    assert phy2log.min() >= 0 and phy2log.max() < n_experts
    counted = torch.zeros_like(logcnt).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    assert torch.equal(counted, logcnt)
    assert (logcnt >= 1).all(), "every expert needs a replica"
    assert (logcnt.sum(1) == num_replicas).all(), "every slot used once"
    slots = torch.arange(num_replicas).expand(n_layers, -1)
    for k in range(log2phy.shape[2]):
        has = k < logcnt
        assert ((log2phy[..., k] == -1) == ~has).all(), "padding is exactly the missing replicas"
        slot = log2phy[..., k].clamp(min=0)
        assert (phy2log.gather(1, slot)[has] == torch.arange(n_experts).expand(n_layers, -1)[has]).all()
    # each slot listed exactly once in log2phy
    listed = log2phy[log2phy >= 0].view(-1)
    assert listed.numel() == n_layers * num_replicas
    assert torch.equal(torch.sort(log2phy.view(n_layers, -1), 1).values[:, -num_replicas:], slots)


def avoidable_duplicates(phy2log, logcnt, num_gpus, limit):
    """Slots repeating an expert already on their GPU although logcnt[e] <= limit."""
    n_layers = phy2log.shape[0]
    per_gpu = phy2log.view(n_layers, num_gpus, -1).sort(-1).values
    dup = per_gpu[..., 1:] == per_gpu[..., :-1]
    cnt = logcnt.gather(1, per_gpu[..., 1:].reshape(n_layers, -1)).view(dup.shape)
    return int((dup & (cnt <= limit)).sum())


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("kind", LOADS)
@pytest.mark.parametrize("case", SMALL, ids=lambda c: "x".join(map(str, c)))
def test_valid_small(algo, kind, case):
    n_layers, n_experts, num_replicas, num_groups, num_nodes, num_gpus = case
    weight = small_weight(kind, n_layers, n_experts)
    out = ALGOS[algo](weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert_valid(weight, out, num_replicas, num_gpus)


@pytest.mark.parametrize("kind", LOADS)
@pytest.mark.parametrize("case", SMALL, ids=lambda c: "x".join(map(str, c)))
def test_improved_never_worse_small(kind, case):
    n_layers, n_experts, num_replicas, num_groups, num_nodes, num_gpus = case
    weight = small_weight(kind, n_layers, n_experts, seed=1)
    ref = eplb_baseline.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)[0]
    new, _, logcnt = eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    live = weight.sum(1) > 0  # the reference sends every spare of an all-zero layer to expert 0
    assert (eplb.balancedness(weight, new, num_gpus)[live]
            <= eplb.balancedness(weight, ref, num_gpus)[live] * (1 + 1e-6)).all()


def test_reference_matches_published_example():
    # deepseek-ai/EPLB README: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
    weight = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                           [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    phy2log, log2phy, logcnt = eplb_baseline.rebalance_experts(weight, 16, 4, 2, 8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert_valid(weight, (phy2log, log2phy, logcnt), 16, 8)
    new = eplb.rebalance_experts(weight, 16, 4, 2, 8)[0]
    assert (eplb.balancedness(weight, new, 8) < eplb.balancedness(weight, phy2log, 8)).all()


@pytest.fixture(scope="module")
def production():
    """{(shape, kind): (weight, reference out, default out, default ms)} at production shapes."""
    runs = {}
    for shape_name, shape in SHAPES.items():
        rng = np.random.default_rng(0)
        for kind in KINDS:
            weight = synthetic_loads(kind, rng, num_groups=shape["num_groups"])
            start = time.perf_counter()
            new = eplb.rebalance_experts(weight, **shape)
            ms = (time.perf_counter() - start) * 1e3
            runs[shape_name, kind] = (weight, eplb_baseline.rebalance_experts(weight, **shape), new, ms)
    return runs


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_production_valid_never_worse_better_on_average(production, shape_name):
    shape = SHAPES[shape_name]
    ref_all, new_all = [], []
    for kind in KINDS:
        weight, ref, new, _ = production[shape_name, kind]
        assert_valid(weight, ref, shape["num_replicas"], shape["num_gpus"])
        assert_valid(weight, new, shape["num_replicas"], shape["num_gpus"])
        ref_bal = eplb.balancedness(weight, ref[0], shape["num_gpus"])
        new_bal = eplb.balancedness(weight, new[0], shape["num_gpus"])
        live = weight.sum(1) > 0
        assert (new_bal[live] <= ref_bal[live] * (1 + 1e-6)).all(), kind
        ref_all.append(ref_bal[live])
        new_all.append(new_bal[live])
    assert torch.cat(new_all).mean() < torch.cat(ref_all).mean()


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_production_no_duplicate_on_a_gpu(production, shape_name):
    num_gpus = SHAPES[shape_name]["num_gpus"]
    for kind in KINDS:
        phy2log, _, logcnt = production[shape_name, kind][2]
        assert avoidable_duplicates(phy2log, logcnt, num_gpus, limit=num_gpus) == 0, kind
    # the reference does duplicate (equal loads on 9 slots per GPU pack replicas together)
    if shape_name == "prefill":
        ref, _, ref_cnt = production[shape_name, "equal"][1]
        assert avoidable_duplicates(ref, ref_cnt, num_gpus, limit=num_gpus) > 0


def test_production_runtime_sanity(production):
    assert max(ms for *_, ms in production.values()) < 3000


def test_prefill_leaves_nodes_when_load_is_concentrated(production):
    weight, ref, new, _ = production["prefill", "hot_group"]
    assert eplb.balancedness(weight, ref[0], 32).mean() > 1.5
    assert eplb.balancedness(weight, new[0], 32).mean() < 1.05


@pytest.mark.parametrize("case", [(2, 16, 32, 4, 2, 8), (1, 256, 288, 8, 18, 144)], ids=["hier", "decode"])
def test_all_zero_layer_spreads_replicas(case):
    n_layers, n_experts, num_replicas, num_groups, num_nodes, num_gpus = case
    weight = torch.zeros(n_layers, n_experts)
    phy2log, _, logcnt = eplb.rebalance_experts(weight, num_replicas, num_groups, num_nodes, num_gpus)
    assert (logcnt.max(1).values - logcnt.min(1).values <= 1).all()
    assert (eplb.balancedness(weight, phy2log, num_gpus) == 1.0).all()
    assert avoidable_duplicates(phy2log, logcnt, num_gpus, limit=num_gpus // num_nodes) == 0


def test_gpu_loads_and_balancedness_by_hand():
    weight = torch.tensor([[6.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    phy2log = torch.tensor([[0, 1, 0, 2, 0, 3], [0, 1, 2, 3, 0, 0]])  # 3 GPUs x 2 slots
    loads = eplb.gpu_loads(weight, phy2log, 3)
    assert loads.tolist() == [[4.0, 2.0, 2.0], [0.0, 0.0, 0.0]]
    assert eplb.balancedness(weight, phy2log, 3).tolist() == [1.5, 1.0]


BAD = [
    (dict(num_gpus=18), "num_gpus=18 must be a multiple of num_nodes=4"),
    (dict(num_replicas=290), "num_replicas=290 must be a multiple of num_gpus=32"),
    (dict(num_replicas=256 - 32), "num_replicas=224 must be >= the number of experts 256"),
    (dict(num_groups=7), "num_groups=7 must divide the number of experts 256"),
    (dict(num_nodes=0), "num_nodes must be an integer >= 1, got 0"),
    (dict(num_gpus=32.0), "num_gpus must be an integer >= 1, got 32.0"),
    (dict(num_groups=True), "num_groups must be an integer >= 1, got True"),
    (dict(weight=torch.ones(256)), "weight must be 2-D"),
    (dict(weight=-torch.ones(2, 256)), "weight must be finite and >= 0"),
    (dict(weight=torch.full((2, 256), float("nan"))), "weight must be finite and >= 0"),
    (dict(current_phy2log=torch.zeros(2, 64, dtype=torch.int64)),
     "current_phy2log must be an integer tensor of shape (2, 288)"),
    (dict(current_phy2log=torch.full((2, 288), 256)), "current_phy2log values must lie in [0, 256)"),
]


@pytest.mark.parametrize("change,message", BAD, ids=[m[:30] for _, m in BAD])
def test_bad_inputs_raise_precise_value_errors(change, message):
    args = dict(weight=torch.ones(2, 256), num_replicas=288, num_groups=8, num_nodes=4, num_gpus=32)
    args.update(change)
    with pytest.raises(ValueError) as err:
        eplb.rebalance_experts(**args)
    assert message in str(err.value)


# ---- fleet/eplb_stats.py: the offline `epserve eplb --stats FILE` helper ------------

@pytest.mark.parametrize("suffix", [".npy", ".pt", ".csv", ".csv-header"])
def test_load_stats_formats(tmp_path, suffix):
    from epserve.fleet.eplb_stats import load_stats
    weight = np.arange(12, dtype=float).reshape(3, 4)
    path = tmp_path / f"stats{suffix.split('-')[0]}"
    if suffix == ".npy":
        np.save(path, weight)
    elif suffix == ".pt":
        torch.save(torch.tensor(weight), path)
    else:
        header = "e0,e1,e2,e3\n" if suffix == ".csv-header" else ""
        path.write_text(header + "\n".join(",".join(str(v) for v in row) for row in weight) + "\n")
    loaded = load_stats(path)
    assert loaded.dtype == torch.float64 and loaded.tolist() == weight.tolist()


@pytest.mark.parametrize("name,content,error,message", [
    ("missing.npy", None, FileNotFoundError, "does not exist"),
    ("stats.txt", "1,2", ValueError, "unsupported type '.txt'"),
    ("stats.csv", "1,2\nx,y\n", ValueError, "is unreadable"),
    ("stats.npy", b"not numpy", ValueError, "is unreadable"),
    ("stats.pt", np.ones(3), ValueError, "expected a 2-D [layers, experts] matrix, got shape (3,)"),
])
def test_load_stats_errors(tmp_path, name, content, error, message):
    from epserve.fleet.eplb_stats import load_stats
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(torch.tensor(content), path)
    with pytest.raises(error) as err:
        load_stats(path)
    assert message in str(err.value)


@pytest.mark.parametrize("num_replicas,names", [(16, ["before", "baseline", "improved"]),
                                                (24, ["baseline", "improved"])])
def test_eplb_table_and_text(num_replicas, names):
    from epserve.fleet.eplb_stats import eplb_table, format_table
    weight = small_weight("lognormal", 3, 16)
    table = eplb_table(weight, num_replicas, 4, 2, 4)
    assert list(table["per_layer"]) == names and all(len(v) == 3 for v in table["per_layer"].values())
    assert table["summary"]["improved"]["max"] <= table["summary"]["baseline"]["max"] * (1 + 1e-6)
    assert "runtime_ms" in table["summary"]["improved"] and "runtime_ms" not in table["summary"].get("before", {})
    text = format_table(table)
    assert len(text.splitlines()) == 2 + 3 + 1 + 3 and "improved" in text
