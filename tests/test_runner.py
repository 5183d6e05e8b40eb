"""The runner's routing capture against transformers' own router logits and the families'
documented routing maths; layer-major `streamed` mode against `full` mode, for every MoE family."""

import json

import numpy as np
import pytest
import torch

from moetool.checkpoint import open_checkpoint
from moetool.ops.inspect import inspect_checkpoint
from moetool.ops.profile import ProfileOptions, profile
from moetool.runner.model import load_model
from tests.tiny import DENSE, TINY, build_model

DECODER_MOE = sorted(f for f in TINY if f not in DENSE and f not in ("switch_transformers", "nllb-moe"))
DECODER_MOE.append("nemotron_h-latent")   # Nemotron-H's latent MoE (tests/tiny.py VARIANTS)
# image-text models built whole: the text model under language_model
WRAPPERS = ("qwen3_vl_moe", "glm4v_moe", "glm5_next", "step3p7", "muse_spark", "hy_v4_vl", "deepseek_ocr2",
            "mistral_large4")
BIASED = {"deepseek_v3": "mlp.gate.e_score_correction_bias", "deepseek_v4": "mlp.gate.e_score_correction_bias",
          "deepseek_v32": "mlp.gate.e_score_correction_bias",
          "glm4_moe": "mlp.gate.e_score_correction_bias",
          "glm4_moe_lite": "mlp.gate.e_score_correction_bias", "exaone_moe": "mlp.gate.e_score_correction_bias",
          "lfm2_moe": "feed_forward.expert_bias",
          "dots1": "mlp.gate.e_score_correction_bias", "sarvam_moe": "mlp.gate.e_score_correction_bias",
          "glm_moe_dsa": "mlp.gate.e_score_correction_bias", "solar_open": "mlp.gate.e_score_correction_bias",
          "sarvam_mla": "mlp.gate.e_score_correction_bias", "kimi_linear": "mlp.gate.e_score_correction_bias",
          "nemotron_h": "mixer.gate.e_score_correction_bias",
          "nemotron_h-latent": "mixer.gate.e_score_correction_bias",
          "mimo_v2_flash": "mlp.gate.e_score_correction_bias",
          "bailing_hybrid": "mlp.gate.e_score_correction_bias", "laguna": "mlp.gate.e_score_correction_bias",
          "kolibri1": "mlp.gate.e_score_correction_bias", "glm4v_moe": "mlp.gate.e_score_correction_bias",
          "glm5_next": "mlp.gate.e_score_correction_bias", "hy_v4": "mlp.gate.e_score_correction_bias",
          "hy_v4_vl": "mlp.gate.e_score_correction_bias",
          "minimax_m2": "mlp.e_score_correction_bias",
          "ernie4_5_moe": "mlp.gate.moe_statics.e_score_correction_bias", "afmoe": "mlp.expert_bias",
          "hy_v3": "mlp.e_score_correction_bias",
          "axk1": "mlp.gate.e_score_correction_bias", "beam": "mlp.gate.e_score_correction_bias",
          "axk2": "mlp.gate.e_score_correction_bias", "dots3_note_text": "mlp.gate.e_score_correction_bias",
          "minimax_m3_vl_text": "mlp.gate.e_score_correction_bias",
          "longcat_flash": "mlp.router.e_score_correction_bias",
          "step3p7": "mlp.gate.e_score_correction_bias", "muse_spark": "mlp.gate.e_score_correction_bias",
          "inkling_text": "mlp.gate.e_score_correction_bias", "zaya": "mlp.gate.balancing_biases"}


