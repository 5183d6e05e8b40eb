"""Record routing decisions by hooking each MoE layer's router module (names from arch data).

Per MoE layer and token: the chosen experts and their weights exactly as the family routes
(taken from the router's own output, or recomputed from its logits with the family's maths
where the module returns logits only), plus the router distribution's entropy, top-1
probability and top-1/top-2 margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moetool.arch import Family
from moetool.errors import UnsupportedError


@dataclass
class LayerRouting:
    """Everything recorded for one MoE layer, in token order (row-major over batch x position)."""

    index: list = field(default_factory=list)      # [T, k] int tensors (CPU), per forward call
    weight: list = field(default_factory=list)     # [T, k] float32
    entropy: list = field(default_factory=list)    # [T] float32 (nats)
    top1: list = field(default_factory=list)       # [T] top-1 probability
    margin: list = field(default_factory=list)     # [T] top-1 minus top-2 probability
    salience: list = field(default_factory=list)   # [T, k] ||gate weight x expert output|| (with saliency)

    def cat(self, name: str):
        import torch

        return torch.cat(getattr(self, name)) if getattr(self, name) else torch.empty(0)


def _distribution(logits, family: Family):
    """The router's probability over experts: softmax of the logits, or normalised sigmoid scores
    for sigmoid routers (DeepSeek-V3, MiniMax-M2, Llama 4)."""
    import torch

    logits = logits.float()
    if family.router is not None and family.router.score.startswith("sigmoid"):
        scores = torch.sigmoid(logits)
        return scores / scores.sum(-1, keepdim=True)
    return torch.softmax(logits, dim=-1)


def _parse(output, family: Family, config, top_k: int):
    """(index [T,k], weight [T,k], logits [T,E]) from a router module's output."""
    import torch

    kind = family.router_output
    if kind == "topk":
        logits, weight, index = output[0], output[1], output[2]
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


def _module_name(template, layer: int, decoder_offset: int) -> str:
    """The module of LAYER from a template, or from (encoder, decoder) templates for seq2seq models."""
    if isinstance(template, str):
        return template.replace("{L}", str(layer))
    encoder, decoder = template
    if decoder_offset and layer >= decoder_offset:
        return decoder.replace("{D}", str(layer - decoder_offset))
    return encoder.replace("{L}", str(layer))


class RouterCapture:
    """Forward hooks on the router of every MoE layer; removed by close()."""

    def __init__(self, model, family: Family, config: dict, moe_layers: list[int], top_k_at, keep_logits=False,
                 saliency: bool = False):
        import torch

        if family.router_module is None:
            raise UnsupportedError(f"{family.title}: routing capture is not supported for this family")
        offset = family.decoder_offset(config) if family.decoder_offset else 0
        self.layers: dict[int, LayerRouting] = {layer: LayerRouting() for layer in moe_layers}
        self.logits: dict[int, list] = {layer: [] for layer in moe_layers} if keep_logits else {}
        self._handles = []
        for layer in moe_layers:
            name = _module_name(family.router_module, layer, offset)
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise UnsupportedError(f"{family.title}: no router module {name} in the transformers model") from None

            def hook(module, args, output, layer=layer):
                with torch.no_grad():
                    index, weight, logits = _parse(output, family, config, top_k_at(layer))
                    probs = _distribution(logits, family)
                    top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
                    rec = self.layers[layer]
                    rec.index.append(index.to(torch.int32).cpu())
                    rec.weight.append(weight.float().cpu())
                    rec.entropy.append(-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1).cpu())
                    rec.top1.append(top2[:, 0].cpu())
                    rec.margin.append((top2[:, 0] - top2[:, -1]).cpu())
                    if keep_logits:
                        self.logits[layer].append(logits.float().cpu())

            self._handles.append(module.register_forward_hook(hook))
            if saliency:
                self._handles.append(self._saliency_hook(model, family, layer))

    def _saliency_hook(self, model, family: Family, layer: int):
        """For each token and chosen slot j: the norm of the experts' output with only slot j's weight
        kept, i.e. ||w_j * expert_j(x)||, the per-token term of REAP's saliency."""
        import torch

        if family.experts_module is None:
            raise UnsupportedError(f"{family.title}: saliency needs an experts(hidden, index, weights) module, "
                                   "which this family does not have")
        module = model.get_submodule(_module_name(family.experts_module, layer, 0))

        def hook(module, args, kwargs, output):
            hidden, index, weights = (list(args) + list(kwargs.values()))[:3]
            with torch.no_grad():
                norms = []
                for slot in range(index.shape[1]):
                    only = torch.zeros_like(weights)
                    only[:, slot] = weights[:, slot]
                    norms.append(module.forward(hidden, index, only).float().norm(dim=-1))
                self.layers[layer].salience.append(torch.stack(norms, dim=1).cpu())

        return module.register_forward_hook(hook, with_kwargs=True)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
