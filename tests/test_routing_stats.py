"""Routing statistics against brute-force computations."""

import itertools
import math
import random

import pytest
import torch

from moetool.ops import routing_stats as rs
from moetool.runner.stats import LayerStats, window_unit


def random_index(tokens=200, experts=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)]).int()


def test_imbalance_against_definitions():
    counts = [5, 0, 12, 3, 8, 8, 1, 3]
    n, mean = len(counts), sum(counts) / len(counts)
    gini = sum(abs(a - b) for a in counts for b in counts) / (2 * n * n * mean)
    std = (sum((c - mean) ** 2 for c in counts) / n) ** 0.5
    got = rs.imbalance(counts)
    assert got["gini"] == pytest.approx(gini) and got["cv"] == pytest.approx(std / mean)
    assert got["max_over_mean"] == pytest.approx(12 / mean)
    assert rs.imbalance([4, 4, 4]) == {"max_over_mean": 1.0, "cv": 0.0, "gini": 0.0}


def naive_lru_hits(sequences, size):
    """A plain LRU cache (a list, most recent last) over each sequence's accesses in order."""
    hits = 0
    for seq in sequences:
        cache = []
        for row in seq:
            for e in row:
                if e in cache:
                    hits += 1
                    cache.remove(e)
                elif len(cache) == size:
                    cache.pop(0)
                cache.append(e)
    return hits


def naive_drops(rows, window, k, cf):
    """Assignments of ROWS (each token's experts) over capacity ceil(cf x tokens x k / E), per window of WINDOW
    tokens."""
    dropped = 0
    for start in range(0, len(rows), window):
        part = rows[start:start + window]
        cap = math.ceil(cf * len(part) * k / EXPERTS)
        dropped += sum(max(0, sum(e in row for row in part) - cap) for e in range(EXPERTS))
    return dropped


def accumulate(index, weight, router, batch_sizes, window, ep=None, first_sequence=0, identity=0):
    """LayerStats fed INDEX [N, S, k] in micro-batches of the given sizes."""
    n, _, k = index.shape
    stats = LayerStats(EXPERTS, k, torch.device("cpu"), capacity_window=window, ep=ep, identity=identity)
    start = 0
    for size in itertools.cycle(batch_sizes):
        if start >= n:
            break
        part = slice(start, start + size)
        stats.update(index[part], first_sequence + start, weight[part], router[part])
        start += size
    return stats.totals()


EXPERTS = 6


@pytest.mark.parametrize("window", [7, 30, 60, 1000])
def test_accumulators_against_brute_force(window):
    n, seq_len, k = 9, 30, 2
    index = random_index(tokens=n * seq_len, experts=EXPERTS, k=k, seed=5).long().reshape(n, seq_len, k)
    g = torch.Generator().manual_seed(6)
    weight = torch.rand(n, seq_len, k, generator=g)
    router = torch.rand(n, seq_len, 3, generator=g)
    t = accumulate(index, weight, router, [2, 3, 1], window, ep=2)
    rows = index.reshape(-1, k).tolist()
    assert t.counts == [sum(row.count(e) for row in rows) for e in range(EXPERTS)]
    assert t.tokens == n * seq_len and t.sequences == n and t.assignments == n * seq_len * k
    mass = [0.0] * EXPERTS
    for row, w in zip(rows, weight.reshape(-1, k).tolist()):
        for e, x in zip(row, w):
            mass[e] += x
    assert t.weight_mass == pytest.approx(mass, rel=1e-12)
    assert t.entropy_sum == pytest.approx(float(router[..., 0].double().sum()), rel=1e-12)
    for i, j in itertools.product(range(EXPERTS), repeat=2):
        assert t.coactivation[i][j] == sum(1 for row in rows if i in row and j in row)
    for cf in (1.0, 1.25, 1.5, 2.0):   # fixed windows of WINDOW tokens over the whole stream
        assert t.drops[str(cf)] == naive_drops(rows, window, k, cf)
    sequences = [rows[i:i + seq_len] for i in range(0, len(rows), seq_len)]
    assert t.distinct_sum == sum(len({e for r in s for e in r}) for s in sequences)
    assert t.reused == sum(len(set(s[i]) & set(s[i - 1])) for s in sequences for i in range(1, seq_len))
    assert t.reuse_pairs == n * (seq_len - 1) * k and t.lookups == n * seq_len * k
    for size, hits in t.lru_hits.items():
        assert hits == naive_lru_hits(sequences, int(size))
    for home in range(2):   # sequences round-robin over 2 devices
        assert t.ep_counts[home] == [sum(row.count(e) for s, seq in enumerate(sequences) if s % 2 == home
                                         for row in seq) for e in range(EXPERTS)]


