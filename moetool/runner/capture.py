"""Record routing decisions by hooking each MoE layer's router module (names from arch data).

Per MoE layer and token: the chosen experts and their weights exactly as the family routes
(taken from the router's own output, or recomputed from its logits with the family's maths
where the module returns logits only), plus the router distribution's entropy, top-1
probability and top-1/top-2 margin. They go to the run's on-device accumulators
(runner/stats.py) and, with a trace, to its writer: the hooks themselves never copy to the host.

A module that computes its router's logits without calling the router module (transformers'
MXFP4 GPT-OSS MLP on CUDA does) would leave the hook silent: the router's parent module (unless it
is the decoder layer itself) is watched too, and when its forward ran without the router firing, the
router is called on the parent's input so that the routing is recorded all the same.
"""

from __future__ import annotations

from moetool.arch import Family, Role
from moetool.errors import UnsupportedError
from moetool.runner.modules import module_in


def _score_function(family: Family, config: dict) -> str:
    """How the router scores experts, as the config makes it: "sigmoid" (DeepSeek-V3, MiniMax-M2, Llama 4;
    Cohere2-MoE's sigmoid selection), "sqrtsoftplus" (DeepSeek-V4) or "softmax"."""
    if family.router is None:
        return "softmax"
    score = family.router.resolved(family.settings(config)).score
    return next((kind for kind in ("sigmoid", "sqrtsoftplus") if score.startswith(kind)), "softmax")


def _distribution(logits, scores: str):
    """The router's probability over experts: softmax of the logits, or the normalised scores of routers
    that score each expert apart (sigmoid, sqrt(softplus))."""
    import torch

    logits = logits.float()
    if scores == "softmax":
        return torch.softmax(logits, dim=-1)
    scored = torch.sigmoid(logits) if scores == "sigmoid" else torch.nn.functional.softplus(logits).sqrt()
    return scored / scored.sum(-1, keepdim=True)


def _parse(output, family: Family, config, top_k: int, bias=None):
    """(index [T,k], weight [T,k], logits [T,E]) from a router module's output (BIAS: the router's selection
    bias, for the kinds that recompute the picks)."""
    import torch

    kind = family.router_output
    if kind == "topk":
        logits, weight, index = output[0], output[1], output[2]
    elif kind == "topk-skip":   # ZAYA: (logits [T,R], ...) whose skip picks transformers masks to expert 0 at weight
        # 0; the picks as it makes them: softmax, + the balancing biases (fp32), top-k; weighted by the softmax
        logits = output[0]
        probs = torch.softmax(logits, dim=-1)
        index = torch.topk(probs.float() + bias, top_k, dim=-1).indices
        weight = probs.gather(1, index)
    elif kind == "topk-probs":  # (softmax probabilities [T,E], weights, index): Gemma 4; log p has softmax p
        logits, weight, index = output[0].float().clamp_min(1e-30).log(), output[1], output[2]
    elif kind == "llama4":      # (scores [T,E]: sigmoid of the top-k logits, others 0; logits [T,E])
        scores, logits = output
        index = torch.topk(logits, top_k, dim=-1).indices
        weight = scores.gather(1, index)
    elif kind == "jetmoe":      # (..., logits): top-k of logits, softmax over the chosen
        logits = output[-1]
        values, index = torch.topk(logits, top_k, dim=-1)
        weight = torch.softmax(values.float(), dim=-1)
    elif kind == "logits":      # DBRX: softmax, top-k, weights divided by their p-norm
        logits = output[0] if isinstance(output, tuple) else output
        probs = torch.softmax(logits.float(), dim=-1)
        weight, index = torch.topk(probs, top_k, dim=-1)
        p = (config.get("ffn_config") or {}).get("moe_normalize_expert_weights")
        if p is not None:
            weight = weight / torch.norm(weight, p=p, dim=-1, keepdim=True)
    elif kind == "switch":      # (dispatch [B,S,E], top-1 probability [B,S,1], logits [B,S,E]); top-1
        experts = output[2].shape[-1]
        logits = output[2].reshape(-1, experts)
        index = logits.argmax(-1, keepdim=True)
        weight = output[1].reshape(-1, 1)
    elif kind == "nllb":        # (dispatch [T,E], combine weights [T,E], logits [T,E]); top-2
        logits = output[2]
        index = torch.topk(logits, 2, dim=-1).indices
        weight = output[1].gather(1, index)
    else:
        raise UnsupportedError(f"{family.title}: routing capture is not supported for this family")
    return index, weight, logits


def router_tensor(model, family: Family, role: Role, layer: int, decoder_offset: int = 0):
    """The tensor of ROLE (a router's weight, correction bias or token table) of LAYER in the built MODEL as it is
    installed now (streamed layers change), or None where the model holds none under the family's names."""
    for layout in ("fused", "per-expert"):
        template = family.templates(layout).get(role)
        if template is None:
            continue
        owner, _, attr = module_name(template, layer, decoder_offset).rpartition(".")
        owner = module_in(model, family, owner)   # (the module, found under a wrapper's prefix too)
        try:
            return getattr(model.get_submodule(owner), attr)
        except AttributeError:
            continue
    return None


def module_name(template, layer: int, decoder_offset: int) -> str:
    """The module of LAYER from a template, or from (encoder, decoder) templates for seq2seq models."""
    if isinstance(template, str):
        return template.replace("{L}", str(layer))
    encoder, decoder = template
    if decoder_offset and layer >= decoder_offset:
        return decoder.replace("{D}", str(layer - decoder_offset))
    return encoder.replace("{L}", str(layer))


