"""MoE text models transformers runs only inside their image-text wrapper (Qwen3-VL-MoE, GLM-4.5V), or by
a causal-LM class no auto class maps (Mistral 4), built by the class moetool's runner picks: text-only runs
(input_ids) equal transformers' own forward, full and streamed, through transformers' loader and moetool's
own; Qwen3-VL-MoE's transposed hub experts."""

import json

import pytest
import torch
from safetensors.torch import load_file

import moetool
from moetool.checkpoint import open_checkpoint
from moetool.ops.convert import ConvertOptions, convert
from moetool.ops.evaluate import EvalOptions, evaluate
from moetool.ops.inspect import inspect_checkpoint
from moetool.runner.building import model_class
from moetool.runner.model import load_pretrained
from tests.tiny import TINY, load_reference

# family -> the class transformers runs it with (no AutoModelForCausalLM entry for any of them)
CLASSES = {"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "glm4v_moe": "Glm4vMoeForConditionalGeneration",
           "mistral4": "Mistral4ForCausalLM", "glm5_next": "Glm5NextForConditionalGeneration",
           "step3p7": "Step3p7ForConditionalGeneration", "muse_spark": "MuseSparkForConditionalGeneration",
           "hy_v4_vl": "HYV4VLForConditionalGeneration", "deepseek_ocr2": "DeepseekOcr2ForConditionalGeneration",
           "mistral_large4": "MistralLarge4ForConditionalGeneration",
           "qwen3_omni_moe": "Qwen3OmniMoeThinkerForConditionalGeneration"}   # (the thinker of the whole model)


def _forms_inspect_clean_and_run_as_the_hub(hub, held, *converted):
    """Every form (HUB, HELD, CONVERTED) inspects without problems, and moetool's loader runs the others as
    transformers runs HUB; returns (the ids, HUB's logits)."""
    for path in (hub, held, *converted):
        with open_checkpoint(path) as ckpt:
            assert inspect_checkpoint(ckpt).problems == [], path
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _logits(load_reference(hub, dtype=torch.float32).eval(), ids)
    for path in (*converted, held):
        assert (_logits(moetool.load_model(path), ids) - want).abs().max() <= 1e-5, path
    return ids, want


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_model_class_picks_the_causal_lm_else_the_wrapper():
    import transformers

    assert model_class(transformers.Qwen3MoeConfig()) is transformers.AutoModelForCausalLM
    assert model_class(transformers.Mistral4Config()) is transformers.Mistral4ForCausalLM   # not registered
    assert model_class(transformers.Qwen3VLMoeConfig()) is transformers.AutoModelForImageTextToText
    assert model_class(transformers.SwitchTransformersConfig(), seq2seq=True) is transformers.AutoModelForSeq2SeqLM


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_text_runs_equal_transformers_full_streamed_and_own_loader(tmp_path, tiny, family):
    path = tiny(family)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    oracle = load_reference(path, dtype=torch.float32).eval()
    assert type(oracle).__name__ == CLASSES[family]
    want = _logits(oracle, ids)
    assert (_logits(moetool.load_model(path), ids) - want).abs().max() <= 1e-5
    own = load_pretrained(path)   # every weight through moetool's tensor plan (transposed where stored so)
    assert (_logits(own, ids) - want).abs().max() <= 1e-5
    (tmp_path / "ids.json").write_text(json.dumps(torch.randint(0, 64, (240,)).tolist()))
    with open_checkpoint(path) as ckpt:
        full, streamed = (evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=24, mode=mode))
                          for mode in ("full", "streamed"))
    assert streamed.mode == "streamed" and streamed.nll_mean == pytest.approx(full.nll_mean, rel=1e-6)


