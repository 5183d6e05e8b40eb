"""Routing statistics against brute-force computations."""

import itertools
import math
import random

import pytest
import torch

from moetool.ops import routing_stats as rs


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


def test_capacity_drops_brute_force():
    index = random_index(tokens=120, experts=6, k=2, seed=1)
    got = rs.capacity_drops(index, 6, [50, 70])
    for cf in rs.CAPACITY_FACTORS:
        dropped = 0
        for start, size in ((0, 50), (50, 70)):
            cap = math.ceil(cf * size * 2 / 6)   # capacity = ceil(cf * tokens * k / E)
            for e in range(6):
                n = sum(int(e in row) for row in index[start:start + size].tolist())
                dropped += max(0, n - cap)
        assert got[str(cf)] == pytest.approx(dropped / 240)


def test_coactivation_brute_force():
    index = random_index(tokens=60, experts=5, k=3, seed=2)
    matrix = rs.coactivation(index, 5)
    for i, j in itertools.product(range(5), repeat=2):
        assert matrix[i, j] == sum(1 for row in index.tolist() if i in row and j in row)


def test_sequence_stats_brute_force():
    index = random_index(tokens=90, experts=6, k=2, seed=3)
    seq_len = 30
    got = rs.sequence_stats(index, seq_len, [2, 4])
    rows = index.tolist()
    seqs = [rows[i:i + seq_len] for i in range(0, 90, seq_len)]
    assert got.distinct_experts_mean == pytest.approx(sum(len({e for r in s for e in r}) for s in seqs) / 3)
    reused = sum(len(set(s[t]) & set(s[t - 1])) for s in seqs for t in range(1, seq_len))
    assert got.consecutive_reuse == pytest.approx(reused / (3 * (seq_len - 1) * 2))
    for size in (2, 4):   # naive LRU: a list, most recent last
        hits = 0
        for s in seqs:
            cache = []
            for row in s:
                for e in row:
                    if e in cache:
                        hits += 1
                        cache.remove(e)
                    elif len(cache) == size:
                        cache.pop(0)
                    cache.append(e)
        assert got.lru_hit_rate[str(size)] == pytest.approx(hits / 180)


def test_placements():
    random.seed(0)
    counts = [random.randint(0, 1000) for _ in range(16)] + [5000, 4000]
    contiguous = rs.contiguous_placement(18, 4)
    assert sorted(e for d in contiguous for e in d) == list(range(18))
    balanced = rs.balanced_placement(counts, 4)
    assert sorted(e for d in balanced for e in d) == list(range(18))
    load_c, load_b = rs.placement_load(counts, contiguous), rs.placement_load(counts, balanced)
    assert sum(load_b) == pytest.approx(sum(counts)) and max(load_b) <= max(load_c)
    replicated = rs.balanced_placement(counts, 4, replicas=2)
    assert sum(len(d) for d in replicated) == 20
    assert max(rs.placement_load(counts, replicated)) <= max(load_b)
    assert sum(rs.placement_load(counts, replicated)) == pytest.approx(sum(counts))


def test_all_to_all_counts_every_assignment():
    index = random_index(tokens=64, experts=8, k=2, seed=4)
    placement = rs.contiguous_placement(8, 2)
    matrix = rs.all_to_all(index, placement, seq_len=16, devices=2)
    assert sum(map(sum, matrix)) == 128
    # sequences 0 and 2 live on device 0: their assignments to experts 4-7 cross to device 1
    crossing = sum(1 for t, row in enumerate(index.tolist()) for e in row if (t // 16) % 2 != e // 4)
    assert matrix[0][1] + matrix[1][0] == crossing
