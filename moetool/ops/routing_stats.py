"""Routing statistics from recorded expert choices (pure functions over tensors).

All inputs are in token order, row-major over (sequence, position): index [T, k] of chosen
experts, weight [T, k] of their gate weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)


def expert_counts(index, experts: int):
    import torch

    return torch.bincount(index.reshape(-1).long(), minlength=experts)[:experts]


def weight_mass(index, weight, experts: int):
    import torch

    mass = torch.zeros(experts, dtype=torch.float64)
    mass.index_add_(0, index.reshape(-1).long(), weight.reshape(-1).double())
    return mass


def saliency(index, salience, experts: int):
    """REAP saliency: for each expert, the mean over the (token, slot) pairs routed to it of
    ||gate weight x expert output||; 0 for experts no token chose."""
    import torch

    total = weight_mass(index, salience, experts)
    counts = expert_counts(index, experts).double()
    return torch.where(counts > 0, total / counts.clamp_min(1), torch.zeros_like(total))


def activation_norm(index, weight, salience, experts: int):
    """EAN: for each expert, the mean norm of its output (without the gate weight) over the
    (token, slot) pairs routed to it; 0 for experts no token chose."""

    norms = salience / weight.float().abs().clamp_min(1e-30)
    return saliency(index, norms, experts)


def imbalance(counts) -> dict[str, float]:
    """max/mean, coefficient of variation and Gini coefficient of per-expert loads."""
    values = sorted(float(c) for c in counts)
    n, total = len(values), sum(values)
    if not n or total == 0:
        return {"max_over_mean": 0.0, "cv": 0.0, "gini": 0.0}
    mean = total / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    gini = sum((2 * (i + 1) - n - 1) * v for i, v in enumerate(values)) / (n * total)
    return {"max_over_mean": max(values) / mean, "cv": std / mean, "gini": gini}


def capacity_drops(index, experts: int, batch_tokens: list[int]) -> dict[str, float]:
    """Share of (token, expert) assignments beyond capacity = ceil(cf * tokens_in_batch * k / E),
    per forward batch, for each capacity factor (as GShard/Switch-style capacity would drop them)."""
    import torch

    k = index.shape[1] if index.ndim == 2 else 1
    total = index.shape[0] * k
    drops = dict.fromkeys(CAPACITY_FACTORS, 0)
    start = 0
    for tokens in batch_tokens:
        counts = torch.bincount(index[start:start + tokens].reshape(-1).long(), minlength=experts)
        for cf in CAPACITY_FACTORS:
            capacity = math.ceil(cf * tokens * k / experts)
            drops[cf] += int((counts - capacity).clamp_min(0).sum())
        start += tokens
    return {str(cf): (d / total if total else 0.0) for cf, d in drops.items()}


def coactivation(index, experts: int):
    """[E, E] counts of tokens that chose both experts (diagonal: tokens that chose the expert)."""
    import torch

    onehot = torch.zeros(index.shape[0], experts, dtype=torch.float64)
    onehot.scatter_(1, index.long(), 1.0)
    return (onehot.T @ onehot).round().long()


@dataclass
class SequenceStats:
    distinct_experts_mean: float
    consecutive_reuse: float
    lru_hit_rate: dict[str, float]


def sequence_stats(index, seq_len: int, cache_sizes: list[int]) -> SequenceStats:
    """Per sequence: distinct experts touched, reuse between consecutive tokens, and the hit rate
    of an LRU cache of C experts (what an expert-offloading runtime would see)."""
    rows = index.tolist()
    sequences = [rows[i:i + seq_len] for i in range(0, len(rows), seq_len)]
    distinct = [len({e for token in seq for e in token}) for seq in sequences]
    reused = pairs = 0
    hits = dict.fromkeys(cache_sizes, 0)
    lookups = 0
    for seq in sequences:
        previous: set[int] = set()
        caches = {c: OrderedDict() for c in cache_sizes}
        for token in seq:
            chosen = set(token)
            if previous:
                reused += len(chosen & previous)
                pairs += len(chosen)
            previous = chosen
            for expert in token:
                lookups += 1
                for size, cache in caches.items():
                    if expert in cache:
                        hits[size] += 1
                        cache.move_to_end(expert)
                    else:
                        cache[expert] = None
                        if len(cache) > size:
                            cache.popitem(last=False)
    return SequenceStats(sum(distinct) / len(distinct) if distinct else 0.0, reused / pairs if pairs else 0.0,
                         {str(c): (hits[c] / lookups if lookups else 0.0) for c in cache_sizes})


# ---------------------------------------------------------------- expert-parallel placement

def contiguous_placement(experts: int, devices: int) -> list[list[int]]:
    per = math.ceil(experts / devices)
    return [list(range(d * per, min((d + 1) * per, experts))) for d in range(devices)]


def balanced_placement(counts: list[float], devices: int, replicas: int = 0) -> list[list[int]]:
    """Greedy bin packing of expert loads onto DEVICES with equal slot counts, after giving the
    REPLICAS hottest experts an extra copy each (their load split between copies), as DeepSeek's
    EPLB does. Returns each device's expert ids (a replicated expert appears on two devices)."""
    experts = len(counts)
    copies = [1] * experts
    for _ in range(replicas):   # replicate the expert with the highest load per copy
        hottest = max(range(experts), key=lambda e: counts[e] / copies[e])
        copies[hottest] += 1
    units = sorted(((counts[e] / copies[e], e) for e in range(experts) for _ in range(copies[e])), reverse=True)
    slots = math.ceil(len(units) / devices)
    load = [0.0] * devices
    placed: list[list[int]] = [[] for _ in range(devices)]
    for value, expert in units:
        options = [d for d in range(devices) if len(placed[d]) < slots and expert not in placed[d]] or \
                  [d for d in range(devices) if len(placed[d]) < slots]
        target = min(options, key=lambda d: load[d])
        placed[target].append(expert)
        load[target] += value
    return placed


def placement_load(counts: list[float], placement: list[list[int]]) -> list[float]:
    """Tokens each device processes, a replicated expert's load split evenly between its copies."""
    copies = [0] * len(counts)
    for device in placement:
        for e in device:
            copies[e] += 1
    return [sum(counts[e] / copies[e] for e in device) for device in placement]


def all_to_all(index, placement: list[list[int]], seq_len: int, devices: int) -> list[list[int]]:
    """tokens[i][j] sent from device i to device j in one MoE layer, with sequences spread over
    devices round-robin (data parallel) and each (token, expert) pair going to the device that holds
    the expert (the first copy on the token's own device if any, else copies in turn)."""
    owner: dict[int, list[int]] = {}
    for d, experts in enumerate(placement):
        for e in experts:
            owner.setdefault(e, []).append(d)
    matrix = [[0] * devices for _ in range(devices)]
    turn: dict[int, int] = {}
    for t, token in enumerate(index.tolist()):
        home = (t // seq_len) % devices
        for e in token:
            holders = owner[e]
            if home in holders:
                target = home
            else:
                turn[e] = turn.get(e, -1) + 1
                target = holders[turn[e] % len(holders)]
            matrix[home][target] += 1
    return matrix
