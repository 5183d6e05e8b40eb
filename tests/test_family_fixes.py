"""Family details that transformers decides and moetool must follow, each against transformers' own
model, config or forward: Granite 4.0's dense hybrid, routers kept in fp32, encoder-decoder models
through moetool.load_model, PhiMoE's fixed two experts, DeepSeek's group-limited routing, ERNIE's
biases."""

import json

import pytest
import torch
import transformers

import moetool
from moetool.arch import detect_family, get_family
from moetool.arch.matcher import Classifier
from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.inspect import inspect_checkpoint
from moetool.runner.model import load_model
from tests.tiny import DENSE, TINY, build_model, build_variant, load_reference

FP32_ROUTERS = ["deepseek_v32", "deepseek_v4",
                "deepseek_v3", "glm4_moe", "glm4_moe_lite", "exaone_moe", "lfm2_moe", "dots1", "ernie4_5_moe",
                "hunyuan_v1_moe", "deepseek_v2", "afmoe", "sarvam_moe", "hy_v3", "axk1", "flint", "beam", "axk2",
                "glm_moe_dsa", "solar_open", "sarvam_mla", "kimi_linear",
                "nemotron_h", "mimo_v2_flash", "bailing_hybrid", "kolibri1",
                "dots3_note_text",
                "glm4v_moe", "glm5_next", "hy_v4", "muse_spark", "hy_v4_vl", "inkling_text", "deepseek_ocr2",
                "mistral_large4", "zaya"]


def _inspect(path):
    with open_checkpoint(path) as ckpt:
        return inspect_checkpoint(ckpt)