def test_qwen3_vl_moe_hub_experts_are_transposed_and_convert_round_trips(tmp_path, tiny):
    """The hub stores gate_up_proj [E, H, 2I] (transformers 5 holds [E, 2I, H], and saves that); per-expert
    (moetool's own layout) is the same from either stored form, back to fused gives the held form
    bit for bit, every form runs as the hub's, and inspect finds no problem in any."""
    hub, held = tiny("qwen3_vl_moe"), tiny("qwen3_vl_moe", fused=True)
    text = TINY["qwen3_vl_moe"][1]["text_config"]
    name = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    stored, kept = _tensors(hub)[name], _tensors(held)[name]
    assert stored.shape == (4, text["hidden_size"], 2 * text["moe_intermediate_size"])
    assert torch.equal(stored, kept.transpose(1, 2))
    for source, out in ((hub, "per"), (held, "per-held")):
        with open_checkpoint(source) as ckpt:
            convert(ckpt, tmp_path / out, ConvertOptions(layout="per-expert"))
    per = _tensors(tmp_path / "per")
    assert per.keys() == _tensors(tmp_path / "per-held").keys()
    assert all(torch.equal(t, _tensors(tmp_path / "per-held")[k]) for k, t in per.items())
    inter = text["moe_intermediate_size"]
    assert torch.equal(per["model.language_model.layers.0.mlp.experts.1.gate_proj.weight"], kept[1, :inter])
    assert torch.equal(per["model.language_model.layers.0.mlp.experts.1.up_proj.weight"], kept[1, inter:])
    with open_checkpoint(tmp_path / "per") as ckpt:
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="fused"))
    back, original = _tensors(tmp_path / "back"), _tensors(held)
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    _forms_inspect_clean_and_run_as_the_hub(hub, held, tmp_path / "per", tmp_path / "back")


def _mistral3_of_mistral4(path):
    """A tiny Mistral 3 image-text wrapper of a Mistral 4 text model (as Mistral-Small-4 is released),
    saved as transformers saves it (language_model.model.*, vision_tower.* at the top)."""
    import transformers

    config = transformers.Mistral3Config(
        text_config=dict(TINY["mistral4"][1], model_type="mistral4"), spatial_merge_size=1,
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=16, patch_size=4, head_dim=16))
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config).eval()
    model.save_pretrained(path)
    return model


def test_mistral4_in_its_mistral3_wrapper(tmp_path):
    """inspect counts the wrapper's parameters; load_model (transformers' loader and moetool's own), eval
    streamed and full, routing capture and a quantized copy all run the text model as transformers does."""
    from moetool.ops.inspect import inspect_checkpoint
    from moetool.ops.profile import ProfileOptions, profile
    from moetool.ops.quantize import QuantizeOptions, quantize

    model = _mistral3_of_mistral4(tmp_path / "m")
    assert any(n.startswith("language_model.model.") for n in _tensors(tmp_path / "m"))
    with open_checkpoint(tmp_path / "m") as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.family == "mistral4" and report.problems == [] and not report.guessed
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.moe_layers == [1, 2] and report.num_experts == 4 and report.num_shared_experts == 1
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(model, ids)
    assert (_logits(moetool.load_model(tmp_path / "m"), ids) - want).abs().max() <= 1e-5
    assert (_logits(load_pretrained(tmp_path / "m"), ids) - want).abs().max() <= 1e-5
    tokens = torch.randint(0, 64, (240,), generator=torch.Generator().manual_seed(1))
    (tmp_path / "ids.json").write_text(json.dumps(tokens.tolist()))
    with open_checkpoint(tmp_path / "m") as ckpt:
        full, streamed = (evaluate(ckpt, EvalOptions(token_ids=tmp_path / "ids.json", seq_len=24, mode=mode))
                          for mode in ("full", "streamed"))
        assert streamed.nll_mean == pytest.approx(full.nll_mean, rel=1e-6)
        stats = [profile(ckpt, ProfileOptions(token_ids=tmp_path / "ids.json", seq_len=24, max_tokens=96,
                                              batch_size=2, device="cpu", dtype="fp32", mode=mode))
                 for mode in ("full", "streamed")]
    assert [layer.counts for layer in stats[0].layers] == [layer.counts for layer in stats[1].layers]
    assert all(sum(layer.counts) == 96 * 2 for layer in stats[0].layers)
    with open_checkpoint(tmp_path / "m") as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g16-sym"))
    with open_checkpoint(tmp_path / "q") as ckpt:
        convert(ckpt, tmp_path / "d", ConvertOptions(dequantize=True, dtype="fp32"))
    dense = _logits(load_reference(tmp_path / "d", dtype=torch.float32).eval(), ids)
    got = _logits(moetool.load_model(tmp_path / "q"), ids)
    assert (got - dense).abs().max() <= 1e-4 * dense.abs().max() and (dense - want).abs().max() > 1e-4


