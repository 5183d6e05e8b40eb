"""Sequential pruning on the layer-major runner: each MoE layer's experts are scored on the hidden
states that the already-pruned earlier layers deliver, then the layer is pruned before it runs again
for the next layer (llm-compressor's REAP with ``propagate_error`` works this way).

Pruning a layer in place means routing as the pruned checkpoint routes: a model pruned to a subset
S of experts equals the original whose router logits outside S are -inf before top-k
(tests/test_prune.py checks this for every family prune supports). So the layer's second pass runs
under a torch function mode that sets those logits to -inf wherever the router's weight is applied
(`F.linear(x, router.weight)`, inside the router module or not). With ``--merge``, the kept experts'
stacked weights are replaced by the weighted sums the output checkpoint will hold.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

from moetool.errors import UnsupportedError
from moetool.runner.capture import RouterCapture, module_name
from moetool.runner.sequential import experts_modules
from moetool.runner.stats import RoutingStats


def _router_weight(router):
    """The weight a router module applies (Hunyuan's gate holds an nn.Linear, JetMoE's router a .layer)."""
    weight = getattr(router, "weight", None)
    if weight is None:
        weight = next((p for n, p in router.named_parameters() if n.endswith("weight")), None)
    if weight is None:
        raise UnsupportedError(f"{type(router).__name__}: no router weight to restrict")
    return weight


def _masking_mode(weight, removed: list[int]):
    """A torch function mode: the outputs of F.linear with WEIGHT get -inf in the REMOVED columns."""
    import torch
    from torch.overrides import TorchFunctionMode

    linear = torch.nn.functional.linear
    gone = torch.tensor(removed, dtype=torch.long, device=weight.device)

    class RestrictRouter(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is linear and len(args) > 1 and args[1].data_ptr() == weight.data_ptr() and \
                    args[1].shape == weight.shape:
                out = out.index_fill(-1, gone.to(out.device), float("-inf"))
            return out

    return RestrictRouter()


class SequentialPrune:
    """The engine's ``calibrate`` for `prune --sequential`.

    Args:
        model: the streamed model (its routers are found by the family's module names).
        family, config: the model's family and config.
        layers: MoE layer -> (experts, top_k).
        choose: callable(layer, LayerTotals) -> (kept experts, merge groups or None), the merge
            groups mapping each kept expert to [(expert, weight), ...] folded into it.
        saliency: measure REAP's terms as well (criteria reap and ean).
    """

    def __init__(self, model, family, config: dict, layers: dict[int, tuple[int, int]], choose, *,
                 saliency: bool = False):
        if family.router_module is None:
            raise UnsupportedError(f"{family.title}: routing capture is not supported for this family")
        self.model, self.family, self.config, self.layers = model, family, config, layers
        self.choose, self.saliency = choose, saliency
        self.offset = family.decoder_offset(config) if family.decoder_offset else 0
        self.kept: dict[int, list[int]] = {}
        self.totals: dict[int, object] = {}
        self._capture: RouterCapture | None = None
        self._stats: RoutingStats | None = None
        self._handles: list = []

    def observe(self, index: int, layer, batch, ids):
        if index not in self.layers:
            return nullcontext()
        return self._observing(index, batch, ids)

    @contextmanager
    def _observing(self, index: int, batch, ids):
        if self._capture is None:   # this layer's router hooked for its first pass only
            experts, top_k = self.layers[index]
            self._stats = RoutingStats({index: (experts, top_k)}, ids.device, capacity_window=ids.shape[1])
            self._capture = RouterCapture(self.model, self.family, self.config, [index], lambda _: top_k,
                                          stats=self._stats, saliency=self.saliency)
        self._capture.set_batch(batch.first_sequence, *ids.shape)
        yield

    def update(self, index: int, layer) -> None:
        if index not in self.layers:
            return
        if self._capture is None:
            raise UnsupportedError(f"layer {index}: its router never ran, so its experts cannot be scored")
        self._capture.close()
        totals = self._stats[index].totals()
        self._capture = self._stats = None
        kept, groups = self.choose(index, totals)
        self.kept[index], self.totals[index] = kept, totals
        experts = self.layers[index][0]
        if groups:
            self._fold(index, layer, groups, experts)
        removed = [e for e in range(experts) if e not in kept]
        if not removed:
            return
        router = self.model.get_submodule(module_name(self.family.router_module, index, self.offset))
        state = {}

        def enter(module, args):   # the weight as installed now (streamed layers are installed per pass)
            state["mode"] = _masking_mode(_router_weight(router), removed)
            state["mode"].__enter__()

        def leave(module, args, output):
            mode = state.pop("mode", None)
            if mode is not None:
                mode.__exit__(None, None, None)

        self._handles += [layer.register_forward_pre_hook(enter),
                          layer.register_forward_hook(leave, always_call=True)]

    def _fold(self, index: int, layer, groups: dict[int, list[tuple[int, float]]], experts: int) -> None:
        """Each kept expert's stacked weights (and biases) replaced by the weighted sum of its group."""
        import torch

        found = experts_modules(layer)
        if len(found) != 1:
            raise UnsupportedError(f"layer {index}: --merge with --sequential needs the layer's experts in one "
                                   "stacked experts module (transformers 5's layout)")
        module = found[0][1]
        for _, param in module.named_parameters(recurse=False):
            if param.ndim < 2 or param.shape[0] != experts:
                continue
            source = param.data.float().clone()
            for k, members in groups.items():
                merged = sum(source[e] * w for e, w in members)
                param.data[k] = torch.as_tensor(merged).to(param.dtype)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.close()
            self._capture = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