def _numel(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


# ---------------------------------------------------------------- Gemma 4 without experts

def test_gemma4_without_moe_block_counts_its_mlp_as_the_dense_mlp(tmp_path):
    model = build_variant("gemma4_text-dense")
    model.save_pretrained(tmp_path / "dense")
    report = _inspect(tmp_path / "dense")
    layers = model.model.layers
    assert not any(hasattr(layer, "experts") for layer in layers)   # transformers: no MoE layer
    assert report.problems == [], report.problems
    assert report.moe_layers == [] and report.dense_layers == list(range(len(layers)))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.params["dense_mlp"] == sum(_numel(layer.mlp) for layer in layers)
    assert report.params["shared_experts"] == 0 and report.num_shared_experts == 0


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_gemma4_double_wide_mlp_layers_are_counted_checked_and_run(tmp_path, moe):
    """use_double_wide_mlp: the key-value sharing layers' MLPs are twice as wide; inspect expects them so,
    counts what transformers builds, and moetool.load_model runs them as transformers does."""
    model = build_variant("gemma4_text-wide", enable_moe_block=moe)
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert widths == [24, 24, 48]   # (transformers widens the last layer: the test could fail)
    model.save_pretrained(tmp_path / "wide")
    report = _inspect(tmp_path / "wide")
    assert report.problems == [], report.problems
    assert report.total_params == sum(p.numel() for p in model.parameters())
    mlp = sum(_numel(layer.mlp) for layer in model.model.layers)
    assert report.params["shared_experts" if moe else "dense_mlp"] == mlp
    got = moetool.load_model(tmp_path / "wide")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- MiniMax-M3's moe_layer_freq

def test_minimax_m3_reads_moe_layer_freq_of_a_raw_config(tmp_path):
    """A raw config.json gives moe_layer_freq, not mlp_layer_types: transformers builds the MoE layers from it."""
    model = build_model("minimax_m3_vl_text")
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.pop("mlp_layer_types")
    config["moe_layer_freq"] = [0, 1, 1]     # as the saved model: layer 0 dense
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    built = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    report = _inspect(tmp_path / "m")
    assert report.problems == [], report.problems
    assert report.moe_layers == [i for i, layer in enumerate(built.model.layers) if hasattr(layer.mlp, "experts")]
    assert report.moe_layers == [1, 2] and report.dense_layers == [0]
    assert report.total_params == sum(p.numel() for p in built.parameters())



def test_granite_hybrid_without_experts_counts_its_shared_mlp_as_the_dense_mlp(tmp_path):
    model = build_variant("granitemoehybrid-dense")
    model.save_pretrained(tmp_path / "dense")
    report = _inspect(tmp_path / "dense")
    layers = model.model.layers
    assert all(layer.block_sparse_moe is None for layer in layers)   # transformers: no MoE layer
    assert report.problems == [], report.problems
    assert report.moe_layers == [] and report.dense_layers == list(range(len(layers)))
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.params["dense_mlp"] == sum(_numel(layer.shared_mlp) for layer in layers)
    assert report.params["shared_experts"] == 0 and report.num_shared_experts == 0
    assert report.dense_ffn == layers[0].shared_mlp.output_linear.in_features
    assert report.active_params == report.total_params - report.params["embedding"] * (not report.tied_embeddings)
    got = moetool.load_model(tmp_path / "dense")   # no experts: nothing to fuse
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_granite_hybrid_with_experts_still_counts_a_shared_expert(tiny):
    model = build_model("granitemoehybrid")
    report = _inspect(tiny("granitemoehybrid"))
    assert report.problems == []
    assert report.params["shared_experts"] == sum(_numel(layer.shared_mlp) for layer in model.model.layers)
    assert report.params["dense_mlp"] == 0 and report.num_shared_experts == 1


# ---------------------------------------------------------------- routers transformers keeps in fp32

@pytest.mark.parametrize("family", sorted(set(TINY) - DENSE))
def test_fp32_roles_are_what_transformers_holds_in_fp32(tiny, family):
    """The roles of the stored tensors transformers' bf16 load holds in fp32 are the family's fp32_roles."""
    path = tiny(family)
    fam = detect_family(json.loads((path / "config.json").read_text()))
    model = load_reference(path, seq2seq=fam.decoder_offset is not None, dtype=torch.bfloat16)
    cfg = model.config.to_dict()
    classifier = Classifier(fam, fam.decoder_offset(cfg) if fam.decoder_offset else 0)
    persistent = model.state_dict()
    held = {classifier.classify(name).role for name, t in persistent.items() if t.dtype == torch.float32
            and not name.endswith(fam.fp32_suffixes)}
    assert held == set(fam.fp32_roles)
    # the tensors named by ending (Kimi Linear's dt_bias) are there, and in fp32
    suffixed = [t.dtype for name, t in persistent.items() if name.endswith(fam.fp32_suffixes)]
    assert bool(suffixed) == bool(fam.fp32_suffixes) and set(suffixed) <= {torch.float32}


def _biased_checkpoint(path, family, stored_bf16=False):
    """The tiny model with correction biases of a few units (as trained DeepSeek-V3 checkpoints hold:
    bf16 would round them by 0.01, more than the scores differ), saved; optionally converted to bf16
    with the routers cast too (as some hub checkpoints store them)."""
    model = build_model(family)
    for name, value in list(model.named_buffers()) + list(model.named_parameters()):
        if name.endswith(("e_score_correction_bias", "mlp.expert_bias")):   # AFMoE's is a parameter
            with torch.no_grad():
                noise = torch.randn(value.shape, generator=torch.Generator().manual_seed(7))
                value.copy_(2.0 + 0.01 * noise)
    model.save_pretrained(path / "src")
    if not stored_bf16:
        return path / "src"
    with open_checkpoint(path / "src") as ckpt:
        convert(ckpt, path / "bf16", ConvertOptions(dtype="bf16", cast_fp32_roles=True))
    return path / "bf16"


def _routed(model, family, ids):
    """Logits and, per MoE layer, the experts each token is routed to (sorted)."""
    fam = detect_family(model.config.to_dict())
    cfg = fam.settings(model.config.to_dict())   # (a wrapper's text_config merged in)
    picks = {}
    hooks = []
    for layer in range(model.config.get_text_config().num_hidden_layers):
        if not fam.is_moe_layer(cfg, layer):
            continue
        router = model.get_submodule(fam.router_module.replace("{L}", str(layer)))
        hooks.append(router.register_forward_hook(
            lambda module, args, out, layer=layer: picks.__setitem__(layer, out[2].sort(-1).values)))
    with torch.no_grad():
        logits = model(ids).logits.float()
    for hook in hooks:
        hook.remove()
    return logits, picks


def _dtypes(model):
    return {name: t.dtype for name, t in model.state_dict().items()}


@pytest.mark.parametrize("stored_bf16", [False, True], ids=["stored-fp32", "stored-bf16"])
@pytest.mark.parametrize("family", FP32_ROUTERS)
def test_load_model_in_bf16_keeps_routers_in_fp32_as_transformers_does(tmp_path, family, stored_bf16):
    path = _biased_checkpoint(tmp_path, family, stored_bf16)
    want = load_reference(path, dtype=torch.bfloat16).eval()
    got = moetool.load_model(path, dtype=torch.bfloat16)
    assert _dtypes(got) == _dtypes(want)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    want_logits, want_picks = _routed(want, family, ids)
    got_logits, got_picks = _routed(got, family, ids)
    assert want_picks and all(torch.equal(got_picks[layer], want_picks[layer]) for layer in want_picks)
    torch.testing.assert_close(got_logits, want_logits, atol=0, rtol=0)


def _streamed_whole(path, dtype):
    """The streamed model of PATH in DTYPE with every layer installed by the engine's read_layer/install_layer."""
    with open_checkpoint(path) as ckpt:
        loaded = load_model(ckpt, device=torch.device("cpu"), dtype=dtype, mode="streamed", with_head=True)
        for index in range(len(loaded.layers)):
            loaded.install_layer(index, loaded.read_layer(index))
    return loaded


@pytest.mark.parametrize("family", ["hunyuan_v1_moe", "deepseek_v3"])
def test_streamed_mode_in_bf16_holds_routers_as_transformers_does(tmp_path, family):
    """Layer by layer (the engine's read_layer/install_layer), routers stored in bf16 too."""
    path = _biased_checkpoint(tmp_path, family, stored_bf16=True)
    want = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    loaded = _streamed_whole(path, torch.bfloat16)
    assert _dtypes(loaded.model) == _dtypes(want)
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_routed(loaded.model, family, ids)[0], _routed(want, family, ids)[0], atol=0, rtol=0)