@pytest.mark.parametrize("inter", [16, 32])   # hidden 32: gate_up [E, 32, 32] square, or down [E, 32, 32]
def test_qwen3_vl_moe_square_experts_read_right_by_moetool(tmp_path, inter):
    """Where H == 2I or H == I a stored stack cannot say its orientation (transformers' check_dims then
    skips its transpose): moetool's per-expert copy of the model, fused again, quantized or not, still
    runs the model itself, since moetool writes the held form."""
    import copy

    import transformers

    from moetool.ops.quantize import QuantizeOptions, quantize
    from moetool.runner.building import build_model

    cls, kwargs = TINY["qwen3_vl_moe"]
    kwargs = copy.deepcopy(kwargs)
    kwargs["text_config"]["moe_intermediate_size"] = inter
    torch.manual_seed(0)
    model = build_model(getattr(transformers, cls)(**kwargs)).eval()
    model.save_pretrained(tmp_path / "held")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _logits(model, ids)
    with open_checkpoint(tmp_path / "held") as ckpt:
        convert(ckpt, tmp_path / "per", ConvertOptions(layout="per-expert"))
    with open_checkpoint(tmp_path / "per") as ckpt:
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="fused"))
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g16-sym"))
    for path in ("per", "back"):
        assert (_logits(moetool.load_model(tmp_path / path), ids) - want).abs().max() <= 1e-5, path
    assert (_logits(moetool.load_model(tmp_path / "q"), ids) - want).abs().max() <= 2e-3


def test_step3p7_stacked_hub_experts_join_as_transformers_joins_them(tmp_path, tiny):
    """The hub stores gate_proj and up_proj apart, each stacked [E, I, H] (transformers 5 joins them into
    gate_up_proj [E, 2I, H] as it loads); moetool's per-expert layout (its own) splits them, back to fused gives
    the held joined form under transformers' names, and every form runs as the hub's."""
    hub, held = tiny("step3p7"), tiny("step3p7", fused=True)
    stored, kept = _tensors(hub), _tensors(held)
    gate, up = stored["model.layers.1.moe.gate_proj.weight"], stored["model.layers.1.moe.up_proj.weight"]
    assert gate.shape == up.shape == (4, 16, 32)
    joined = kept["model.language_model.layers.1.mlp.experts.gate_up_proj"]
    assert torch.equal(joined, torch.cat([gate, up], dim=1))
    with open_checkpoint(hub) as ckpt:
        convert(ckpt, tmp_path / "per", ConvertOptions(layout="per-expert"))
    per = _tensors(tmp_path / "per")
    assert torch.equal(per["model.layers.1.moe.experts.3.up_proj.weight"], up[3])
    assert torch.equal(per["model.layers.2.moe.experts.0.down_proj.weight"],
                       stored["model.layers.2.moe.down_proj.weight"][0])
    with open_checkpoint(tmp_path / "per") as ckpt:
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="fused"))
    back = _tensors(tmp_path / "back")
    assert torch.equal(back["model.layers.1.mlp.experts.gate_up_proj"], joined)
    assert torch.equal(back["model.layers.1.mlp.gate.e_score_correction_bias"],
                       stored["model.layers.1.moe.router_bias"])
    assert not any(".moe." in name or ".share_expert." in name for name in back)
    ids, want = _forms_inspect_clean_and_run_as_the_hub(hub, held, tmp_path / "per", tmp_path / "back")
    assert (_logits(load_reference(tmp_path / "back", dtype=torch.float32).eval(), ids) - want).abs().max() <= 1e-5


