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
    def observe(self, index, layer, batch, ids):
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


def test_a_calibration_that_changes_nothing_runs_each_layer_once(tiny):
    """changes_layers = False: the first pass's outputs go on to the next layer (no second pass),
    and the model's outputs are those of a run without calibration."""
    folder = tiny("qwen3_moe")
    ids = torch.randint(0, 64, (6, 10), generator=torch.Generator().manual_seed(0))
    batches = micro_batches(ids, 4)
    with open_checkpoint(folder) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        want = _final_states(loaded, batches, None)
        once = Recorder()
        once.changes_layers = False
        calls = []
        handles = [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))   # not stubbed
                   for i, layer in enumerate(loaded.layers)]
        got = _final_states(loaded, batches, once)
        for handle in handles:
            handle.remove()
    assert torch.equal(got, want)
    assert calls == [0, 0, 1, 1]   # two micro-batches, one pass per layer


class HessianObserver:
    def __init__(self):
        self.found = {}

    def observe(self, index, layer, batch, ids):
        from moetool.runner.sequential import observe_experts

        return observe_experts(layer, self.found.setdefault(index, {}))

    def update(self, index, layer):
        pass


def test_each_expert_gets_the_hessians_of_its_routed_tokens(tiny):
    """Oracle: the hub checkpoint's own per-expert weights and router, top-k of the router logits
    on the MLP's input in transformers' full forward."""
    import transformers

    from moetool.checkpoint import open_checkpoint as open_ckpt

    folder = tiny("qwen3_moe")
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    observer = HessianObserver()
    with open_ckpt(folder) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
        run(loaded, micro_batches(ids, 2), calibrate=observer)
        weights = {n: t.load().float() for n, t in ckpt.tensors.items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    top_k = model.config.num_experts_per_tok
    for layer in range(model.config.num_hidden_layers):
        seen = {}
        handle = model.model.layers[layer].mlp.register_forward_pre_hook(
            lambda m, a, seen=seen: seen.setdefault("x", a[0]))
        with torch.no_grad():
            model.model(ids)
        handle.remove()
        x = seen["x"].reshape(-1, model.config.hidden_size)
        p = f"model.layers.{layer}.mlp."
        chosen = (x @ weights[p + "gate.weight"].T).topk(top_k, dim=-1).indices
        inputs = observer.found[layer]["mlp.experts"]
        for e in range(model.config.num_experts):
            xe = x[(chosen == e).any(-1)]
            assert inputs.tokens()[e] == xe.shape[0]
            want = 2 * xe.T @ xe / max(1, xe.shape[0])
            assert torch.allclose(inputs.gate_up[e].matrix(), want, atol=1e-5)
            a = torch.nn.functional.silu(xe @ weights[p + f"experts.{e}.gate_proj.weight"].T) * \
                (xe @ weights[p + f"experts.{e}.up_proj.weight"].T)
            assert torch.allclose(inputs.down[e].matrix(), 2 * a.T @ a / max(1, a.shape[0]), atol=1e-5)
        assert sum(inputs.tokens()) == top_k * x.shape[0]
