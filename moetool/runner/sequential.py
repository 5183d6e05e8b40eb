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
            inputs = found.setdefault(name, ExpertInputs(module))
            stack.callback(module.register_forward_pre_hook(inputs.hook).remove)
        yield found
