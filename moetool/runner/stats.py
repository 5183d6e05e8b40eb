"""Routing statistics accumulated on the device as tokens flow, in memory that does not grow with
the number of tokens.

Each MoE layer has a `LayerStats` of fixed-size tensors on the run's device. `update()` takes one
micro-batch of whole sequences (expert ids [B, S, k] and, when known, gate weights, router
statistics and saliency terms) and adds to them with device operations only: no `.item()`,
`.tolist()`, `bincount` (whose output size needs the maximum) or boolean indexing, so a hook that
calls it never makes the device wait for the host. `totals()` moves everything to the host once,
at the end. Under torch.distributed, `all_reduce()` sums the tensors of every rank first.

Capacity drops are counted per fixed window of `capacity_window` consecutive tokens, so they are
the same whatever the micro-batch size or mode. LRU hit rates are exact (an access hits a cache
of C experts iff fewer than C other experts were used since the expert's last use), computed in
blocks with each sequence's last-use times carried between blocks.

A layer whose router also picks zero-computation experts (LongCat-Flash's identity experts, ZAYA's skip
expert, numbered after the real ones) counts every such pick in one extra slot, E: its assignments and gate
weight are reported apart, and it takes no part in the real experts' co-activation, capacity, distinct-expert,
reuse and LRU figures (such an expert computes nothing, so it needs no capacity nor a cache place).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moetool.errors import UsageError
from moetool.runner import distributed

CAPACITY_FACTORS = (1.0, 1.25, 1.5, 2.0)
BLOCK_ELEMENTS = 1 << 22   # accesses x experts per LRU block: bounds its temporaries (~100 MB)


def cache_sizes(experts: int, top_k: int) -> list[int]:
    """The LRU cache sizes reported: k, 2k, E/4 and E/2 experts (those below E)."""
    return sorted({c for c in (top_k, 2 * top_k, experts // 4, experts // 2) if 0 < c < experts})


def window_unit(window: int, seq_len: int) -> int:
    """Sequences per capacity window (1 when windows split sequences): the unit in which data may be
    shared out between ranks without splitting a window."""
    if window % seq_len == 0:
        return window // seq_len
    if seq_len % window == 0:
        return 1
    raise UsageError(f"--capacity-window {window} must divide --seq-len {seq_len} or be a multiple of it")


@dataclass
class LayerTotals:
    """One layer's accumulated figures on the host (plain Python values)."""

    experts: int
    top_k: int
    tokens: int
    sequences: int
    counts: list[int]
    weight_mass: list[float] | None
    salience_sum: list[float] | None
    activation_norm_sum: list[float] | None
    entropy_sum: float | None
    top1_sum: float | None
    margin_sum: float | None
    drops: dict[str, int]
    assignments: int
    coactivation: list[list[int]]
    distinct_sum: int
    reused: int
    reuse_pairs: int
    lru_hits: dict[str, int]
    lookups: int
    ep_counts: list[list[int]] | None   # [home device][expert] assignments, sequences round-robin over devices
    identity_experts: int = 0           # identity experts the router also scores (their picks are not in the above)
    identity_assignments: int = 0       # picks of any of them
    identity_mass: float | None = None  # their gate weights, summed


