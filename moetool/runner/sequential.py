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

from moetool.errors import UnsupportedError, UsageError
from moetool.quant.gptq import Hessian
from moetool.runner import distributed


def experts_modules(layer) -> list[tuple[str, object]]:
    """The stacked routed-experts modules of a decoder layer (name within the layer, module)."""
    found = []
    for name, module in layer.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if getattr(gate_up, "ndim", 0) == 3 and getattr(down, "ndim", 0) == 3 and hasattr(module, "act_fn"):
            # [E, 2I, H] and [E, H, I]; Llama 4's are [E, H, 2I] and [E, I, H] without saying so
            stacked = down.shape[1] == gate_up.shape[2] and 2 * down.shape[2] == gate_up.shape[1]
            if not stacked or getattr(module, "is_transposed", False) or \
                    not getattr(module, "is_concatenated", True) or getattr(module, "has_bias", False):
                raise UnsupportedError(f"{type(module).__name__}: its experts are stored transposed, interleaved or "
                                       "with biases; per-expert calibration covers the [gate; up] layout without "
                                       "biases")
            found.append((name, module))
    return found


def _activation(module, gate_up):
    """The input of down_proj for GATE_UP ([T, 2I], gate rows first) as MODULE's forward computes it: through
    its `_apply_gate`, where transformers gives the experts one (clamped SwiGLU: DeepSeek-V4's, Step 3.7's
    swiglu_limit), else act(gate) * up."""
    apply_gate = getattr(module, "_apply_gate", None)
    if apply_gate is not None:
        return apply_gate(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


class ExpertInputs:
    """Per-expert input Hessians of one stacked experts module, accumulated while it runs."""

    def __init__(self, module):
        self.module = module
        _, double_inter, hidden = module.gate_up_proj.shape
        experts = module.down_proj.shape[0]   # (gate_up may also hold rows of identity experts, which compute nothing)
        self.experts, self.inter = experts, double_inter // 2
        device = module.gate_up_proj.device
        self.gate_up = [Hessian(hidden, device=device) for _ in range(experts)]
        self.down = [Hessian(self.inter, device=device) for _ in range(experts)]

    def hook(self, module, args) -> None:
        import torch

        hidden, index = args[0], args[1]
        x = hidden.reshape(-1, hidden.shape[-1])
        routed = index.reshape(x.shape[0], -1)
        if len(args) > 2 and getattr(args[2], "shape", None) is not None and args[2].numel() == routed.numel():
            # a slot of weight 0 adds nothing to the token's output (ZAYA's skip picks, which transformers hands the
            # experts as expert 0 at weight 0): not that expert's input
            routed = routed.masked_fill(args[2].reshape(routed.shape) == 0, -1)
        for e in torch.unique(routed).tolist():   # calibration: one host sync per module call is fine
            if not 0 <= e < self.experts:
                continue   # padding ids some routers use for dropped slots
            xe = x[(routed == e).any(-1)].float()
            self.gate_up[e].add(xe)
            gate_up = torch.nn.functional.linear(xe, module.gate_up_proj[e].float())
            self.down[e].add(_activation(module, gate_up))

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


class LinearInputs:
    """All-token input Hessians of a decoder layer's nn.Linear modules (attention, shared experts,
    dense MLPs): modules called on the same input tensor (q, k and v; gate and up) share one."""

    def __init__(self):
        self.hessians: dict[object, Hessian] = {}   # module -> its Hessian (shared ones appear twice)
        self._last = (None, None)                    # (input tensor, Hessian) of the latest call

    @contextmanager
    def observe(self, modules):
        with ExitStack() as stack:
            for module in modules:
                stack.callback(module.register_forward_pre_hook(self._hook).remove)
            yield
        self._last = (None, None)

    def _hook(self, module, args) -> None:
        x = args[0]
        if module not in self.hessians:   # first call: share the Hessian of a module fed the same tensor
            last_x, last_h = self._last
            self.hessians[module] = last_h if last_x is x else Hessian(x.shape[-1], device=x.device)
            if last_x is x:
                self._last = (x, last_h)
                return
        hessian = self.hessians[module]
        if self._last[0] is x and self._last[1] is hessian:
            return   # a sharing module: these tokens are in already
        hessian.add(x.float())
        self._last = (x, hessian)


class _LayerCalibrator:
    """Per-layer Hessians of the routed experts (and of the Linear modules in LINEAR), accumulated in
    the engine's first pass over a layer; subclasses say what `update` does with them."""

    def __init__(self, *, min_tokens: int, damp: float, act_order: bool, linear: dict | None = None):
        self.min_tokens, self.damp, self.act_order = min_tokens, damp, act_order
        self.linear = linear or {}                      # nn.Linear module -> (weight name, Format)
        self.inputs: dict[int, dict[str, ExpertInputs]] = {}
        self.linear_inputs: dict[int, LinearInputs] = {}
        self.coverage: dict[int, list[int]] = {}        # layer -> tokens routed to each expert
        self.fallbacks: list[str] = []

    @contextmanager
    def observe(self, index: int, layer, batch=None, ids=None):
        modules = [m for m in layer.modules() if m in self.linear]
        with observe_experts(layer, self.inputs.setdefault(index, {})), \
                self.linear_inputs.setdefault(index, LinearInputs()).observe(modules):
            yield

    def _experts(self, index: int):
        """(module, expert, gate/up weight rows [2I, H], gate/up Hessian, down Hessian) of every routed
        expert of layer INDEX, its few-token experts' Hessians blended (see GptqExperts). Under
        torchrun every Hessian of the layer is first summed over the ranks (each ran its share of the
        sequences), so every rank quantizes the layer as one process would."""
        found = self.inputs.pop(index, {})
        linear = self.linear_inputs.get(index, LinearInputs()).hessians.values()
        hessians = [h for inputs in found.values() for h in inputs.gate_up + inputs.down] + list(
            {id(h): h for h in linear}.values())   # (shared Hessians appear once per module)
        for h in hessians:   # the same tensors in the same order on every rank; a no-op in one process
            distributed.all_reduce(h.sum)
            distributed.all_reduce(h.count)
        if len(found) > 1:
            raise UnsupportedError(f"decoder layer {index} holds {len(found)} routed-experts modules; sequential "
                                   "GPTQ handles one per layer")
        for inputs in found.values():
            self.coverage[index] = inputs.tokens()
            all_gate_up, all_down = _pooled(inputs.gate_up), _pooled(inputs.down)
            for e in range(inputs.experts):
                yield (inputs, e, _blend(inputs.gate_up[e], all_gate_up, self.min_tokens),
                       _blend(inputs.down[e], all_down, self.min_tokens))

    def _gptq(self, weight, hessian, fmt, name: str):
        from moetool.quant.gptq import gptq

        result = gptq(weight, hessian, fmt, damp=self.damp, act_order=self.act_order, name=name)
        if result.fallback:
            self.fallbacks.append(f"{name}: {result.fallback}")
        return result

    def _gate_up(self, index: int, e: int, weights, hessian, gate_fmt, up_fmt, inter: int) -> dict:
        """GPTQ of expert E's gate and up rows; in one call when they share a format (rows are
        independent given the Hessian, so one factorisation serves both)."""
        if gate_fmt is not None and gate_fmt == up_fmt:
            both = self._gptq(weights[:2 * inter], hessian, gate_fmt, f"layer {index} expert {e} gate/up")
            return {part: replace(both, weight=both.weight[rows], parts={k: v[rows] for k, v in both.parts.items()})
                    for part, rows in (("gate", slice(0, inter)), ("up", slice(inter, 2 * inter)))}
        return {part: self._gptq(weights[rows], hessian, fmt, f"layer {index} expert {e} {part}")
                for part, fmt, rows in (("gate", gate_fmt, slice(0, inter)), ("up", up_fmt, slice(inter, 2 * inter)))
                if fmt is not None}

    def _done(self, index: int) -> None:
        import torch

        self.linear_inputs.pop(index, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class GptqExperts(_LayerCalibrator):
    """Sequential GPTQ (the engine's ``calibrate``): each layer's routed experts are quantized on the
    Hessians of their own routed tokens, and the Linear modules --rules quantize (attention, shared
    experts, dense MLPs) on the Hessians of all the layer's tokens, as the compressed earlier layers
    deliver them; the dequantized weights are put in place before the layer runs again.

    Args:
        formats: (layer, expert) -> (gate Format | None, up Format | None, down Format | None).
        save: callable(layer, expert, {"gate"|"up"|"down": GptqResult}) for what is to be written.
        linear: nn.Linear module -> (weight name, Format) for the other weights GPTQ quantizes.
        save_linear: callable(weight name, GptqResult).
        min_tokens: experts routed fewer tokens get their Hessian blended with the layer's
            all-token one (gate/up: every routed token's hidden state; down: the other experts'
            activations), with the weight of MIN_TOKENS tokens.
        write_back: put the quantized weights in place (sequential); False calibrates every layer
            on the unquantized model's activations.
    """

    def __init__(self, formats: dict, save, *, linear: dict | None = None, save_linear=None, min_tokens: int = 128,
                 damp: float = 0.01, act_order: bool = False, write_back: bool = True):
        super().__init__(min_tokens=min_tokens, damp=damp, act_order=act_order, linear=linear)
        self.formats, self.save, self.save_linear, self.write_back = formats, save, save_linear, write_back
        self.changes_layers = write_back   # the engine's cue: without write-back, no second pass

    def update(self, index: int, layer) -> None:
        if not self.inputs.get(index) and any(key[0] == index for key in self.formats):
            # experts to quantize, but no stacked [gate; up] module seen running them: never RTN silently
            raise UnsupportedError(f"--method gptq: decoder layer {index}'s routed experts are not one stacked "
                                   "SwiGLU [gate; up] module (non-gated, clamped or packed experts), which "
                                   "per-expert GPTQ calibrates", hint="use --method rtn")
        for inputs, e, h_gate_up, h_down in self._experts(index):
            gate_fmt, up_fmt, down_fmt = self.formats.get((index, e), (None, None, None))
            module = inputs.module
            weights, down = module.gate_up_proj.data[e], module.down_proj.data
            results = self._gate_up(index, e, weights, h_gate_up, gate_fmt, up_fmt, inputs.inter)
            if down_fmt is not None:
                results["down"] = self._gptq(down[e], h_down, down_fmt, f"layer {index} expert {e} down")
            if self.write_back:
                rows = {"gate": slice(0, inputs.inter), "up": slice(inputs.inter, 2 * inputs.inter)}
                for part, result in results.items():
                    if part == "down":
                        down[e] = result.weight.to(down.dtype)
                    else:
                        weights[rows[part]] = result.weight.to(weights.dtype)
            self.save(index, e, results)
        for module, hessian in self.linear_inputs.get(index, LinearInputs()).hessians.items():
            name, fmt = self.linear[module]
            result = self._gptq(module.weight.data, hessian.matrix(), fmt, name)
            if self.write_back:
                module.weight.data.copy_(result.weight.to(module.weight.dtype))
            self.save_linear(name, result)
        self._done(index)


class GptqCosts(_LayerCalibrator):
    """What each candidate format costs each routed expert under GPTQ, measured layer by layer on the
    unquantized model: the output error trace((W - Q) H (W - Q)^T) of gate, up and down together on
    the expert's own Hessians (`costs[(layer, expert)][format id]`). Formats that cannot hold an
    expert's matrices are left out (`misfits`: format id -> why)."""

    changes_layers = False   # measures only: the engine keeps each layer's first-pass outputs

    def __init__(self, candidates: list, *, min_tokens: int = 128, damp: float = 0.01, act_order: bool = False):
        super().__init__(min_tokens=min_tokens, damp=damp, act_order=act_order)
        self.candidates = candidates
        self.costs: dict[tuple[int, int], dict[str, float]] = {}
        self.misfits: dict[str, str] = {}

    def update(self, index: int, layer) -> None:
        from moetool.quant.gptq import output_error

        for inputs, e, h_gate_up, h_down in self._experts(index):
            gate_up, down = inputs.module.gate_up_proj.data[e], inputs.module.down_proj.data[e]
            costs = self.costs.setdefault((index, e), {})
            for fmt in self.candidates:
                try:   # gate and up share the format: one GPTQ of the stacked [gate; up] rows
                    q_gate_up = self._gptq(gate_up, h_gate_up, fmt, f"layer {index} expert {e} gate/up")
                    q_down = self._gptq(down, h_down, fmt, f"layer {index} expert {e} down")
                except UsageError as exc:   # the format cannot hold these matrices
                    self.misfits.setdefault(fmt.id, str(exc))
                    continue
                costs[fmt.id] = (output_error(gate_up, q_gate_up.weight, h_gate_up) +
                                 output_error(down, q_down.weight, h_down))
        self._done(index)


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
