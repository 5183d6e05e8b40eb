"""The runner's routing capture against transformers' own router logits and the families'
documented routing maths; `streamed` mode against `full` mode."""

import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from moetool.runner.capture import RouterCapture
from moetool.runner.model import load_model
from tests.tiny import DENSE, TINY, build_model

DECODER_MOE = sorted(f for f in TINY if f not in DENSE and f not in ("switch_transformers", "nllb-moe"))
BIASED = {"deepseek_v3": "mlp.gate.e_score_correction_bias", "glm4_moe": "mlp.gate.e_score_correction_bias",
          "dots1": "mlp.gate.e_score_correction_bias", "minimax_m2": "mlp.e_score_correction_bias",
          "ernie4_5_moe": "mlp.gate.moe_statics.e_score_correction_bias"}


def reference_experts(family: str, logits, layer_module, k: int, config) -> torch.Tensor:
    """The chosen experts (sorted per token) by the family's routing maths, from the router logits."""
    logits = logits.float()
    if family in ("deepseek_v3", "glm4_moe", "dots1"):
        bias = layer_module.get_buffer(BIASED[family])
        scores = torch.sigmoid(logits) + bias
        groups, per = config.n_group, logits.shape[-1] // config.n_group
        group_scores = scores.view(-1, groups, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(config.topk_group, dim=-1).indices, 1)
        scores = scores.masked_fill(keep.repeat_interleave(per, dim=1) == 0, float("-inf"))
    elif family == "minimax_m2":
        scores = torch.sigmoid(logits) + layer_module.get_buffer(BIASED[family])
    elif family == "ernie4_5_moe":
        scores = torch.softmax(logits, -1) + layer_module.get_parameter(BIASED[family]).reshape(-1)
    elif family in ("gpt_oss", "granitemoe", "granitemoeshared", "granitemoehybrid", "jetmoe", "llama4_text"):
        scores = logits                     # top-k of the logits themselves
    else:                                   # softmax, top-k (PhiMoE's sparsemixer also picks the two best)
        scores = torch.softmax(logits, -1)
    return torch.topk(scores, k, dim=-1).indices.sort(-1).values


def _checkpoint(tmp_path, family):
    """The tiny model with random correction biases (so that they matter), saved."""
    model = build_model(family)
    for name, value in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith("e_score_correction_bias"):
            with torch.no_grad():
                value.copy_(torch.randn(value.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    model.save_pretrained(tmp_path / family)
    return model, tmp_path / family


@pytest.mark.parametrize("family", DECODER_MOE)
def test_capture_matches_router_logits_and_streamed_matches_full(tmp_path, family):
    model, path = _checkpoint(tmp_path, family)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    if family == "jetmoe":              # attention-expert routers come first in each layer
        router_logits = router_logits[1::2]
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
        captured = {}
        for mode in ("full", "streamed"):
            loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode=mode)
            capture = RouterCapture(loaded.model, loaded.family, ckpt.config, report.moe_layers,
                                    lambda layer: report.top_k)
            with torch.no_grad():
                loaded.base_forward(ids)
            capture.close()
            captured[mode] = capture.layers
    tokens = ids.numel()
    for position, layer in enumerate(report.moe_layers):
        full, streamed = captured["full"][layer], captured["streamed"][layer]
        index = full.cat("index")
        assert index.shape == (tokens, report.top_k)                  # counts sum to tokens x top-k
        assert torch.bincount(index.flatten().long(), minlength=4).sum() == tokens * report.top_k
        want = reference_experts(family, router_logits[position], model.get_submodule(
            loaded.layers_name)[layer], report.top_k, model.config)
        assert torch.equal(index.sort(-1).values.long(), want), f"layer {layer}"
        for field in ("index", "weight", "entropy", "top1", "margin"):
            assert torch.equal(streamed.cat(field), full.cat(field)), field


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_encoder_decoder_capture_matches_router_logits(tiny, family):
    """Switch (top-1) and NLLB-MoE (top-2): encoder and decoder MoE layers, in full mode."""
    import transformers

    from moetool.errors import UnsupportedError

    path = tiny(family)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids, output_router_logits=True)
    logits = [out.encoder_router_logits[0], out.decoder_router_logits[0]]
    k = 1 if family == "switch_transformers" else 2
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="auto")
        capture = RouterCapture(loaded.model, loaded.family, ckpt.config, report.moe_layers, lambda layer: k)
        with torch.no_grad():
            loaded.base_forward(ids)
        capture.close()
        with pytest.raises(UnsupportedError, match="streamed"):
            load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
    assert report.moe_layers == [1, 3]
    for layer, reference in zip(report.moe_layers, logits):
        want = torch.topk(reference.reshape(-1, 4).float(), k, dim=-1).indices.sort(-1).values
        assert torch.equal(capture.layers[layer].cat("index").sort(-1).values.long(), want)