def _under_held_prefixes(name):
    """A Qwen3-Omni hub name as transformers 5 holds (and saves) it: the thinker's text model under
    thinker.model.language_model., its towers under thinker.model.; the talker and code2wav as they are."""
    for hub, held in (("thinker.audio_tower.", "thinker.model.audio_tower."),
                      ("thinker.visual.", "thinker.model.visual."),
                      ("thinker.model.", "thinker.model.language_model.")):
        if name.startswith(hub):
            return held + name[len(hub):]
    return name


def test_qwen3_omni_moe_convert_fuses_the_thinker_and_carries_every_tower(tmp_path, tiny):
    """convert fuses (and splits back, bit for bit) the thinker's experts only: the fused ones equal what
    transformers 5 holds; the audio and vision towers, the talker (its own MoE, experts one tensor each)
    and code2wav are carried through byte for byte under their stored names. transformers loads the whole
    model from every form alike, talker included, and the thinker's logits are the hub's."""
    import transformers

    hub, held = tiny("qwen3_omni_moe"), tiny("qwen3_omni_moe", fused=True)
    with open_checkpoint(hub) as ckpt:
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
    with open_checkpoint(tmp_path / "fused") as ckpt:
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="per-expert"))
    original, fused, back = _tensors(hub), _tensors(tmp_path / "fused"), _tensors(tmp_path / "back")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)
    thinker_experts = {k for k in original if k.startswith("thinker.model.layers.") and ".mlp.experts." in k}
    assert thinker_experts and not thinker_experts & fused.keys()
    carried = original.keys() - thinker_experts
    assert any(k.startswith("talker.model.layers.") and ".mlp.experts.0." in k for k in carried)
    assert all(torch.equal(fused[k], original[k]) for k in carried)   # every other tensor as stored
    reference = _tensors(held)
    new = fused.keys() - carried
    assert new and all(torch.equal(fused[k], reference[_under_held_prefixes(k)]) for k in new)
    with open_checkpoint(tmp_path / "fused") as ckpt:
        report = inspect_checkpoint(ckpt)
    assert report.layout == "fused" and report.problems == []
    whole = {path: transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
             for path in (hub, tmp_path / "fused", tmp_path / "back")}
    states = {path: model.state_dict() for path, model in whole.items()}
    assert all(states[hub].keys() == s.keys() and all(torch.equal(states[hub][k], s[k]) for k in s)
               for s in states.values())
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    want = _logits(load_reference(hub, dtype=torch.float32).eval(), ids)
    for path in (tmp_path / "fused", tmp_path / "back", held):
        assert torch.equal(_logits(load_reference(path, dtype=torch.float32).eval(), ids), want), path
        assert (_logits(moetool.load_model(path), ids) - want).abs().max() <= 1e-5, path


def test_qwen3_omni_moe_inspect_counts_the_towers_as_other(tiny):
    """The thinker's text model is the family's: its experts, attention, embedding and head are counted as
    the text model's; the audio and vision towers, the talker (whose own MoE's experts are not the family's)
    and code2wav are all "other", in no decoder layer, and the total is transformers' whole model."""
    import transformers

    path = tiny("qwen3_omni_moe")
    with open_checkpoint(path) as ckpt:
        report = inspect_checkpoint(ckpt)
    whole = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    in_towers = ("thinker.model.audio_tower.", "thinker.model.visual.")
    towers = sum(p.numel() for n, p in whole.named_parameters()
                 if not n.startswith("thinker.") or n.startswith(in_towers))
    thinker_text = whole.thinker.model.language_model
    text_norms = sum(p.numel() for n, p in thinker_text.named_parameters() if "norm" in n)   # (Qwen3-MoE's alike)
    assert report.params["other"] == towers + text_norms
    experts = sum(p.numel() for n, p in thinker_text.named_parameters() if ".experts." in n)
    assert report.params["routed_experts"] == experts
    assert report.total_params == sum(p.numel() for p in whole.parameters())
    assert sum(info.params for info in report.layers) == sum(p.numel() for n, p in thinker_text.named_parameters()
                                                             if n.startswith("layers."))


