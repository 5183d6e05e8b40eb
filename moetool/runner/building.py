"""transformers' model of a checkpoint, built on the meta device for moetool's loaders to fill (the full,
streamed and quantized ones alike), and the tensors they leave to transformers' own conversion."""

from __future__ import annotations

from contextlib import contextmanager

from moetool.arch import Family
from moetool.arch.matcher import Classifier, in_other_tower
from moetool.arch.schema import UNEVEN_EXPERTS_KEY
from moetool.checkpoint import Checkpoint
from moetool.checkpoint.gguf_view import VIEW_KIND
from moetool.checkpoint.writer import materialize
from moetool.errors import CheckpointFormatError, UnsupportedError
from moetool.layout.plan import family_context
from moetool.runner.modules import as_model_shape, model_name


def _layer_slots(model) -> list[tuple[object, int]]:
    """(ModuleList, index) of each decoder layer, in the order of _decoder_layers (an encoder-decoder
    model's encoder layers, then its decoder's): where a rebuilt layer goes."""
    name, layers = _decoder_layers(model)
    if name != "encoder+decoder":
        return [(layers, i) for i in range(len(layers))]
    owner = {id(m): (parent, i) for _, parent in model.named_modules() if _is_module_list(parent)
             for i, m in enumerate(parent)}
    return [owner[id(layer)] for layer in layers]


def _is_module_list(module) -> bool:
    import torch

    return isinstance(module, torch.nn.ModuleList)


def _decoder_layers(model) -> tuple[str, object]:
    """The name and ModuleList of the decoder layers (model.layers, transformer.blocks, ...); for an
    encoder-decoder model, the encoder's and the decoder's layers in one list. The layers of a
    multimodal wrapper's vision or audio tower are not the decoder's."""
    import torch

    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m)
             and name.rsplit(".", 1)[-1] in ("layers", "blocks", "block", "h")
             and not in_other_tower(name)]
    if not lists:
        raise UnsupportedError("cannot find the decoder layers of this model")
    stacks = [(n, m) for n, m in lists if n.endswith(("encoder.block", "decoder.block", "encoder.layers",
                                                      "decoder.layers"))]
    if len(stacks) == 2:
        return "encoder+decoder", list(stacks[0][1]) + list(stacks[1][1])
    return max(lists, key=lambda item: len(item[1]))


def model_class(config, *, seq2seq: bool = False):
    """The transformers class that builds the model of CONFIG (a PretrainedConfig) for text-only runs:
    AutoModelForSeq2SeqLM for encoder-decoder models; AutoModelForCausalLM where its mapping has the
    model type (or remote code names one); else the `*ForCausalLM` class of the model's own
    transformers module (Mistral 4, not registered); else AutoModelForImageTextToText (multimodal
    wrappers whose text model has no causal-LM class of its own: Qwen3-VL-MoE, GLM-4.5V). Every
    loader builds its model with it (`build_model`, `pretrained`)."""
    import importlib

    import transformers
    from transformers.models.auto import configuration_auto, modeling_auto

    if seq2seq:
        return transformers.AutoModelForSeq2SeqLM
    config = runner_config(config)
    model_type = getattr(config, "model_type", None)
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or \
            "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):
        return transformers.AutoModelForCausalLM
    try:
        name = configuration_auto.model_type_to_module_name(model_type)
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except (ImportError, TypeError, AttributeError):
        module = None
    own = [cls for cls_name, cls in sorted(vars(module).items()) if cls_name.endswith("ForCausalLM")
           and isinstance(cls, type) and getattr(cls, "config_class", None) is type(config)] if module else []
    if own:
        return own[0]
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM   # (transformers' own error for a type it cannot build)


def runner_config(config):
    """The config of the model the runner builds for CONFIG: a thinker-talker model's thinker_config
    (Qwen3-Omni, whose whole model has no forward of its own: its thinker's ForConditionalGeneration gives
    the text logits, and transformers loads it alone from the whole checkpoint, leaving the talker and
    code2wav out), else CONFIG itself."""
    thinker = getattr(config, "thinker_config", None)
    return thinker if thinker is not None and hasattr(thinker, "to_dict") else config


def build_model(config, *, seq2seq: bool = False, trust_remote_code: bool = False, **kwargs):
    """The model of CONFIG built by `model_class` (random weights; meta tensors under init_empty_weights)."""
    cls = model_class(config, seq2seq=seq2seq)
    config = runner_config(config)
    if hasattr(cls, "from_config"):   # an auto class
        return cls.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    return cls._from_config(config, **kwargs)