class LayerStats:
    """Fixed-size accumulators of one MoE layer, on DEVICE."""

    def __init__(self, experts: int, top_k: int, device, *, capacity_window: int, ep: int | None = None,
                 identity: int = 0):
        """IDENTITY: identity experts numbered from EXPERTS on, all counted in slot EXPERTS."""
        import torch

        self.experts, self.top_k, self.device, self.identity = experts, top_k, device, identity
        width = self.width = experts + (1 if identity else 0)
        self.window = capacity_window
        self.sizes = cache_sizes(experts, top_k)
        zeros = lambda *shape, dtype=torch.int64: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.counts = zeros(width)
        self.coactivation = zeros(width * width)
        self.window_counts = zeros(width)
        self.drops = zeros(len(CAPACITY_FACTORS))
        self.distinct = zeros(())
        self.reused = zeros(())
        self.lru_hits = zeros(len(self.sizes))
        self.ep_counts = zeros(ep * width) if ep else None
        self.ep = ep
        self.mass = zeros(width, dtype=torch.float64)
        self.salience = zeros(width, dtype=torch.float64)
        self.activation_norm = zeros(width, dtype=torch.float64)
        # with identity experts: picks of real experts, and pairs of them in consecutive tokens (device values)
        self.real_assignments, self.real_reuse_pairs = zeros(()), zeros(())
        self.router = zeros(3, dtype=torch.float64)   # sums of entropy, top-1 probability, top-1 - top-2
        # host-side counts (known from shapes, no device value needed)
        self.tokens = self.sequences = self.reuse_pairs = self.lookups = self.assignments = 0
        self.window_fill = 0
        self.has_weights = self.has_router = self.has_salience = False
        self.closed = False

    # ------------------------------------------------------------ accumulation

    def update(self, index, first_sequence: int, weight=None, router=None) -> None:
        """Add one micro-batch: INDEX [B, S, k] expert ids (int64, on the device) of B whole sequences
        numbered from FIRST_SEQUENCE; WEIGHT [B, S, k] gate weights; ROUTER [B, S, 3] per-token router
        entropy, top-1 probability and top-1 - top-2 margin."""
        import torch

        index = self.slots(index)
        batch, seq, k = index.shape
        flat = index.reshape(-1)
        ones = torch.ones_like(flat)
        self.counts.index_add_(0, flat, ones)
        if self.identity:
            self.real_assignments += (flat < self.experts).sum()
        pairs = (index.unsqueeze(-1) * self.width + index.unsqueeze(-2)).reshape(-1)
        self.coactivation.index_add_(0, pairs, torch.ones_like(pairs))
        if weight is not None:
            self.has_weights = True
            self.mass.index_add_(0, flat, weight.reshape(-1).to(torch.float64))
        if router is not None:
            self.has_router = True
            self.router += router.reshape(-1, 3).to(torch.float64).sum(0)
        if self.ep_counts is not None:
            home = (torch.arange(first_sequence, first_sequence + batch, device=index.device) % self.ep)
            slots = (home.view(batch, 1, 1) * self.width + index).reshape(-1)
            self.ep_counts.index_add_(0, slots, ones)
        self._capacity(index.reshape(-1, k))
        self._sequences(index)
        self.tokens += batch * seq
        self.sequences += batch
        self.assignments += batch * seq * k

    def update_salience(self, index, weight, salience) -> None:
        """REAP terms: SALIENCE [.., k] = ||gate weight x expert output|| of each (token, slot)."""
        import torch

        self.has_salience = True
        flat = self.slots(index).reshape(-1)
        salience = salience.reshape(-1).to(torch.float64)
        self.salience.index_add_(0, flat, salience)
        self.activation_norm.index_add_(0, flat, salience / weight.reshape(-1).to(torch.float64).abs().clamp_min(1e-30))

    def slots(self, index):
        """INDEX with every identity expert's number turned into the identity slot E."""
        return index.clamp_max(self.experts) if self.identity else index

    def _capacity(self, flat) -> None:
        """Assignments of the tokens FLAT [T, k] (in order) into fixed windows of self.window tokens."""
        import torch

        position = 0
        while position < flat.shape[0]:
            take = min(self.window - self.window_fill, flat.shape[0] - position)
            part = flat[position:position + take].reshape(-1)
            self.window_counts.index_add_(0, part, torch.ones_like(part))
            self.window_fill += take
            position += take
            if self.window_fill == self.window:
                self._close_window()

    def end_window(self) -> None:
        """Close the capacity window here, whatever its fill (a vLLM request ends: windows never span two)."""
        self._close_window()

    def _close_window(self) -> None:
        if not self.window_fill:
            return
        for slot, factor in enumerate(CAPACITY_FACTORS):
            capacity = math.ceil(factor * self.window_fill * self.top_k / self.experts)
            self.drops[slot] += (self.window_counts[:self.experts] - capacity).clamp_min(0).sum()
        self.window_counts.zero_()
        self.window_fill = 0

    def _sequences(self, index) -> None:
        """Distinct experts per sequence, reuse between consecutive tokens, LRU cache hits."""
        import torch

        batch, seq, k = index.shape
        E = self.experts
        used = torch.zeros(batch, seq, self.width, dtype=torch.bool, device=index.device)
        used.scatter_(2, index, True)
        used = used[..., :E]
        self.distinct += used.any(1).sum()
        if seq > 1:
            self.reused += (used[:, 1:] & used[:, :-1]).sum()
            if self.identity:   # (device counts: the pairs of real picks, a device value)
                self.real_reuse_pairs += (index[:, 1:] < E).sum()
            else:
                self.reuse_pairs += batch * (seq - 1) * k
        del used
        if self.sizes:
            accesses = index.reshape(batch, seq * k)
            group = max(1, BLOCK_ELEMENTS // max(1, seq * k * self.width))
            for start in range(0, batch, group):
                self.lru_hits += lru_hits(accesses[start:start + group], self.width, self.sizes,
                                          cached=E if self.identity else None)
        if not self.identity:
            self.lookups += batch * seq * k

    # ------------------------------------------------------------ results

    def tensors(self) -> tuple[list, list]:
        """The int64 and float64 accumulators (for all_reduce)."""
        ints = [self.counts, self.coactivation, self.drops, self.distinct.view(1), self.reused.view(1),
                self.lru_hits, self.real_assignments.view(1), self.real_reuse_pairs.view(1)] + \
            ([self.ep_counts] if self.ep_counts is not None else [])
        return ints, [self.mass, self.salience, self.activation_norm, self.router]

    def host_counts(self) -> list[int]:
        return [self.tokens, self.sequences, self.reuse_pairs, self.lookups, self.assignments,
                int(self.has_weights), int(self.has_router), int(self.has_salience)]

    def set_host_counts(self, values: list[int]) -> None:
        (self.tokens, self.sequences, self.reuse_pairs, self.lookups, self.assignments, weights, router,
         salience) = values
        self.has_weights, self.has_router, self.has_salience = bool(weights), bool(router), bool(salience)

    def close(self) -> None:
        """Count the last, partial capacity window (call once, after the last micro-batch)."""
        if not self.closed:
            self._close_window()
            self.closed = True

    def totals(self) -> LayerTotals:
        self.close()
        E, W = self.experts, self.width
        counts = self.counts.cpu().tolist()
        router = self.router.cpu().tolist()
        drops = self.drops.cpu().tolist()
        hits = self.lru_hits.cpu().tolist()
        mass = self.mass.cpu().tolist() if self.has_weights else None
        real = lambda values: None if values is None else values[:E]   # noqa: E731  (the identity slot apart)
        assignments, reuse_pairs, lookups = self.assignments, self.reuse_pairs, self.lookups
        if self.identity:
            assignments = lookups = int(self.real_assignments)
            reuse_pairs = int(self.real_reuse_pairs)
        return LayerTotals(
            experts=E, top_k=self.top_k, tokens=self.tokens, sequences=self.sequences, counts=counts[:E],
            weight_mass=real(mass),
            salience_sum=real(self.salience.cpu().tolist()) if self.has_salience else None,
            activation_norm_sum=real(self.activation_norm.cpu().tolist()) if self.has_salience else None,
            entropy_sum=router[0] if self.has_router else None, top1_sum=router[1] if self.has_router else None,
            margin_sum=router[2] if self.has_router else None,
            drops={str(f): d for f, d in zip(CAPACITY_FACTORS, drops)}, assignments=assignments,
            coactivation=[row[:E] for row in self.coactivation.view(W, W)[:E].cpu().tolist()],
            distinct_sum=int(self.distinct), reused=int(self.reused), reuse_pairs=reuse_pairs,
            lru_hits={str(c): h for c, h in zip(self.sizes, hits)}, lookups=lookups,
            ep_counts=[row[:E] for row in self.ep_counts.view(self.ep, W).cpu().tolist()]
            if self.ep_counts is not None else None,
            identity_experts=self.identity, identity_assignments=counts[E] if self.identity else 0,
            identity_mass=mass[E] if self.identity and mass is not None else None)


def lru_hits(accesses, experts: int, sizes: list[int], cached: int | None = None):
    """Hits of an LRU cache of each size in SIZES over each row of ACCESSES [G, n] (expert ids in the
    order they are used; every row a sequence starting with an empty cache). Returns int64 [len(sizes)].
    CACHED: only experts below it are cached (the others, identity experts, neither hit nor take a place)."""
    import torch

    rows, n = accesses.shape
    block = max(1, BLOCK_ELEMENTS // max(1, rows * experts))
    last = torch.full((rows, experts), -1, dtype=torch.int64, device=accesses.device)   # last use time
    hits = torch.zeros(len(sizes), dtype=torch.int64, device=accesses.device)
    for start in range(0, n, block):
        part = accesses[:, start:start + block]
        width = part.shape[1]
        onehot = torch.nn.functional.one_hot(part, experts).to(torch.int32)       # [G, b, E]
        upto = onehot.cumsum(1)                                                    # uses up to and including i
        before = upto - onehot                                                     # uses before i (this block)
        position = torch.arange(width, device=part.device)
        key, order = (part * width + position).sort(dim=1)
        same = torch.zeros_like(key, dtype=torch.bool)
        same[:, 1:] = (key[:, 1:] // width) == (key[:, :-1] // width)
        previous_sorted = torch.where(same, torch.nn.functional.pad(key[:, :-1] % width, (1, 0)),
                                      torch.full_like(key, -1))
        previous = torch.empty_like(previous_sorted).scatter_(1, order, previous_sorted)   # last use in block
        at_previous = upto.gather(1, previous.clamp_min(0).unsqueeze(-1).expand(-1, -1, experts))
        distance_in = ((before - at_previous) > 0)[..., :cached].sum(-1)            # others used since then
        last_use = last.gather(1, part)                                            # last use before the block
        distance_out = ((last.unsqueeze(1) > last_use.unsqueeze(-1)) | (before > 0))[..., :cached].sum(-1)
        inside = previous >= 0
        distance = torch.where(inside, distance_in, distance_out)
        seen = inside | (last_use >= 0)
        if cached is not None:
            seen &= part < cached
        for slot, size in enumerate(sizes):
            hits[slot] += (seen & (distance < size)).sum()
        times = (position + start).expand(rows, -1)
        last.scatter_reduce_(1, part, times, reduce="amax")
    return hits


class RoutingStats:
    """The accumulators of every MoE layer of a run."""

    def __init__(self, layers: dict[int, tuple[int, int]], device, *, capacity_window: int, ep: int | None = None,
                 identity: int = 0):
        """LAYERS: MoE layer -> (experts, top_k); IDENTITY: identity experts each router also scores."""
        self.layers = {layer: LayerStats(e, k, device, capacity_window=capacity_window, ep=ep, identity=identity)
                       for layer, (e, k) in layers.items()}

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def all_reduce(self) -> None:
        """Sum every rank's accumulators into every rank's (torch.distributed must be initialised).
        Capacity windows are closed first: ranks hold whole windows (see window_unit)."""
        import torch

        for stats in self.layers.values():
            stats.close()
        ints, floats = [], []
        for stats in self.layers.values():
            i, f = stats.tensors()
            ints += i
            floats += f
        device = next(iter(self.layers.values())).device
        host = torch.tensor([v for s in self.layers.values() for v in s.host_counts()], dtype=torch.int64,
                            device=device)
        for group_tensors in (ints, floats):
            flat = torch.cat([t.reshape(-1) for t in group_tensors])
            distributed.all_reduce(flat)
            offset = 0
            for t in group_tensors:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        distributed.all_reduce(host)
        values = host.cpu().tolist()
        width = len(values) // len(self.layers)
        for n, stats in enumerate(self.layers.values()):
            part = values[n * width:(n + 1) * width]
            part[5:] = [min(1, v) for v in part[5:]]   # flags: any rank had them
            stats.set_host_counts(part)

    def totals(self) -> dict[int, LayerTotals]:
        return {layer: stats.totals() for layer, stats in self.layers.items()}