def test_qwen3_omni_moe_config_root_is_nested_and_the_runner_builds_the_thinker():
    """config_root as a dotted path with alternatives: a whole model's thinker_config.text_config, a thinker's
    text_config; the keys read from the wrapper (tie_word_embeddings) come from the config holding the text
    model's (the thinker's, never the whole model's). The runner builds the thinker of either."""
    import transformers

    from moetool.arch import detect_family
    from moetool.runner.building import build_model

    text = {"num_experts": 4, "num_experts_per_tok": 2}
    whole = {"model_type": "qwen3_omni_moe", "tie_word_embeddings": True,
             "thinker_config": {"tie_word_embeddings": False, "text_config": text}}
    thinker = {"model_type": "qwen3_omni_moe_thinker", "tie_word_embeddings": True, "text_config": text}
    family = detect_family(whole)
    assert family.name == "qwen3_omni_moe" and detect_family(thinker) is family
    assert family.settings(whole)["num_experts"] == 4 and family.settings(whole)["tie_word_embeddings"] is False
    assert family.settings(thinker)["num_experts"] == 4 and family.settings(thinker)["tie_word_embeddings"] is True
    assert family.text_root(whole)[1] is text and family.text_root({"model_type": "qwen3_omni_moe"}) is None
    cls, kwargs = TINY["qwen3_omni_moe"]
    config = getattr(transformers, cls)(**kwargs)
    assert model_class(config) is transformers.AutoModelForImageTextToText
    for built in (build_model(config), build_model(config.thinker_config)):
        assert type(built).__name__ == "Qwen3OmniMoeThinkerForConditionalGeneration"