# transformers' non-strict _keep_in_fp32_modules (fp16 loads only): DeepSeek-V3.2's and GLM-5's indexer.weights_proj,
# AFMoE's and GPT-OSS's norms
@pytest.mark.parametrize("family", ["deepseek_v32", "glm_moe_dsa", "afmoe", "gpt_oss"])
def test_load_model_in_fp16_holds_what_transformers_keeps_in_fp32_for_fp16(tiny, family):
    path = tiny(family)
    want = load_reference(path, dtype=torch.float16).eval()
    got = moetool.load_model(path, dtype=torch.float16)
    assert _dtypes(got) == _dtypes(want)
    assert set(want._keep_in_fp32_modules) and any(   # (the list is there: the test could fail)
        d == torch.float32 and any(k in n for k in want._keep_in_fp32_modules) for n, d in _dtypes(want).items())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)
    if family == "deepseek_v32":   # and layer by layer
        loaded = _streamed_whole(path, torch.float16)
        assert _dtypes(loaded.model) == _dtypes(want)
        assert all(d == torch.float32 for n, d in _dtypes(loaded.model).items() if "indexer.weights_proj" in n)


def test_convert_to_bf16_keeps_the_deepseek_v2_gate_in_fp32(tmp_path):
    model = build_model("deepseek_v2")
    assert "gate.weight" in model._keep_in_fp32_modules_strict      # transformers' own rule
    model.save_pretrained(tmp_path / "src")
    with open_checkpoint(tmp_path / "src") as ckpt:
        convert(ckpt, tmp_path / "bf16", ConvertOptions(dtype="bf16"))
    with open_checkpoint(tmp_path / "bf16") as ckpt:
        gates = {name: ref.dtype for name, ref in ckpt.tensors.items() if name.endswith("mlp.gate.weight")}
    assert gates and set(gates.values()) == {"F32"}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=0, rtol=0)


# ---------------------------------------------------------------- encoder-decoder models in load_model

