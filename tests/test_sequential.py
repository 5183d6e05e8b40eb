"""Sequential calibration on the layer-major runner: each layer is observed on the outputs of the
layers before it as already compressed, then compressed, then run again for the next layer."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from moetool.checkpoint import open_checkpoint
from moetool.runner.engine import micro_batches, run
from moetool.runner.model import load_model


class Recorder:
    """Records each layer's first-pass inputs; its update scales the routed experts of CHANGED layers."""

    def __init__(self, changed=()):
        self.changed, self.inputs, self.order = set(changed), {}, []

    @contextmanager
    def observe(self, index, layer):
        self.order.append(("observe", index))
        handle = layer.register_forward_pre_hook(
            lambda module, args: self.inputs.setdefault(index, []).append(args[0].clone()))
        try:
            yield
        finally:
            handle.remove()

    def update(self, index, layer):
        self.order.append(("update", index))
        if index in self.changed:
            layer.mlp.experts.down_proj.data.mul_(100)   # a change the next layer must see


def _final_states(loaded, batches, calibrate):
    out = {}
    run(loaded, batches, on_final=lambda b, h: out.__setitem__(b.slot, h.clone()), calibrate=calibrate)
    return torch.cat([out[k] for k in sorted(out)])


def test_later_layers_see_the_compressed_outputs(tiny):
    folder = tiny("qwen3_moe")
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    batches = micro_batches(ids, 4)
    with open_checkpoint(folder) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        plain, changed_run = Recorder(), Recorder(changed=(0,))
        want = _final_states(loaded, batches, None)
        assert torch.equal(_final_states(loaded, batches, plain), want)   # a no-op update changes nothing
        got = _final_states(loaded, batches, changed_run)
    assert plain.order == [("observe", 0), ("observe", 0), ("update", 0), ("observe", 1), ("observe", 1),
                           ("update", 1)]   # each micro-batch observed, then the layer compressed
    assert len(plain.inputs[0]) == 2 and torch.equal(plain.inputs[0][0], changed_run.inputs[0][0])
    # layer 1 was observed on the outputs of layer 0 as changed, as in this model:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.mul_(100)
        seen = {}
        model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.setdefault("in", a[0]))
        oracle = model.model(ids[:4]).last_hidden_state
    assert torch.allclose(changed_run.inputs[1][0], seen["in"], atol=1e-5)
    assert not torch.allclose(plain.inputs[1][0], seen["in"], atol=1e-3)
    assert torch.allclose(got[:4], oracle, atol=1e-5)