@pytest.mark.parametrize("window", [7, 60])
def test_identity_experts_are_counted_apart(window):
    """A router that also picks identity experts (numbered EXPERTS and up: LongCat-Flash's zero-computation
    experts): their picks are counted apart, and every other figure is the real experts' alone, as if the
    identity picks were not there (they need no capacity and take no cache place)."""
    n, seq_len, k, identity = 6, 25, 3, 3
    index = random_index(tokens=n * seq_len, experts=EXPERTS + identity, k=k, seed=9).long().reshape(n, seq_len, k)
    g = torch.Generator().manual_seed(10)
    weight = torch.rand(n, seq_len, k, generator=g)
    router = torch.rand(n, seq_len, 3, generator=g)
    t = accumulate(index, weight, router, [2, 1, 3], window, ep=2, identity=identity)
    rows = index.reshape(-1, k).tolist()
    real = [[e for e in row if e < EXPERTS] for row in rows]   # the picks of real experts, in slot order
    picks = sum(map(len, real))
    assert 0 < picks < len(rows) * k
    assert t.identity_experts == identity and t.identity_assignments == len(rows) * k - picks
    assert t.counts == [sum(row.count(e) for row in rows) for e in range(EXPERTS)]
    assert t.identity_mass == pytest.approx(float(weight[index >= EXPERTS].double().sum()), rel=1e-12)
    assert t.weight_mass == pytest.approx([float(weight[index == e].double().sum()) for e in range(EXPERTS)],
                                          rel=1e-12)
    for i, j in itertools.product(range(EXPERTS), repeat=2):
        assert t.coactivation[i][j] == sum(1 for row in real if i in row and j in row)
    assert t.assignments == picks
    for cf in (1.0, 2.0):
        assert t.drops[str(cf)] == naive_drops(real, window, k, cf)
    sequences = [real[i:i + seq_len] for i in range(0, len(real), seq_len)]
    assert t.distinct_sum == sum(len({e for r in s for e in r}) for s in sequences)
    assert t.reused == sum(len(set(s[i]) & set(s[i - 1])) for s in sequences for i in range(1, seq_len))
    assert t.reuse_pairs == sum(len(s[i]) for s in sequences for i in range(1, seq_len)) and t.lookups == picks
    for size, hits in t.lru_hits.items():
        assert hits == naive_lru_hits(sequences, int(size))
    for home in range(2):
        assert t.ep_counts[home] == [sum(row.count(e) for s, seq in enumerate(sequences) if s % 2 == home
                                         for row in seq) for e in range(EXPERTS)]


def test_micro_batch_size_changes_nothing():
    index = random_index(tokens=12 * 16, experts=EXPERTS, k=3, seed=7).long().reshape(12, 16, 3)
    weight, router = torch.ones(12, 16, 3), torch.ones(12, 16, 3)
    a = accumulate(index, weight, router, [12], window=64)
    b = accumulate(index, weight, router, [1, 5, 2], window=64)
    assert a == b


