"""Routing statistics computed from accumulated totals (pure functions): load imbalance and
expert-parallel placement. The per-token accumulation itself is runner/stats.py."""

from __future__ import annotations

import math


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


# ---------------------------------------------------------------- expert-parallel placement

def contiguous_placement(experts: int, devices: int) -> list[list[int]]:
    """Experts in order, the first E mod D devices one more than the rest (as vLLM's expert map)."""
    base, extra = divmod(experts, devices)
    starts = [d * base + min(d, extra) for d in range(devices + 1)]
    return [list(range(starts[d], starts[d + 1])) for d in range(devices)]


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


def all_to_all(home_counts: list[list[int]], placement: list[list[int]]) -> list[list[int]]:
    """tokens[i][j] sent from device i to device j in one MoE layer. HOME_COUNTS[i][e]: the (token,
    expert) assignments of expert e made by tokens of device i (sequences spread over devices
    round-robin, data parallel). Each goes to the device holding the expert: the token's own device
    if it holds a copy, else split as evenly as possible between the copies (the first copies take
    the remainder)."""
    devices = len(placement)
    owner: dict[int, list[int]] = {}
    for d, experts in enumerate(placement):
        for e in experts:
            owner.setdefault(e, []).append(d)
    matrix = [[0] * devices for _ in range(devices)]
    for home, counts in enumerate(home_counts):
        for e, count in enumerate(counts):
            holders = owner[e]
            if home in holders:
                matrix[home][home] += count
                continue
            per, extra = divmod(count, len(holders))
            for n, target in enumerate(holders):
                matrix[home][target] += per + (1 if n < extra else 0)
    return matrix