def test_qwen3_omni_moe_transformers_layout_quantizes_the_thinker_in_stock_transformers(tmp_path, tiny):
    """--layout transformers of a whole Qwen3-Omni: stock transformers loads it and holds every Linear the
    checkpoint quantized in 4 bits (the skip list names none of them, under either of its names)."""
    import transformers

    from moetool.ops.quantize import QuantizeOptions, quantize

    with open_checkpoint(tiny("qwen3_omni_moe")) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="nf4", layout="transformers"))
    model = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "q")
    attention = model.thinker.model.language_model.layers[0].self_attn
    assert all(type(getattr(attention, p)).__name__ == "Linear4bit" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert type(model.thinker.lm_head).__name__ == "Linear"


def test_deepseek_ocr2_towers_are_carried_and_load_through_transformers_renames(tmp_path, tiny):
    """DeepSeek-OCR 2's vision towers and projector keep their hub names (sam_model.blocks.{N}.norm1, qwen2_model.
    model.model.layers.{N}, projector.layers, view_seperator), which transformers renames by layer number as it
    loads: convert (fused and back, bit for bit), prune (per layer and global) and quantize carry them unchanged,
    and every weight, towers included, loads as transformers loads the hub's (moetool's own loaders fill the towers
    through transformers' conversion: load_unnamed); stock transformers loads every unquantized output whole.
    inspect counts none of the towers' layers as the decoder's."""
    import shutil

    from safetensors.torch import save_file

    from moetool.ops.prune import PruneOptions, prune
    from moetool.ops.quantize import QuantizeOptions, quantize

    held, hub = tiny("deepseek_ocr2", fused=True), shutil.copytree(tiny("deepseek_ocr2"), tmp_path / "hub")
    stored = _tensors(hub)   # (layer 1's experts heavier: a global prune by weight norm keeps more of them)
    stored = {k: t * 4 if k.startswith("model.layers.1.mlp.experts.") else t for k, t in stored.items()}
    save_file(stored, next(hub.glob("*.safetensors")), metadata={"format": "pt"})
    towers = {k for k in stored if k.startswith(("model.sam_model.", "model.qwen2_model.", "model.projector.",
                                                 "model.view_seperator"))}
    assert any(".blocks.0.norm1." in k for k in towers)
    assert any("qwen2_model.model.model.layers.0." in k for k in towers)
    with open_checkpoint(hub) as ckpt:
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
        prune(ckpt, tmp_path / "pruned", PruneOptions(keep=3, criterion="random", seed=0))
        uneven = prune(ckpt, tmp_path / "global", PruneOptions(keep=3, criterion="weight-norm", scope="global"))
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int8-g16-sym"))
    assert sorted(len(kept) for kept in uneven.kept.values()) == [2, 4]   # layers of their own expert counts
    with open_checkpoint(tmp_path / "fused") as ckpt:
        convert(ckpt, tmp_path / "back", ConvertOptions(layout="per-expert"))
    fused, back = _tensors(tmp_path / "fused"), _tensors(tmp_path / "back")
    assert back.keys() == stored.keys() and all(torch.equal(back[k], stored[k]) for k in stored)
    assert torch.equal(fused["model.layers.2.mlp.experts.gate_up_proj"],
                       _tensors(held)["model.language_model.layers.2.mlp.experts.gate_up_proj"])
    for out in ("fused", "pruned", "global", "q"):
        carried = _tensors(tmp_path / out)
        assert all(torch.equal(carried[k], stored[k]) for k in towers), out
        with open_checkpoint(tmp_path / out) as ckpt:   # (inspect takes a global prune's counts for missing experts)
            assert out == "global" or inspect_checkpoint(ckpt).problems == [], out
    reference = load_reference(hub, dtype=torch.float32)
    want, text = reference.state_dict(), dict(reference.model.language_model.named_parameters())
    with open_checkpoint(hub) as ckpt:   # (the Qwen2 encoder's layers and attention are not the text model's)
        report = inspect_checkpoint(ckpt)
    layers = sum(t.numel() for n, t in text.items() if n.startswith("layers."))
    assert sum(info.params for info in report.layers) == layers
    assert report.params["attention"] == sum(t.numel() for n, t in text.items() if ".self_attn." in n)
    tower_names = [k for k in want if k.startswith(("model.vision_tower.", "model.multi_modal_projector.",
                                                    "model.view_separator"))]
    assert len(tower_names) == len(towers)
    held_state = load_pretrained(held).state_dict()   # (transformers' own fused save: towers under its names)
    assert all(torch.equal(held_state[k], want[k]) for k in tower_names)
    for path in (hub, tmp_path / "fused", tmp_path / "back"):
        for model in (load_reference(path, dtype=torch.float32), load_pretrained(path)):
            state = model.state_dict()
            assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want), path
    for path in (tmp_path / "pruned", tmp_path / "global", tmp_path / "q"):
        state = load_pretrained(path).state_dict()
        assert all(torch.equal(state[k], want[k]) for k in tower_names), path
    pruned = load_reference(tmp_path / "pruned", dtype=torch.float32).state_dict()
    assert all(torch.equal(pruned[k], want[k]) for k in tower_names)


def test_hy_v4_vl_counts_its_text_model_as_hy_v4_does(tiny):
    """HY4-VL's text model is Hy4's (the same tiny config): its attention, routed experts and decoder layers
    count as Hy4's, the vit.* tower's tensors as "other" (none of them text attention)."""
    with open_checkpoint(tiny("hy_v4_vl")) as a, open_checkpoint(tiny("hy_v4")) as b:
        wrapped, text = inspect_checkpoint(a), inspect_checkpoint(b)
    for kind in ("attention", "routed_experts", "shared_experts", "router"):
        assert wrapped.params[kind] == text.params[kind], kind
    assert [i.params for i in wrapped.layers] == [i.params for i in text.layers]
    assert wrapped.params["other"] > text.params["other"]   # (the tower)