def reference_experts(family: str, logits, layer_module, k: int, config) -> torch.Tensor:
    """The chosen experts (sorted per token) by the family's routing maths, from the router logits."""
    logits = logits.float()
    if family in ("deepseek_v32",
                  "deepseek_v3", "glm4_moe", "glm4_moe_lite", "exaone_moe", "dots1", "sarvam_moe", "axk1", "beam",
                  "glm_moe_dsa", "solar_open", "sarvam_mla", "kimi_linear", "nemotron_h", "nemotron_h-latent",
                  "mimo_v2_flash",
                  "bailing_hybrid", "dots3_note_text", "glm4v_moe", "glm5_next", "hy_v4", "hy_v4_vl"):
        bias = layer_module.get_buffer(BIASED[family])
        scores = torch.sigmoid(logits) + bias
        groups, per = config.n_group, logits.shape[-1] // config.n_group
        group_scores = scores.view(-1, groups, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(config.topk_group, dim=-1).indices, 1)
        scores = scores.masked_fill(keep.repeat_interleave(per, dim=1) == 0, float("-inf"))
    elif family == "deepseek_v4":       # sqrt(softplus) scores + bias
        scores = torch.nn.functional.softplus(logits).sqrt() + layer_module.get_buffer(BIASED[family])
    elif family in ("mistral4", "mistral_large4"):   # softmax scores, groups ranked by their best two, no bias
        scores = torch.softmax(logits, -1)
        groups, per = config.n_group, logits.shape[-1] // config.n_group
        group_scores = scores.view(-1, groups, per).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(group_scores).scatter(1, group_scores.topk(config.topk_group, dim=-1).indices, 1)
        scores = scores.masked_fill(keep.repeat_interleave(per, dim=1) == 0, float("-inf"))
    elif family in ("minimax_m2", "lfm2_moe", "hy_v3", "axk2", "minimax_m3_vl_text",
                    "step3p7", "muse_spark", "inkling_text"):   # (A.X-K2 without n_group; Muse Spark's logits x
                    # output_multiplier; Inkling's logits: routed rows only)
        scores = torch.sigmoid(logits) + layer_module.get_buffer(BIASED[family])
    elif family in ("afmoe", "laguna"):  # its selection bias is a frozen parameter (Laguna's logits come softcapped)
        scores = torch.sigmoid(logits) + layer_module.get_parameter(BIASED[family])
    elif family == "kolibri1":          # its bias is added to the logits themselves
        scores = logits + layer_module.get_buffer(BIASED[family])
    elif family == "longcat_flash":     # softmax over the real and the identity experts, + bias
        scores = torch.softmax(logits, -1) + layer_module.get_buffer(BIASED[family])
    elif family == "zaya":              # softmax over the real experts and the skip expert (last), + its balancing
        scores = torch.softmax(logits, -1) + layer_module.get_buffer(BIASED[family])   # biases (fp32)
    elif family == "ernie4_5_moe":
        scores = torch.softmax(logits, -1) + layer_module.get_parameter(BIASED[family]).reshape(-1)
    elif family in ("gpt_oss", "granitemoe", "granitemoeshared", "granitemoehybrid", "jetmoe", "llama4_text",
                    "cohere2_moe", "granitemoe_swa"):
        scores = logits                     # top-k of the logits themselves
    else:                                   # softmax, top-k (PhiMoE's sparsemixer also picks the two best)
        scores = torch.softmax(logits, -1)
    return torch.topk(scores, k, dim=-1).indices.sort(-1).values


def _checkpoint(tmp_path, family):
    """The tiny model with random correction biases (so that they matter), saved."""
    model = build_model(family)
    for name, value in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith(("e_score_correction_bias", "mlp.expert_bias")):
            with torch.no_grad():
                value.copy_(torch.randn(value.shape, generator=torch.Generator().manual_seed(7)) * 0.3)
    model.save_pretrained(tmp_path / family)
    return model, tmp_path / family


def profile_with_trace(path, ids, trace, **kw):
    """ops.profile over IDS [N, S] (micro-batches of 2 sequences), with its routing traced to TRACE."""
    tokens = trace.with_suffix(".ids.json")
    tokens.write_text(json.dumps(ids.flatten().tolist()))
    options = ProfileOptions(token_ids=tokens, seq_len=ids.shape[1], max_tokens=ids.numel(), batch_size=2,
                             trace=trace, device="cpu", dtype="fp32", **kw)
    with open_checkpoint(path) as ckpt:
        return profile(ckpt, options)