def _seq2seq_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids).logits


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_load_model_builds_encoder_decoder_models(tiny, family):
    path = tiny(family)
    want = transformers.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    got = moetool.load_model(path)
    assert type(got) is type(want)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_seq2seq_logits(got, ids), _seq2seq_logits(want, ids), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["switch_transformers", "nllb-moe"])
def test_load_model_of_a_globally_pruned_encoder_decoder_model(tmp_path, family):
    """Layers with their own expert counts (--scope global), each built as transformers builds a layer of
    that many experts; the model equals the original whose routers never pick the removed experts."""
    from moetool.ops.prune import PruneOptions, prune

    model = build_model(family)
    model.save_pretrained(tmp_path / "src")
    with open_checkpoint(tmp_path / "src") as ckpt:
        report = prune(ckpt, tmp_path / "out", PruneOptions(keep=3, criterion="weight-norm", scope="global"))
    assert len({len(kept) for kept in report.kept.values()}) > 1
    got = moetool.load_model(tmp_path / "out")
    fam = detect_family(model.config.to_dict())
    cfg = model.config.to_dict()
    offset = fam.decoder_offset(cfg)
    from moetool.runner.capture import module_name
    from tests.test_prune import routers_restricted

    removed, weights = {}, {}
    for layer, kept in report.kept.items():
        router = got.get_submodule(module_name(fam.router_module, layer, offset))
        assert router.classifier.out_features == len(kept)
        weights[layer] = model.get_submodule(module_name(fam.router_module, layer, offset)).classifier.weight
        removed[layer] = [e for e in range(4) if e not in kept]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with routers_restricted(model, removed, weights):   # the logits of removed experts at -inf: never chosen
        want = _seq2seq_logits(model, ids)
    # NLLB's combine weights are softmax probabilities over all experts: exp(-inf) = 0 terms differ in
    # the last bits from a softmax over fewer
    assert (_seq2seq_logits(got, ids) - want).abs().max() <= (1e-5 if family == "switch_transformers" else 2e-4)


# ---------------------------------------------------------------- PhiMoE: two experts, always

def test_phimoe_top_k_is_what_the_sparsemixer_routes(tmp_path):
    model = build_variant("phimoe-k1")
    model.save_pretrained(tmp_path / "k1")
    shapes = []
    hook = model.model.layers[0].mlp.router.register_forward_hook(lambda m, a, out: shapes.append(out[2].shape))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 5)))
    hook.remove()
    routed = shapes[0][-1]
    assert routed == 2 and model.config.num_experts_per_tok == 1
    report = _inspect(tmp_path / "k1")
    assert report.top_k == routed and report.router["top_k"] == routed
    assert all(info.top_k == routed for info in report.layers if info.kind == "moe")
    experts = report.num_experts
    assert report.active_params == report.total_params - report.params["embedding"] \
        - report.params["routed_experts"] + report.params["routed_experts"] * routed // experts
    assert [p.code for p in report.problems] == ["top_k_ignored"]


def test_phimoe_with_its_usual_config_has_no_warning(tiny):
    assert _inspect(tiny("phimoe")).problems == []


# ---------------------------------------------------------------- DeepSeek: group-limited routing

def _deepseek(tmp_path, family, edit, **overrides):
    cls, kwargs = TINY[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**{**kwargs, **overrides}))
    path = tmp_path / family
    model.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval(), _inspect(path)


