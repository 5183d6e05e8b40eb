"""Small helpers on torch modules, shared by the model builders (imports no torch itself)."""

from __future__ import annotations

import re

from moetool.arch.matcher import Classifier
from moetool.layout.plan import family_context


def set_tensor(root, dotted: str, value) -> None:
    """Put VALUE at the dotted name under ROOT: as a parameter, as a buffer, or as a plain attribute,
    whichever the name is (without nn.Module.__setattr__'s checks, so a meta tensor can be replaced)."""
    import torch

    owner_name, _, attr = dotted.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if isinstance(value, torch.nn.Parameter):
        owner._parameters[attr] = value
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        setattr(owner, attr, value)


def model_name(name: str, family, own) -> str:
    """Checkpoint tensor NAME as the model transformers builds names it (OWN: its parameter and buffer
    names): the text model of an image-text checkpoint (Llama 4, Gemma 3, Qwen3.5 MoE) stores its
    weights under (model.)language_model., which the family's name_prefixes rewrite where the built
    model holds the rewritten name."""
    if name in own:
        return name
    for old, new in family.name_prefixes:
        if name.startswith(old) and new + name[len(old):] in own:
            return new + name[len(old):]
    return next((candidate for candidate in _prefixed(_stripped(name, family), family) if candidate in own), name)


def _stripped(name: str, family) -> str:
    """NAME in the family's template form (its first name_prefixes rewrite that applies)."""
    for old, new in family.name_prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _prefixed(name: str, family) -> list[str]:
    """The names a template-form NAME may have in a built model: each name_prefixes rewrite undone (a
    wrapper whose checkpoint holds another prefix than its model: Mistral 3's language_model.model.)."""
    return [old + name[len(new):] for old, new in family.name_prefixes if name.startswith(new)]


def module_in(model, family, name: str) -> str:
    """The name MODEL holds the module of template-form NAME (a family's router_module) under: NAME, or
    NAME with a name_prefixes rewrite undone (model.language_model.layers.1.mlp.gate of an image-text
    wrapper built whole); NAME itself where neither exists (get_submodule then says so)."""
    names = dict(model.named_modules()) if _prefixed(name, family) else {}
    if not names or name in names:
        return name
    return next((candidate for candidate in _prefixed(name, family) if candidate in names), name)


def as_model_shape(tensor, family, own):
    """A planned TENSOR in the shape the built model holds it: a family whose fused experts are stored
    [E, in, out] but held [E, out, in] (Family.transposed_on_load, Qwen3-VL-MoE) has them transposed,
    as transformers' Transpose(1, 2, check_dims=True) does: only where the stored shape is not the
    model's. Any other tensor as it is."""
    from dataclasses import replace

    from moetool.checkpoint.pieces import computed_piece
    from moetool.checkpoint.writer import materialize

    param = own.get(tensor.name)
    if not family.transposed_on_load or param is None or len(tensor.shape) != 3 or \
            tuple(param.shape) == tuple(tensor.shape):
        return tensor
    swapped = (tensor.shape[0], tensor.shape[2], tensor.shape[1])
    if tuple(param.shape) != swapped:
        return tensor   # (load_state_dict names the mismatch)
    return replace(tensor, shape=swapped, note="transposed", pieces=[computed_piece(
        lambda t=tensor: materialize(t).transpose(1, 2).contiguous(), swapped, tensor.dtype)])


def fp32_names(ckpt, family, names: list[str], dtype, model=None) -> set[str]:
    """The NAMES transformers holds in fp32 when it loads the model in a 16-bit DTYPE: those of the
    family's fp32 roles (its _keep_in_fp32_modules_strict routers and correction biases, Hunyuan's
    fp32-built router) and fp32 name endings, whatever dtype they are stored in; and in fp16 (not bf16)
    those MODEL's _keep_in_fp32_modules names (the non-strict list: DeepSeek-V3.2's and GLM-5's
    indexer.weights_proj, GPT-OSS's norms), matched as transformers' loader matches them: each entry a
    regular expression searched in the name, its * any characters."""
    import torch

    out: set[str] = set()
    keep = getattr(model, "_keep_in_fp32_modules", None) if dtype == torch.float16 else None
    if keep:
        pattern = re.compile("|".join(f"(?:{entry.replace('*', '.*')})" for entry in sorted(keep)))
        out = {name for name in names if pattern.search(name)}
    if dtype not in (torch.bfloat16, torch.float16) or not (family.fp32_roles or family.fp32_suffixes):
        return out
    classifier = Classifier(family, family_context(ckpt)[2])
    return out | {name for name in names if classifier.classify(name).role in family.fp32_roles or
                  name.endswith(family.fp32_suffixes)}
