"""Sequential pruning on the layer-major runner: each MoE layer's experts are scored on the hidden
states that the already-pruned earlier layers deliver, then the layer is pruned before it runs again
for the next layer (llm-compressor's REAP with ``propagate_error`` works this way).

Pruning a layer in place means routing as the pruned checkpoint routes: a model pruned to a subset
S of experts equals the original whose router logits outside S are -inf before top-k (and, for
sigmoid routers, whose correction biases outside S are -inf too). So from its second pass on, the
layer's MoE block runs under a torch function mode that sets those logits to -inf wherever the
router's weight, or a cast of it, is applied (`RouterRestriction`; tests/test_prune_sequential.py
checks the result against the pruned checkpoints of 29 families). With ``--merge``, the kept
experts' stacked weights are replaced by the weighted sums the output checkpoint will hold.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from moetool.arch import Role
from moetool.errors import UnsupportedError
from moetool.runner.capture import RouterCapture, module_name, router_tensor
from moetool.runner.modules import module_in
from moetool.runner.sequential import experts_modules
from moetool.runner.stats import RoutingStats


def _router_weight(router, named=None):
    """The weight a router module applies (Hunyuan's gate holds an nn.Linear, JetMoE's router a .layer; NAMED:
    the family's router tensor, where the module holds other weights too: ZAYA's MLP router, whose expert rows
    are router_mlp.out_proj's)."""
    weight = getattr(router, "weight", None)
    if weight is None:
        weight = named
    if weight is None:
        weight = next((p for n, p in router.named_parameters() if n.endswith("weight")), None)
    if weight is None:
        raise UnsupportedError(f"{type(router).__name__}: no router weight to restrict")
    return weight


def _correction_bias(model, family, config: dict, index: int, offset: int):
    """The router's correction bias in the built model (DeepSeek-V3, GLM-4.5, dots1, ERNIE), or None
    for routers without one (as CONFIG makes it: LFM2-MoE's use_expert_bias; DeepSeek-V4's token-table layers)."""
    found = router_tensor(model, family, Role.ROUTER_CORRECTION, index, offset)
    if found is not None:
        return found
    settings = family.settings(config)
    if family.absent_roles is not None and Role.ROUTER_CORRECTION in family.absent_roles(settings, index):
        return None
    if family.router is not None and family.router.resolved(settings).correction_bias:
        raise UnsupportedError(f"{family.title}: layer {index}'s router correction bias is not where moetool "
                               "looks for it in the built model, so its removed experts cannot be restricted")
    return None


# casts a router may apply to its weight before F.linear (DeepSeek-V3: self.weight.type(torch.float32))
_CASTS = ("type", "to", "float", "double", "half", "bfloat16", "contiguous", "detach")


def _same(a, b) -> bool:
    """A and B are one tensor (or views of the same memory with the same shape and dtype)."""
    return a is b or (a.data_ptr() != 0 and a.data_ptr() == b.data_ptr() and a.shape == b.shape and
                      a.dtype == b.dtype)


def _masking_mode(weight, removed: list[int]):
    """A torch function mode: the outputs of F.linear with WEIGHT (or a cast of it) get -inf in the
    REMOVED columns; `masked` counts the calls it changed."""
    import torch
    from torch.overrides import TorchFunctionMode

    linear = torch.nn.functional.linear
    casts = {getattr(torch.Tensor, name) for name in _CASTS}
    gone = torch.tensor(removed, dtype=torch.long)

    class RestrictRouter(TorchFunctionMode):
        masked = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func in casts and args and isinstance(out, torch.Tensor) and any(args[0] is t for t in self.tracked):
                self.tracked.append(out)
            elif func is linear:
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                if isinstance(w, torch.Tensor) and any(_same(w, t) for t in self.tracked):
                    out = out.index_fill(-1, gone.to(out.device), float("-inf"))
                    self.masked += 1
            return out

    mode = RestrictRouter()
    mode.tracked = [weight]   # the weight and what casts made of it during this call
    return mode


class RouterRestriction:
    """Forward hooks that make MoE layer INDEX route as if its REMOVED experts were pruned, on every
    call until `remove()`: their router logits -inf wherever the router's weight is applied, and
    their correction bias (if any) -inf too, since a sigmoid router adds it after the logits (a
    pruned checkpoint has neither). A layer whose experts a token table picks (DeepSeek-V4's hash layers)
    routes by REMAP(its table), the table the pruned checkpoint holds in the original expert numbers. A call
    in which the router's weight was never seen raises UnsupportedError (nothing could be restricted: never a
    silent no-op)."""

    def __init__(self, model, family, config: dict, index: int, layer, removed: list[int], remap=None):
        offset = family.decoder_offset(config) if family.decoder_offset else 0
        name = module_in(model, family, module_name(family.router_module, index, offset))
        self.router = model.get_submodule(name)
        # the hooks go on the router's parent (the MoE block): the engine also calls the decoder
        # layer with its forward stubbed out, to learn each layer's arguments
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else layer
        self.bias = _correction_bias(model, family, config, index, offset)
        self.table = router_tensor(model, family, Role.ROUTER_HASH, index, offset) if remap else None
        if remap and self.table is None:
            raise UnsupportedError(f"{family.title}: layer {index}'s token table is not where moetool looks for it")
        self.remap, self._remapped = remap, None
        self.index, self.removed = index, removed
        self.model, self.family, self.offset = model, family, offset
        self._mode = self._saved_bias = self._saved_table = None
        self._handles = [parent.register_forward_pre_hook(self._enter),
                         parent.register_forward_hook(self._leave, always_call=True)]

    def _enter(self, module, args) -> None:   # the weight as installed now (streamed layers change)
        import torch

        if self.bias is not None:
            self._saved_bias = self.bias.data.clone()
            self.bias.data[..., torch.tensor(self.removed, device=self.bias.device)] = float("-inf")
        if self.table is not None:   # (remapped once, from the table as installed)
            self._saved_table = self.table.data.clone()
            if self._remapped is None:
                self._remapped = self.remap(self._saved_table.cpu()).to(self.table.device)
            self.table.data.copy_(self._remapped)
        named = router_tensor(self.model, self.family, Role.ROUTER, self.index, self.offset)
        self._mode = _masking_mode(_router_weight(self.router, named), self.removed)
        self._mode.__enter__()

    def _leave(self, module, args, output) -> None:
        masked = self._restore()
        if not masked:   # (after a failed forward torch silences this, and the real error goes on)
            raise UnsupportedError(f"layer {self.index}: the router's weight was never applied through F.linear, "
                                   "so moetool cannot run the layer pruned")

    def _restore(self) -> int | None:
        """Leave the mode and put the bias back (also after an interrupted call); the masked count."""
        mode, self._mode = self._mode, None
        if mode is not None:
            mode.__exit__(None, None, None)
        if self._saved_bias is not None:
            self.bias.data.copy_(self._saved_bias)
            self._saved_bias = None
        if self._saved_table is not None:
            self.table.data.copy_(self._saved_table)
            self._saved_table = None
        return None if mode is None else mode.masked

    def remove(self) -> None:
        self._restore()
        for handle in self._handles:
            handle.remove()


class SequentialPrune:
    """The engine's ``calibrate`` for `prune --sequential`.

    Args:
        model: the streamed model (its routers are found by the family's module names).
        family, config: the model's family and config.
        layers: MoE layer -> (experts, top_k).
        choose: callable(layer, LayerTotals) -> (kept experts, merge groups or None, table remap or None), the
            merge groups mapping each kept expert to [(expert, weight), ...] folded into it, the remap giving a
            token-table layer's table as the pruned checkpoint holds it, in the original expert numbers.
        saliency: measure REAP's terms as well (criteria reap and ean).
        device, seq_len: where the statistics are kept, and the calibration sequences' length.
        distributed: under torchrun, each rank runs its share of the sequences and the layer's
            statistics are summed over the ranks before the choice, so every rank chooses the same.
    """

    def __init__(self, model, family, config: dict, layers: dict[int, tuple[int, int]], choose, *,
                 saliency: bool = False, device=None, seq_len: int = 1, distributed: bool = False):
        if family.router_module is None:
            raise UnsupportedError(f"{family.title}: routing capture is not supported for this family")
        self.model, self.family, self.config, self.layers = model, family, config, layers
        self.identity = family.zero_experts(family.settings(config))   # identity experts: never removed
        self.choose, self.saliency = choose, saliency
        self.device, self.seq_len, self.distributed = device, seq_len, distributed
        self.kept: dict[int, list[int]] = {}
        self._capture: RouterCapture | None = None
        self._stats: RoutingStats | None = None
        self._restrictions: list[RouterRestriction] = []

    def observe(self, index: int, layer, batch, ids):
        if index not in self.layers:
            return nullcontext()
        return self._observing(index, batch, ids)

    @contextmanager
    def _observing(self, index: int, batch, ids):
        if self._capture is None:   # this layer's router hooked for its first pass only
            top_k = self.layers[index][1]
            self._capture = RouterCapture(self.model, self.family, self.config, [index], lambda _: top_k,
                                          stats=self._layer_stats(index, ids.device), saliency=self.saliency)
        self._capture.set_batch(batch.first_sequence, *ids.shape)
        yield

    def update(self, index: int, layer) -> None:
        if index not in self.layers:
            return
        if self._capture is not None:
            self._capture.close()
        stats = self._layer_stats(index, self.device)   # (a rank given no sequences has none of its own)
        self._capture = self._stats = None
        if self.distributed:
            stats.all_reduce()
        totals = stats[index].totals()
        if not totals.tokens:
            raise UnsupportedError(f"layer {index}: its router never ran, so its experts cannot be scored")
        kept, groups, remap = self.choose(index, totals)
        self.kept[index] = kept
        experts = self.layers[index][0]
        if groups:
            self._fold(index, layer, groups, experts)
        removed = [e for e in range(experts) if e not in kept]
        if removed:
            self._restrictions.append(RouterRestriction(self.model, self.family, self.config, index, layer, removed,
                                                        remap))

    def _layer_stats(self, index: int, device) -> RoutingStats:
        if self._stats is None:
            self._stats = RoutingStats({index: self.layers[index]}, device, capacity_window=self.seq_len,
                                       identity=self.identity)
        return self._stats

    def _fold(self, index: int, layer, groups: dict[int, list[tuple[int, float]]], experts: int) -> None:
        """Each kept expert's stacked weights (and biases) replaced by the weighted sum of its group."""
        found = experts_modules(layer)
        if len(found) != 1:
            raise UnsupportedError(f"layer {index}: --merge with --sequential needs the layer's experts in one "
                                   "stacked experts module (transformers 5's layout)")
        module = found[0][1]
        for _, param in module.named_parameters(recurse=False):
            if param.ndim < 2 or param.shape[0] not in (experts, experts + self.identity):   # (identity rows: unread)
                continue
            # a kept expert's row is read only by its own group, and removed rows are never written
            for k, members in groups.items():
                merged = sum(param.data[e].float() * w for e, w in members)
                param.data[k] = merged.to(param.dtype)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
        for restriction in self._restrictions:
            restriction.remove()
        self._restrictions.clear()