def test_load_unnamed_reads_only_what_the_model_still_lacks(tmp_path, tiny, monkeypatch):
    """Step 3.7's vision tower, stored under hub names, goes through transformers' own conversion; the text
    model's tensors, which moetool's loaders place (quantized or not), never do."""
    import transformers.core_model_loading as loading

    from moetool.ops.quantize import QuantizeOptions, quantize

    real, seen = loading.convert_and_load_state_dict_in_model, []

    def spy(model, state, config, *args, **kwargs):
        seen.append(set(state))
        return real(model, state, config, *args, **kwargs)

    monkeypatch.setattr(loading, "convert_and_load_state_dict_in_model", spy)
    with open_checkpoint(tiny("step3p7")) as ckpt:
        quantize(ckpt, tmp_path / "q", QuantizeOptions(format="int4-g8", rules=("attention=nf4-b32",)))
    for path in (tiny("step3p7"), tmp_path / "q"):
        moetool.load_model(path)
    assert len(seen) == 2 and all(names and all(n.startswith(("vision_model.", "vit_large_projector.")) for n in names)
                                  for names in seen)


def test_mistral_large4_hub_names_and_held_names(tmp_path, tiny):
    """Mistral Large 4's hub names are Mistral's own without model. (layers.{L}.gate, layers.{L}.attention.wq,
    tok_embeddings): the fused layout names the text model's layers with transformers' held prefix
    (model.language_model.layers.{L}.mlp.gate, which it loads as it is, where layers.{L}.mlp.gate would be renamed
    again), transformers' own fused save converts to the hub's per-expert names, the vision tower keeps its hub
    names (transformers renames it and permutes its wq/wk as it loads them: moetool's own loader holds every
    tensor as transformers does), and every form runs as the hub's."""
    from moetool.arch import unsupported_reason

    hub, held = tiny("mistral_large4"), tiny("mistral_large4", fused=True)
    stored = _tensors(hub)
    tower = "vision_encoder.transformer.layers.0.attention.wq.weight"
    assert "layers.1.gate.weight" in stored and tower in stored
    with open_checkpoint(hub) as ckpt:
        convert(ckpt, tmp_path / "fused", ConvertOptions(layout="fused"))
    fused = _tensors(tmp_path / "fused")
    assert torch.equal(fused["model.language_model.layers.1.mlp.gate.weight"], stored["layers.1.gate.weight"])
    assert torch.equal(fused["model.language_model.layers.2.self_attn.q_proj.weight"],
                       stored["layers.2.attention.wq.weight"])
    assert not any(name.startswith("layers.") for name in fused) and torch.equal(fused[tower], stored[tower])
    with open_checkpoint(held) as ckpt:
        convert(ckpt, tmp_path / "per", ConvertOptions(layout="per-expert"))
    per = _tensors(tmp_path / "per")
    layers = {name: t for name, t in stored.items() if name.startswith("layers.")}
    assert {name for name in per if name.startswith("layers.")} == layers.keys()
    assert all(torch.equal(per[name], t) for name, t in layers.items())
    oracle, own = load_reference(hub, dtype=torch.float32).state_dict(), load_pretrained(hub).state_dict()
    assert own.keys() == oracle.keys() and all(torch.equal(own[name], t) for name, t in oracle.items())
    _forms_inspect_clean_and_run_as_the_hub(hub, held, tmp_path / "fused", tmp_path / "per")
    assert unsupported_reason({"model_type": "mistral_large4",
                               "text_config": {"model_type": "mistral_large4_text"}}) is None
    assert "no causal-LM class" in unsupported_reason({"model_type": "mistral_large4_text"})