def test_lru_in_small_blocks_is_exact(monkeypatch):
    from moetool.runner import stats

    index = random_index(tokens=4 * 50, experts=EXPERTS, k=2, seed=8).long().reshape(4, 50, 2)
    whole = accumulate(index, torch.ones(4, 50, 2), torch.ones(4, 50, 3), [4], window=50)
    monkeypatch.setattr(stats, "BLOCK_ELEMENTS", 13)   # blocks of 2 accesses, last-use times carried across
    blocked = accumulate(index, torch.ones(4, 50, 2), torch.ones(4, 50, 3), [4], window=50)
    assert blocked.lru_hits == whole.lru_hits
    rows = index.reshape(-1, 2).tolist()
    sequences = [rows[i:i + 50] for i in range(0, 200, 50)]
    assert {int(c): h for c, h in blocked.lru_hits.items()} == {c: naive_lru_hits(sequences, c) for c in (1, 2, 3, 4)}


def test_window_must_fit_sequences():
    from moetool.errors import UsageError

    assert window_unit(2048, 512) == 4 and window_unit(128, 512) == 1
    with pytest.raises(UsageError, match="capacity-window 300"):
        window_unit(300, 512)


def test_update_makes_no_host_synchronisation():
    """Every op a capture hook's update runs stays on the device: no .item(), .tolist(), .cpu(),
    bincount (its size needs the maximum), nonzero, boolean indexing or truth tests."""
    from torch.overrides import TorchFunctionMode

    banned = {"item", "tolist", "cpu", "numpy", "nonzero", "bincount", "unique", "masked_select", "__bool__",
              "__int__", "__float__", "argwhere"}
    seen = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            if name in banned:
                seen.append(name)
            return func(*args, **(kwargs or {}))

    index = random_index(tokens=4 * 20, experts=EXPERTS, k=2, seed=9).long().reshape(4, 20, 2)
    stats = LayerStats(EXPERTS, 2, torch.device("cpu"), capacity_window=30, ep=2)
    with Watch():
        stats.update(index, 0, torch.rand(4, 20, 2), torch.rand(4, 20, 3))
        stats.update_salience(index, torch.rand(4, 20, 2), torch.rand(4, 20, 2))
    assert seen == []
    with Watch():   # the watch does see a synchronising call
        stats.counts.sum().item()
    assert seen == ["item"]


def test_placements():
    random.seed(0)
    counts = [random.randint(0, 1000) for _ in range(16)] + [5000, 4000]
    contiguous = rs.contiguous_placement(18, 4)
    assert contiguous == [list(range(0, 5)), list(range(5, 10)), list(range(10, 14)), list(range(14, 18))]
    assert rs.contiguous_placement(8, 7) == [[0, 1], [2], [3], [4], [5], [6], [7]]   # no device left empty
    balanced = rs.balanced_placement(counts, 4)
    assert sorted(e for d in balanced for e in d) == list(range(18))
    load_c, load_b = rs.placement_load(counts, contiguous), rs.placement_load(counts, balanced)
    assert sum(load_b) == pytest.approx(sum(counts)) and max(load_b) <= max(load_c)
    replicated = rs.balanced_placement(counts, 4, replicas=2)
    assert sum(len(d) for d in replicated) == 20
    assert max(rs.placement_load(counts, replicated)) <= max(load_b)
    assert sum(rs.placement_load(counts, replicated)) == pytest.approx(sum(counts))


def test_all_to_all_from_home_counts():
    placement = [[0, 1, 2], [2, 3]]          # expert 2 has a copy on both devices
    home = [[5, 0, 4, 3], [1, 2, 7, 6]]     # assignments made by tokens of device 0 and device 1
    matrix = rs.all_to_all(home, placement)
    assert matrix == [[5 + 4, 3], [1 + 2, 7 + 6]]
    placement = [[0], [1], [1]]               # expert 1 on devices 1 and 2; device 0's 5 split 3 + 2
    assert rs.all_to_all([[0, 5], [0, 0], [0, 0]], placement) == [[0, 3, 2], [0, 0, 0], [0, 0, 0]]
