"""What sequential calibration observes in a decoder layer: the inputs of each routed expert.

transformers 5 runs a layer's routed experts in one module holding them stacked (``gate_up_proj``
[E, 2I, H] with gate rows first, ``down_proj`` [E, H, I], ``act_fn``), called as
``experts(hidden [T, H], top_k_index [T, k], top_k_weights)``. A forward pre-hook there sees which
tokens the router sent to each expert, so each expert gets a Hessian of its own inputs only: the
hidden states of its routed tokens for gate/up, and act(gate x) * up x of those tokens for down
(what GPTQ per expert needs). Experts that received few tokens are listed by their counts.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import replace

from moetool.errors import UnsupportedError
from moetool.quant.gptq import Hessian


def experts_modules(layer) -> list[tuple[str, object]]:
    """The stacked routed-experts modules of a decoder layer (name within the layer, module)."""
    found = []
    for name, module in layer.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if getattr(gate_up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn"):
            if getattr(module, "is_transposed", False) or not getattr(module, "is_concatenated", True) or \
                    getattr(module, "has_bias", False):
                raise UnsupportedError(f"{type(module).__name__}: its experts are stored transposed, interleaved or "
                                       "with biases; per-expert calibration covers the [gate; up] layout without "
                                       "biases")
            found.append((name, module))
    return found


class ExpertInputs:
    """Per-expert input Hessians of one stacked experts module, accumulated while it runs."""

    def __init__(self, module):
        self.module = module
        experts, double_inter, hidden = module.gate_up_proj.shape
        self.experts, self.inter = experts, double_inter // 2
        device = module.gate_up_proj.device
        self.gate_up = [Hessian(hidden, device=device) for _ in range(experts)]
        self.down = [Hessian(self.inter, device=device) for _ in range(experts)]

    def hook(self, module, args) -> None:
        import torch

        hidden, index = args[0], args[1]
        x = hidden.reshape(-1, hidden.shape[-1])
        routed = index.reshape(x.shape[0], -1)
        for e in torch.unique(routed).tolist():   # calibration: one host sync per module call is fine
            if not 0 <= e < self.experts:
                continue   # padding ids some routers use for dropped slots
            xe = x[(routed == e).any(-1)].float()
            self.gate_up[e].add(xe)
            gate, up = torch.nn.functional.linear(xe, module.gate_up_proj[e].float()).chunk(2, dim=-1)
            self.down[e].add(module.act_fn(gate) * up)

    def tokens(self) -> list[int]:
        """Tokens routed to each expert."""
        return [h.tokens for h in self.gate_up]


@contextmanager
def observe_experts(layer, found: dict[str, ExpertInputs]):
    """Accumulate into FOUND (name -> ExpertInputs, created on first use) while the block runs."""
    with ExitStack() as stack:
        for name, module in experts_modules(layer):
            if name not in found:   # the Hessians are allocated once per layer, not per micro-batch
                found[name] = ExpertInputs(module)
            inputs = found[name]
            stack.callback(module.register_forward_pre_hook(inputs.hook).remove)
        yield found


class GptqExperts:
    """Sequential GPTQ of the routed experts (the engine's ``calibrate``): each layer's experts are
    quantized on the Hessians of their own routed tokens, as the compressed earlier layers deliver
    them, and their dequantized weights put in place before the layer runs again.

    Args:
        formats: (layer, expert) -> (gate Format | None, up Format | None, down Format | None).
        save: callable(layer, expert, {"gate"|"up"|"down": GptqResult}) for what is to be written.
        min_tokens: experts routed fewer tokens get their Hessian blended with the layer's
            all-token one (gate/up: every routed token's hidden state; down: the other experts'
            activations), with the weight of MIN_TOKENS tokens.
        write_back: put the quantized weights in place (sequential); False calibrates every layer
            on the unquantized model's activations.
    """

    def __init__(self, formats: dict, save, *, min_tokens: int = 128, damp: float = 0.01,
                 act_order: bool = False, write_back: bool = True):
        self.formats, self.save, self.write_back = formats, save, write_back
        self.min_tokens, self.damp, self.act_order = min_tokens, damp, act_order
        self.inputs: dict[int, dict[str, ExpertInputs]] = {}
        self.coverage: dict[int, list[int]] = {}        # layer -> tokens routed to each expert
        self.fallbacks: list[str] = []

    def observe(self, index: int, layer):
        return observe_experts(layer, self.inputs.setdefault(index, {}))

    def update(self, index: int, layer) -> None:
        import torch

        from moetool.quant.gptq import gptq

        found = self.inputs.pop(index, {})
        if len(found) > 1:
            raise UnsupportedError(f"decoder layer {index} holds {len(found)} routed-experts modules; sequential "
                                   "GPTQ handles one per layer")
        for inputs in found.values():
            self.coverage[index] = inputs.tokens()
            all_gate_up, all_down = _pooled(inputs.gate_up), _pooled(inputs.down)
            module = inputs.module
            for e in range(inputs.experts):
                gate_fmt, up_fmt, down_fmt = self.formats.get((index, e), (None, None, None))
                h_gate_up = _blend(inputs.gate_up[e], all_gate_up, self.min_tokens)
                h_down = _blend(inputs.down[e], all_down, self.min_tokens)
                weights, down = module.gate_up_proj.data[e], module.down_proj.data
                results = self._gate_up(index, e, weights, h_gate_up, gate_fmt, up_fmt, inputs.inter)
                if down_fmt is not None:
                    results["down"] = gptq(down[e], h_down, down_fmt, damp=self.damp, act_order=self.act_order,
                                           name=f"layer {index} expert {e} down")
                if self.write_back:
                    rows = {"gate": slice(0, inputs.inter), "up": slice(inputs.inter, 2 * inputs.inter)}
                    for part, result in results.items():
                        if part == "down":
                            down[e] = result.weight.to(down.dtype)
                        else:
                            weights[rows[part]] = result.weight.to(weights.dtype)
                self.fallbacks += [f"layer {index} expert {e} {p}: {r.fallback}" for p, r in results.items()
                                   if r.fallback]
                self.save(index, e, results)
        if found and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _gate_up(self, index: int, e: int, weights, hessian, gate_fmt, up_fmt, inter: int) -> dict:
        """GPTQ of expert E's gate and up rows; in one call when they share a format (rows are
        independent given the Hessian, so one factorisation serves both)."""
        from moetool.quant.gptq import gptq

        def run(rows, fmt, part):
            return gptq(weights[rows], hessian, fmt, damp=self.damp, act_order=self.act_order,
                        name=f"layer {index} expert {e} {part}")

        if gate_fmt is not None and gate_fmt == up_fmt:
            both = run(slice(0, 2 * inter), gate_fmt, "gate/up")
            return {part: replace(both, weight=both.weight[rows], parts={k: v[rows] for k, v in both.parts.items()})
                    for part, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter)))}
        return {part: run(rows, fmt, part) for part, fmt, rows in
                (("gate", gate_fmt, slice(0, inter)), ("up", up_fmt, slice(inter, 2 * inter))) if fmt is not None}


def _pooled(hessians: list[Hessian]):
    """The Hessian of every expert's tokens together (token-weighted)."""
    total = Hessian(hessians[0].columns, device=hessians[0].sum.device)
    for h in hessians:
        total.merge(h)
    return total


def _blend(own: Hessian, pooled: Hessian, min_tokens: int):
    """OWN's matrix, or for an expert routed fewer than MIN_TOKENS tokens, its tokens' Hessian and
    the pooled one weighted as MIN_TOKENS - n more tokens."""
    n = own.tokens
    if n >= min_tokens or not pooled.tokens:
        return own.matrix()
    return (own.matrix() * n + pooled.matrix() * (min_tokens - n)) / min_tokens