class RouterCapture:
    """Forward hooks on the router of every MoE layer, feeding STATS (a RoutingStats) and TRACE (a
    TraceWriter, optional); removed by close(). The engine calls set_batch() before each
    micro-batch and step_done() after it."""

    def __init__(self, model, family: Family, config: dict, moe_layers: list[int], top_k_at, stats=None,
                 trace=None, saliency: bool = False):
        if family.router_module is None:
            raise UnsupportedError(f"{family.title}: routing capture is not supported for this family")
        offset = family.decoder_offset(config) if family.decoder_offset else 0
        self.stats, self.trace = stats, trace
        self.batch = (0, 1, 1)   # first sequence, sequences, positions of the running micro-batch
        self._handles = []
        self._fired: dict[int, bool] = {}
        for layer in moe_layers:
            name = module_in(model, family, module_name(family.router_module, layer, offset))
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UnsupportedError(f"{family.title}: no router module {name} in the transformers model") from None
            self._handles.append(module.register_forward_hook(self._router_hook(model, family, config, layer,
                                                                                top_k_at(layer), offset)))
            parent = name.rpartition(".")[0]
            # not a decoder layer itself (Gemma 4's layers.{L}.router): the layer's forward always calls its
            # router, and the streamed runner's stand-ins for layer forwards run none
            if parent and not parent.rpartition(".")[2].isdigit():
                self._watch_parent(model.get_submodule(parent), module, layer)
            if saliency:
                self._handles.append(self._saliency_hook(model, family, layer))

    def set_batch(self, first_sequence: int, sequences: int, positions: int) -> None:
        self.batch = (first_sequence, sequences, positions)

    def step_done(self) -> None:
        if self.trace is not None:
            self.trace.step_done()

    def _router_hook(self, model, family: Family, config: dict, layer: int, k: int, offset: int):
        import torch

        scores = _score_function(family, config)
        recomputed = family.router_output == "topk-skip"   # (the picks, from the logits and the selection bias)

        def hook(module, args, output):
            self._fired[layer] = True
            first, batch, seq = self.batch
            with torch.no_grad():
                # (the router's own tensor as installed now: streamed layers change)
                bias = router_tensor(model, family, Role.ROUTER_CORRECTION, layer, offset) if recomputed else None
                index, weight, logits = _parse(output, family, config, k, bias)
                probs = _distribution(logits, scores)
                top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
                entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
                router = torch.stack([entropy, top2[:, 0], top2[:, 0] - top2[:, -1]], dim=-1)
                shape = (batch, seq, index.shape[-1])
                index = index.reshape(shape).long()
                weight = weight.reshape(shape).float()
                router = router.reshape(batch, seq, 3).float()
                if self.stats is not None:   # to the run's device (a device map spreads layers over GPUs)
                    device = self.stats[layer].device
                    index, weight, router = (t.to(device, non_blocking=True) for t in (index, weight, router))
                    self.stats[layer].update(index, first, weight, router)
                if self.trace is not None:
                    self.trace.add(layer, index, weight, router)
        return hook

    def _watch_parent(self, parent, router, layer: int) -> None:
        """Call ROUTER on PARENT's input when PARENT's forward did not (see the module docstring)."""
        def before(module, args):
            self._fired[layer] = False

        def after(module, args, output):
            if not self._fired.get(layer, True) and args:
                hidden = args[0]
                router(hidden.reshape(-1, hidden.shape[-1]))
        self._handles += [parent.register_forward_pre_hook(before), parent.register_forward_hook(after)]

    def _saliency_hook(self, model, family: Family, layer: int):
        """For each token and chosen slot j: the norm of the experts' output with only slot j's weight
        kept, i.e. ||w_j * expert_j(x)||, the per-token term of REAP's saliency."""
        import torch

        if family.experts_module is None:
            raise UnsupportedError(f"{family.title}: saliency needs an experts(hidden, index, weights) module, "
                                   "which this family does not have")
        module = model.get_submodule(module_in(model, family, module_name(family.experts_module, layer, 0)))
        # experts working in a latent space: their output, mapped back to the hidden states (without the
        # projection's bias, which the layer adds once to the sum of the slots)
        # (its weight is read as the hook runs: streamed mode loads it with the layer)
        back = None if family.experts_output_module is None else model.get_submodule(
            module_in(model, family, module_name(family.experts_output_module, layer, 0)))

        def hook(module, args, kwargs, output):
            hidden, index, weights = (list(args) + list(kwargs.values()))[:3]
            with torch.no_grad():
                norms = []
                for slot in range(index.shape[1]):
                    only = torch.zeros_like(weights)
                    only[:, slot] = weights[:, slot]
                    out = module.forward(hidden, index, only)
                    weight = getattr(back, "weight", None)   # None: an nn.Identity (no latent space)
                    if weight is not None:
                        out = torch.nn.functional.linear(out.to(weight.dtype), weight)
                    norms.append(out.float().norm(dim=-1))
                salience = torch.stack(norms, dim=1)
                if self.stats is not None:
                    device = self.stats[layer].device
                    salience = salience.to(device, non_blocking=True)
                    self.stats[layer].update_salience(index.long().to(device, non_blocking=True),
                                                      weights.to(device, non_blocking=True), salience)
                if self.trace is not None:
                    first, batch, seq = self.batch
                    self.trace.add_salience(layer, salience.reshape(batch, seq, -1))

        return module.register_forward_hook(hook, with_kwargs=True)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