def _groups_used(model, layer, n_group):
    """How many expert groups transformers' router picks from, at most, over random tokens."""
    experts = model.config.num_local_experts if hasattr(model.config, "num_local_experts") else \
        model.config.n_routed_experts
    router = model.model.layers[layer].mlp.gate
    hidden = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        index = router(hidden)[2]
    return max(len(set((index[t] // (experts // n_group)).tolist())) for t in range(index.shape[0]))


def test_deepseek_v2_without_topk_method_routes_greedily(tmp_path):
    model, report = _deepseek(tmp_path, "deepseek_v2", lambda c: c.pop("topk_method"), n_routed_experts=8,
                              n_group=2, topk_group=1, num_experts_per_tok=3)
    assert model.config.topk_method == "greedy"
    assert _groups_used(model, 1, 2) == 2              # transformers mixes groups: greedy
    assert report.router["group_limited"] is None


def test_deepseek_v2_group_limited_greedy(tmp_path):
    model, report = _deepseek(tmp_path, "deepseek_v2", lambda c: None, n_routed_experts=8, n_group=2,
                              topk_group=1, num_experts_per_tok=3, topk_method="group_limited_greedy")
    assert _groups_used(model, 1, 2) == 1
    assert report.router["group_limited"] == {"n_group": 2, "topk_group": 1}


def test_deepseek_v3_routes_by_groups_whatever_topk_method_says(tmp_path):
    model, report = _deepseek(tmp_path, "deepseek_v3", lambda c: c.update(topk_method="greedy"),
                              n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3)
    assert _groups_used(model, 1, 2) == 1              # transformers ignores topk_method
    assert report.router["group_limited"] == {"n_group": 2, "topk_group": 1}


def test_deepseek_v3_router_defaults_are_transformers_config_defaults(tmp_path):
    def drop(config):
        for key in ("n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"):
            config.pop(key)

    model, report = _deepseek(tmp_path, "deepseek_v3", drop, n_routed_experts=16, num_experts_per_tok=2)
    router = model.model.layers[1].mlp.gate
    assert _groups_used(model, 1, router.num_group) <= router.topk_group
    assert report.router["group_limited"] == {"n_group": router.num_group, "topk_group": router.topk_group}
    assert report.router["renormalize"] == router.norm_topk_prob
    assert report.router["scaling_factor"] == router.routed_scaling_factor


# ---------------------------------------------------------------- ERNIE with use_bias

@pytest.mark.parametrize("variant", ["ernie4_5_moe-bias", "ernie4_5_moe-bias-untied"])
def test_ernie_biases_fit_its_templates_and_are_counted(tmp_path, variant):
    model = build_variant(variant)
    model.save_pretrained(tmp_path / variant)
    report = _inspect(tmp_path / variant)
    assert report.problems == [], report.problems
    assert report.total_params == sum(p.numel() for p in model.parameters())
    layers = model.model.layers
    moe = report.moe_layers
    assert report.params["shared_experts"] == sum(_numel(layers[i].mlp.shared_experts) for i in moe)
    assert report.params["dense_mlp"] == sum(_numel(layers[i].mlp) for i in report.dense_layers)
    embedding = model.get_input_embeddings().weight
    head_own = [p for p in model.lm_head.parameters() if p is not embedding]   # tied: the bias alone
    assert report.params["lm_head"] == sum(p.numel() for p in head_own) > 0
    got = moetool.load_model(tmp_path / variant)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_kimi_linear_hub_config_keeps_linear_attention_settings_nested(tmp_path):
    """Kimi-Linear's hub config.json holds num_heads and head_dim in linear_attn_config (transformers
    moves them up): conv1d still splits back into the hub's q/k/v_conv1d, as many rows each."""
    from tests.tiny import save_tiny

    fused = save_tiny("kimi_linear", tmp_path / "fused", fused=True)
    cfg = json.loads((fused / "config.json").read_text())
    heads, size = cfg.pop("linear_num_heads"), cfg.pop("linear_head_dim")
    cfg["linear_attn_config"] = {"num_heads": heads, "head_dim": size, "short_conv_kernel_size": 4}
    (fused / "config.json").write_text(json.dumps(cfg))
    assert transformers.AutoConfig.from_pretrained(fused).linear_num_heads == heads   # as transformers reads it
    with open_checkpoint(fused) as ckpt:
        convert(ckpt, tmp_path / "hub", ConvertOptions(layout="per-expert"))
    with open_checkpoint(tmp_path / "hub") as ckpt:
        convs = {name: ref.shape for name, ref in ckpt.tensors.items() if "conv1d" in name}
    assert convs and all(shape[0] == heads * size for shape in convs.values())
    assert {name.rsplit(".", 2)[-2] for name in convs} == {"q_conv1d", "k_conv1d", "v_conv1d"}


@pytest.mark.parametrize("family, cls", [("kimi_linear", "KimiLinearConfig"), ("glm5_next", "Glm5NextTextConfig")])
def test_conv_rows_are_read_as_transformers_reads_them(family, cls):
    """q/k/v_conv1d rows (heads x head size): linear_attn_config first, then the top-level keys, then
    the config class's defaults, as transformers' config classes read them."""
    rows = get_family(family).row_joins[0][1][0][1]
    for raw in ({}, {"linear_num_heads": 32, "linear_head_dim": 64},
                {"linear_num_heads": 32, "linear_head_dim": 128,
                 "linear_attn_config": {"num_heads": 16, "head_dim": 64}}):
        config = getattr(transformers, cls)(**raw)
        assert rows(raw) == config.linear_num_heads * config.linear_head_dim, raw


# ---------------------------------------------------------------- Nemotron-H's latent MoE (Nemotron 3 Super)

@pytest.mark.parametrize("fused", [False, True])
def test_nemotron_h_latent_experts_have_the_latent_shapes_and_are_counted(tmp_path, fused):
    model = build_variant("nemotron_h-latent")
    model.save_pretrained(tmp_path / "m", save_original_format=not fused)
    report = _inspect(tmp_path / "m")
    mixers = [model.model.layers[i].mixer for i in report.moe_layers]
    latent = model.config.moe_latent_size
    assert report.problems == [], report.problems
    assert report.layout == ("fused" if fused else "per-expert")
    assert report.moe_layers == [1, 3] and report.expert_ffn == model.config.moe_intermediate_size
    assert mixers[0].experts.up_proj.shape[-1] == latent != model.config.hidden_size   # transformers' latent experts
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.params["routed_experts"] == sum(_numel(m.experts) for m in mixers)
    assert report.params["shared_experts"] == sum(_numel(m.shared_experts) for m in mixers)
    # active: the latent projections always, the routed experts top_k of num_experts
    routed = report.params["routed_experts"]
    embedding = report.params["embedding"] * (not report.tied_embeddings)
    inactive = routed - routed * report.top_k // report.num_experts
    assert report.active_params == report.total_params - embedding - inactive
    # the shapes are checked against moe_latent_size (a config that disagrees is reported)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "moe_latent_size": latent + 8}))
    assert [p.code for p in _inspect(tmp_path / "m").problems] == ["bad_shape"]


def test_nemotron_h_latent_moe_loads_with_transformers_logits(tmp_path):
    model = build_variant("nemotron_h-latent")
    model.save_pretrained(tmp_path / "m")
    got = moetool.load_model(tmp_path / "m")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_nemotron_h_latent_moe_refuses_gptq(tiny, tmp_path):
    from moetool.errors import UnsupportedError
    from moetool.ops.quantize import QuantizeOptions, quantize

    with open_checkpoint(tiny("nemotron_h-latent")) as ckpt, pytest.raises(UnsupportedError, match="latent"):
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8-sym", method="gptq"))


# ---------------------------------------------------------------- Muse Spark's latent MoE with a per-expert norm

def test_muse_spark_saliency_is_each_experts_normed_output_after_post_expert_proj(tiny, tmp_path):
    """REAP saliency: ||w * post_expert_proj.weight @ post_expert_norm(expert(x))|| with x the latent input,
    the expert's contribution to the hidden states (not without the norm, not in the latent width)."""
    from moetool.ops.profile import ProfileOptions, profile
    from tests.tiny import load_reference

    path = tiny("muse_spark")
    ids = torch.randint(0, 64, (4, 30), generator=torch.Generator().manual_seed(3))
    (tmp_path / "ids.json").write_text(json.dumps(ids.flatten().tolist()))
    with open_checkpoint(path) as ckpt:
        report = profile(ckpt, ProfileOptions(token_ids=tmp_path / "ids.json", seq_len=30, saliency=True))
    model = load_reference(path, dtype=torch.float32).eval()
    layers, inputs = model.model.language_model.layers, {}
    hooks = [layers[i].mlp.experts.register_forward_hook(lambda m, a, o, i=i: inputs.__setitem__(i, a))
             for i in (layer.layer for layer in report.layers)]
    with torch.no_grad():
        model(ids)
        for h in hooks:
            h.remove()
        for layer in report.layers:
            (latent, index, weights), mlp = inputs[layer.layer], layers[layer.layer].mlp
            assert latent.shape[-1] == model.config.text_config.moe_hidden_size != model.config.text_config.hidden_size
            totals, count = torch.zeros(2, 4, dtype=torch.float64), torch.zeros(4)
            for t in range(latent.shape[0]):
                for j in range(index.shape[1]):
                    e = int(index[t, j])
                    gate, up = (mlp.experts.gate_up_proj[e] @ latent[t]).chunk(2)
                    out = mlp.experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
                    for row, y in enumerate((mlp.experts.post_expert_norm(out), out)):
                        totals[row, e] += float((mlp.post_expert_proj.weight @ (weights[t, j] * y)).norm())
                    count[e] += 1
            want, unnormed = (totals / count.clamp_min(1)).tolist()
            assert layer.saliency == pytest.approx(want, rel=1e-4)
            assert layer.saliency != pytest.approx(unnormed, rel=1e-2)   # the test can fail


def test_muse_spark_eval_is_transformers_loss_and_quantize_keeps_the_expert_norm(tiny, tmp_path):
    """eval's head multiplies the logits by output_multiplier before the softcap, as transformers does; quantize
    leaves experts.post_expert_norm (one weight shared by the experts) as it is, and refuses GPTQ (latent
    experts)."""
    from safetensors.torch import load_file

    from moetool.errors import UnsupportedError
    from moetool.ops.evaluate import EvalOptions, evaluate
    from moetool.ops.quantize import QuantizeOptions, quantize
    from tests.tiny import load_reference

    path = tiny("muse_spark")
    ids = torch.randint(0, 64, (4, 30), generator=torch.Generator().manual_seed(4))
    (tmp_path / "ids.json").write_text(json.dumps(ids.flatten().tolist()))
    with torch.no_grad():
        loss = load_reference(path, dtype=torch.float32).eval()(ids, labels=ids).loss
    with open_checkpoint(path) as ckpt:
        assert evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=30)).nll_mean == \
            pytest.approx(float(loss), rel=1e-5)
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8-sym"))
        with pytest.raises(UnsupportedError, match="latent"):
            quantize(ckpt, tmp_path / "g", QuantizeOptions(format="int4-g8-sym", method="gptq"))
    source, out = (load_file(next(p.glob("*.safetensors"))) for p in (path, tmp_path / "q"))
    norms = [n for n in source if n.endswith("experts.post_expert_norm.weight")]
    assert len(norms) == 2 and all(torch.equal(out[n], source[n]) for n in norms)
    assert any(n.startswith("model.language_model.layers.1.mlp.experts.gate_up_proj") and n not in source
               for n in out)   # (the experts were quantized)


def test_eval_head_scales_as_transformers_does(tmp_path):
    """eval's own head (it runs after the model is freed) scores as transformers' forward does: Inkling divides
    the hidden states by logits_mup_width_multiplier and keeps the first unpadded_vocab_size logits; Hy4 holds
    its lm_head in fp32, fed bf16 hidden states in a bf16 run."""
    from moetool.ops.evaluate import EvalOptions, evaluate
    from tests.tiny import build_variant, load_reference, save_tiny

    ids = torch.randint(0, 60, (3, 16), generator=torch.Generator().manual_seed(4))
    (tmp_path / "ids.json").write_text(json.dumps(ids.flatten().tolist()))
    build_variant("inkling_text", logits_mup_width_multiplier=24.0, unpadded_vocab_size=60).save_pretrained(
        tmp_path / "inkling")
    with torch.no_grad():
        want = load_reference(tmp_path / "inkling", dtype=torch.float32).eval()(ids, labels=ids)
    assert want.logits.shape[-1] == 60
    with open_checkpoint(tmp_path / "inkling") as ckpt:
        got = evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=16, dtype="fp32"))
    assert got.nll_mean == pytest.approx(float(want.loss), rel=1e-5)
    with open_checkpoint(save_tiny("hy_v4", tmp_path / "hy")) as ckpt:   # (a dtype error before)
        assert evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=16, dtype="bf16")).nll_mean > 0