def pretrained(path, *, seq2seq: bool = False, trust_remote_code: bool = False, **kwargs):
    """transformers' own from_pretrained of the checkpoint at PATH, by the class `model_class` picks."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = model_class(config, seq2seq=seq2seq)
    extra = {"trust_remote_code": trust_remote_code} if hasattr(cls, "from_config") else {}
    if runner_config(config) is not config:   # (a thinker, read from the whole model's checkpoint)
        extra["config"] = runner_config(config)
    return cls.from_pretrained(path, **extra, **kwargs)


@contextmanager
def quiet_transformers():
    """transformers' own progress bars ("Loading weights") off while moetool loads a model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def uneven_expert_counts(config: dict | None, family: Family | None = None) -> dict[int, int]:
    """Layer -> expert count of a globally pruned checkpoint (layers keeping different numbers)."""
    config = config or {}
    text = (family.text_root(config) if family else None) or (None, config.get("text_config") or {})
    counts = config.get(UNEVEN_EXPERTS_KEY) or \
        text[1].get(UNEVEN_EXPERTS_KEY)   # (a wrapper's: prune writes it in its text model's config)
    return {int(k): int(v) for k, v in (counts or {}).items()}


def empty_model(ckpt: Checkpoint, family: Family, dtype, trust_remote_code: bool, **kwargs):
    """The transformers model on the meta device (without its quantization_config: moetool reads the weights),
    each layer built with its own expert count where the checkpoint records uneven ones; KWARGS go to the
    model class (experts_implementation); returns (config, model)."""
    import copy

    import transformers
    from accelerate import init_empty_weights

    if ckpt.kind == VIEW_KIND:
        config = transformers.AutoConfig.for_model(**ckpt.config)
    else:
        config = transformers.AutoConfig.from_pretrained(ckpt.root, trust_remote_code=trust_remote_code)
    for held in (config, getattr(config, "text_config", None)):
        if held is not None and hasattr(held, "quantization_config"):
            delattr(held, "quantization_config")
    seq2seq = family.decoder_offset is not None
    with init_empty_weights(include_buffers=False):
        model = build_model(config, seq2seq=seq2seq, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
        uneven = uneven_expert_counts(ckpt.config, family)
        slots = _layer_slots(model) if uneven else []
        attribute = family.keys["num_experts"][0] if uneven else None
        donors = {}   # seq2seq: expert count -> the layers of a whole model built with it
        for layer, count in uneven.items():   # (a pruned --scope global checkpoint; dense models have none)
            layer_config = copy.deepcopy(config)
            text = layer_config.get_text_config()   # a wrapper's text model's config (else the config itself)
            setattr(text, attribute, count)
            parent, index = slots[layer]
            if seq2seq:   # encoder and decoder blocks take other arguments: take the layer of such a model
                if count not in donors:
                    donors[count] = _decoder_layers(build_model(
                        layer_config, seq2seq=True, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs))[1]
                parent[index] = donors[count][layer]
            else:
                parent[index] = type(parent[index])(text, layer)
    return runner_config(config), model.eval()   # (the config the model was built with)


def _named_as_model(tensors: list, family: Family, own: dict) -> list:
    """TENSORS under the names of the model transformers builds (modules.model_name), and in its
    shapes (modules.as_model_shape: fused experts transformers transposes as it loads them)."""
    from dataclasses import replace

    named = [replace(t, name=model_name(t.name, family, own)) if family.name_prefixes else t for t in tensors]
    return [as_model_shape(t, family, own) for t in named]


def load_unnamed(model, ckpt: Checkpoint, family: Family, tensors: list, own: dict, *, device, dtype) -> None:
    """Load the planned TENSORS that no family template names and the model does not hold under their
    names or moetool's renames of them (OWN: its parameters and buffers), MTP modules aside, as transformers'
    own loader does: through its conversion mapping for MODEL (renames, q/k/v splits, RoPE permutations).
    These are the tensors of a wrapper's other towers whose hub names differ from the model's (Step 3.7's
    vision tower); nothing is read where every parameter is loaded already. (transformers' loader API is
    internal: a release that changes it is refused with the reason.)"""
    if not any(p.device.type == "meta" for p in model.parameters()):
        return
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    _, cfg, offset = family_context(ckpt)
    classifier = Classifier(family, offset)
    rest = {}
    for tensor in tensors:
        m = classifier.classify(tensor.name)
        if model_name(tensor.name, family, own) not in own and m.guessed and \
                not family.is_mtp(cfg, tensor.name, m.layer):
            rest[tensor.name] = materialize(tensor)
    if not rest:
        return
    saved = getattr(model, "_weight_conversions", None)   # (what save_pretrained reverses: the model's own)
    try:
        with quiet_transformers():
            info, _ = convert_and_load_state_dict_in_model(model, rest, LoadStateDictConfig(
                weight_mapping=get_model_conversion_mapping(model), dtype=dtype, device_map={"": str(device)}))
    except TypeError as exc:   # another transformers release's signature
        raise UnsupportedError(f"{ckpt.source}: this transformers release loads tensors under hub names another "
                               f"way ({exc}); moetool reads them with transformers 5.24's loader") from None
    finally:
        model._weight_conversions = saved
    problems = dict(info.conversion_errors) or {k[0]: f"shape {list(k[1])}, expected {list(k[2])}"
                                                for k in info.mismatched_keys}
    if problems:
        name, why = next(iter(problems.items()))
        raise CheckpointFormatError(f"{ckpt.source}: {len(problems)} tensors stored under hub names do not load "
                                    f"(first: {name}: {why})")