def traced(trace, layer, what):
    return torch.from_numpy(np.load(trace / "rank-00" / f"layer-{layer:03d}.{what}.npy").astype(np.float32))


def assert_same_statistics(a, b):
    """Integer fields equal, float fields within 1e-5 relative."""
    assert a.tokens == b.tokens and len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        for name, value in x.__dict__.items():
            other = getattr(y, name)
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert other == pytest.approx(value, rel=1e-5, abs=1e-12), name
            elif isinstance(value, dict) and value and isinstance(next(iter(value.values())), float):
                assert other == pytest.approx(value, rel=1e-5, abs=1e-12), name
            else:
                assert other == value, name


@pytest.mark.parametrize("family", DECODER_MOE)
def test_capture_matches_router_logits_and_streamed_matches_full(tmp_path, family):
    """Routing recorded (through the trace) equals transformers' own; layer-major streamed mode
    (micro-batches of 2 sequences, hidden states offloaded to disk) gives full mode's statistics."""
    model, path = _checkpoint(tmp_path, family)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    if family == "jetmoe":              # attention-expert routers come first in each layer
        router_logits = router_logits[1::2]
    text = model.config.get_text_config()
    hashed = [layer for layer in range(text.num_hidden_layers)
              if getattr(text, "mlp_layer_types", None) and text.mlp_layer_types[layer] == "hash_moe"]
    if hashed:                          # DeepSeek-V4's hash layers pick by token table; transformers records
        router_logits = [None] * len(hashed) + list(router_logits)   # the other routers' logits only
    full = profile_with_trace(path, ids, tmp_path / "full", mode="full")
    streamed = profile_with_trace(path, ids, tmp_path / "streamed", mode="streamed", offload_dir=tmp_path / "off")
    assert full.mode == "full" and streamed.mode == "streamed"
    assert streamed.memory["activation_store_bytes"]["disk"] > 0          # really offloaded
    assert_same_statistics(full, streamed)
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    layers = model.get_submodule("transformer.blocks" if family == "dbrx" else
                                 "thinker.model.language_model.layers" if family == "qwen3_omni_moe" else
                                 "model.language_model.layers" if family in WRAPPERS else "model.layers")
    tokens = ids.numel()
    for position, layer in enumerate(report.moe_layers):
        index = traced(tmp_path / "full", layer, "experts").long().reshape(tokens, report.top_k)
        chosen = torch.bincount(index.flatten(), minlength=4)
        assert chosen.sum() == tokens * report.top_k
        want = layers[layer].mlp.gate.tid2eid[ids.flatten()].sort(-1).values if layer in hashed else \
            reference_experts(family, router_logits[position], layers[layer], report.top_k,
                              model.config.get_text_config())
        assert torch.equal(index.sort(-1).values, want), f"layer {layer}"
        assert torch.equal(traced(tmp_path / "streamed", layer, "experts"), traced(tmp_path / "full", layer, "experts"))
        for what in ("weights", "router"):   # (micro-batches of 2 sequences against 3: sums may round apart)
            torch.testing.assert_close(traced(tmp_path / "streamed", layer, what),
                                       traced(tmp_path / "full", layer, what), rtol=1e-6, atol=1e-7, msg=what)
        # (the picks of identity experts, numbered after the real ones, are counted apart)
        assert full.layers[position].counts == chosen[:report.num_experts].tolist()
        assert (full.layers[position].identity or {}).get("assignments", 0) == chosen[report.num_experts:].sum()


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_encoder_decoder_capture_matches_router_logits(tmp_path, tiny, family):
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
        with pytest.raises(UnsupportedError, match="streamed"):
            load_model(ckpt, device=torch.device("cpu"), dtype=torch.float32, mode="streamed")
    profile_with_trace(path, ids, tmp_path / "trace", mode="auto")
    assert report.moe_layers == [1, 3]
    for layer, reference in zip(report.moe_layers, logits):
        want = torch.topk(reference.reshape(-1, 4).float(), k, dim=-1).indices.sort(-1).values
        got = traced(tmp_path / "trace", layer, "experts").long().reshape(-1, k)
        assert torch.equal(got.sort(-1).values, want)
