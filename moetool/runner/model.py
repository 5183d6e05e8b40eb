"""Build a transformers model from a Checkpoint, whole (`full`) or one layer at a time (`streamed`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from moetool.arch import Family, detect_family, get_family, unsupported_reason
from moetool.arch.matcher import Classifier
from moetool.arch.schema import EXPERT_ROLES
from moetool.checkpoint import Checkpoint, open_checkpoint
from moetool.checkpoint.gguf_view import VIEW_KIND, runnable_family, transformers_view
from moetool.checkpoint.writer import materialize
from moetool.errors import UnsupportedError, UsageError
from moetool.layout.plan import PlanOptions, family_context, plan_tensors
from moetool.quant import released
from moetool.quant.config import recorded_formats
from moetool.runner.building import (
    _decoder_layers,
    _named_as_model,
    empty_model,
    load_unnamed,
    pretrained,
    quiet_transformers,
    uneven_expert_counts,
)
from moetool.runner.device import DeviceError, available_memory
from moetool.runner.modules import fp32_names, set_tensor

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: object                   # the transformers *ForCausalLM
    family: Family
    mode: str                       # "full" | "streamed"
    device: object                  # where inputs go (the embedding's device with a device map)
    dtype: object
    layers_name: str                # where the decoder layers are, e.g. "model.layers"
    layers: object                  # the ModuleList of decoder layers
    config: dict = field(default_factory=dict)   # the checkpoint's config.json (a GGUF's, as transformers'd read it)
    layer_plan: dict[int, list] = field(default_factory=dict)   # streamed: each layer's planned tensors
    fp32_names: set[str] = field(default_factory=set)   # streamed: tensors held in fp32 whatever the dtype

    def base_forward(self, input_ids, attention_mask=None):
        """Run the decoder stack without the lm_head (profiling needs no logits). Encoder-decoder
        models run both stacks, the decoder teacher-forced on the same tokens."""
        if self.family.decoder_offset is not None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=input_ids,
                              use_cache=False)
        stack = self.model.get_submodule(self.layers_name.rpartition(".")[0])
        return stack(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)

    # ---------------------------------------------------------------- streamed mode: one layer at a time

    @property
    def largest_layer_bytes(self) -> int:
        return max((sum(t.nbytes for t in tensors) for tensors in self.layer_plan.values()), default=0)

    def read_layer(self, index: int) -> dict:
        """Layer INDEX's weights as CPU tensors, read (and dequantized) from the checkpoint; safe to call
        from a background thread."""
        prefix = f"{self.layers_name}.{index}."
        return {t.name[len(prefix):]: _held(materialize(t), t.name in self.fp32_names)
                for t in self.layer_plan.get(index, [])}

    def install_layer(self, index: int, tensors: dict) -> None:
        import torch

        try:
            local = {name: t.to(self.device) for name, t in tensors.items()}
            self.layers[index].load_state_dict(local, strict=False, assign=True)
        except torch.OutOfMemoryError:
            raise DeviceError(f"{self.device}: out of memory loading layer {index}",
                              hint="use a smaller --batch-size or --seq-len") from None

    def free_layer(self, index: int) -> None:
        import torch

        module = self.layers[index]
        for name, param in list(module.named_parameters()):
            set_tensor(module, name, torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))


def check_runnable(ckpt: Checkpoint) -> Family:
    """The family of a checkpoint moetool can run (before any data is read); UnsupportedError otherwise."""
    if ckpt.kind == "gguf":
        return get_family(runnable_family(ckpt))
    family = detect_family(ckpt.config)
    if family is None:
        reason = unsupported_reason(ckpt.config)
        raise UnsupportedError(f"{ckpt.source}: " + (f"moetool does not support this architecture yet: {reason}"
                                                     if reason else "the architecture is not known, so moetool "
                                                                    "cannot run it"))
    if ckpt.root is None or ckpt.kind == "file":
        raise UnsupportedError(f"{ckpt.source}: running a model needs its folder with config.json")
    method = released.quant_method(ckpt.config)
    if method not in released.METHODS and any(name.endswith(".qweight") for name in ckpt.tensors):
        if method:
            raise UnsupportedError(f"{ckpt.source}: its weights are stored packed (X.qweight) by quant_method "
                                   f"{method!r}, which moetool does not read ({', '.join(released.METHODS)} it does)")
        raise UnsupportedError(f"{ckpt.source}: its weights are stored packed (X.qweight), but neither config.json "
                               "nor a quantize_config.json says how",
                               hint='give config.json a quantization_config ({"quant_method": "gptq", "bits": 4, '
                                    '"group_size": 128} or "awq"), as the tool that wrote it did')
    return family


def runnable(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint a model is built from: a GGUF as the transformers checkpoint it stands for (its
    tensors dequantized as they are read), any other as it is."""
    return transformers_view(ckpt) if ckpt.kind == "gguf" else ckpt


def load_model(ckpt: Checkpoint, *, device, dtype, mode: str = "auto", trust_remote_code: bool = False,
               with_head: bool = False, device_map: str | None = None) -> LoadedModel:
    """Build the model with transformers' own classes on DEVICE in DTYPE.

    Args:
        mode: "full", "streamed" (built on the meta device; the engine loads one decoder layer at a
            time) or "auto" (by free memory).
        with_head: streamed mode: also load the lm_head (evaluation needs logits; profiling does not).
        device_map: full mode: "auto" spreads the model over the node's GPUs with accelerate.
    """
    with quiet_transformers():
        return _load_model(ckpt, device, dtype, mode, trust_remote_code, with_head, device_map)


def _load_model(ckpt, device, dtype, mode, trust_remote_code, with_head, device_map) -> LoadedModel:
    import torch


    ckpt = runnable(ckpt)
    family = check_runnable(ckpt)
    note = released.activation_note(ckpt.config, ckpt.tensors)
    if note:   # (profile's and eval's reports carry it too)
        log.info(note)
    if mode == "auto" and device_map is not None:   # a device map is for models too large for one device
        mode = "full"
    if mode == "auto":
        itemsize = torch.finfo(dtype).bits // 8
        need = sum(t.numel for t in ckpt.tensors.values()) * itemsize if ckpt.kind == VIEW_KIND else \
            ckpt.total_bytes * itemsize // 2   # a bf16/fp16 checkpoint in DTYPE
        mode = "full" if need * 1.2 < available_memory(device) else "streamed"
        log.info("mode auto: %s (weights %.1f GB, free %.1f GB)", mode, need / 1e9, available_memory(device) / 1e9)
    seq2seq = family.decoder_offset is not None
    if seq2seq and mode == "streamed":
        raise UnsupportedError(f"{family.title}: streamed mode runs decoder-only models; use --mode full")
    if seq2seq:
        mode = "full"
    if device_map is not None and mode != "full":
        raise UsageError(f"--device-map {device_map} places a whole model: use it with --mode full")
    if mode == "full":
        formats = recorded_formats(ckpt.config, ckpt.tensors)
        own_loader = (formats is not None or uneven_expert_counts(ckpt.config, family) or ckpt.kind == VIEW_KIND or
                      bool(released.quantized_weights(ckpt.config, ckpt.tensors)) or
                      (not family.transformers_reads_per_expert and _has_per_expert(ckpt, family)) or
                      _bnb_experts(ckpt, family) or family.resets_stored_buffers)
        if own_loader and device_map is not None:
            raise UnsupportedError(f"{ckpt.source}: --device-map works for checkpoints transformers loads itself, "
                                   "not for GGUF, moetool-quantized, globally pruned or per-expert GPT-OSS/Llama 4 "
                                   "ones, nor for families whose stored buffers transformers resets (ZAYA)",
                                   hint="use --mode streamed")
        try:
            if formats is not None:   # moetool's quantized experts stay quantized in memory
                from moetool.runner.quantized import load_quantized  # (its modules import torch: only here)

                model = load_quantized(ckpt, family, formats, device=device, dtype=dtype,
                                       trust_remote_code=trust_remote_code)
            elif own_loader:   # fused as it loads, or layers with their own expert counts
                model = _load_planned(ckpt, family, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            else:
                model = pretrained(ckpt.root, seq2seq=seq2seq, dtype=dtype, device_map=device_map or str(device),
                                   trust_remote_code=trust_remote_code)
        except torch.OutOfMemoryError:
            raise DeviceError(f"{device}: out of memory loading the whole model",
                              hint="use --mode streamed, a smaller --batch-size, or --dtype bf16") from None
        model.eval()
        if device_map is not None:   # inputs go where the embedding is
            device = model.get_input_embeddings().weight.device
        return LoadedModel(model, family, "full", device, dtype, *_decoder_layers(model), config=ckpt.config or {})
    if mode != "streamed":
        raise UnsupportedError(f"--mode {mode}: use full, streamed or auto")
    return _streamed(ckpt, family, device, dtype, trust_remote_code, with_head)


QUANTIZED_DTYPES = ("U8", "I32", "F8_E4M3", "I8")   # stored codes, dequantized through the tensor plan


def _quantized(ckpt: Checkpoint) -> bool:
    return any(r.dtype in QUANTIZED_DTYPES for r in ckpt.tensors.values())


def _bnb_experts(ckpt: Checkpoint, family: Family) -> bool:
    """Bitsandbytes-quantized experts, one tensor per expert (transformers 4's layout): transformers 5
    fuses experts as it loads them, which packed codes do not survive."""
    if ((ckpt.config or {}).get("quantization_config") or {}).get("quant_method") != "bitsandbytes":
        return False
    classifier = Classifier(family, family_context(ckpt)[2])
    return any(r.dtype == "U8" and classifier.classify(name).role in EXPERT_ROLES for name, r in ckpt.tensors.items())


def _target_layout(ckpt: Checkpoint, family: Family) -> str | None:
    """The expert layout to plan: fused (as transformers 5 holds experts) for per-expert experts; None
    (as stored) for fused ones, or for a checkpoint without experts (Granite 4.0's dense hybrid)."""
    return "fused" if "fused" in family.layouts and _has_per_expert(ckpt, family) else None


def _has_per_expert(ckpt: Checkpoint, family: Family) -> bool:
    """Whether the checkpoint stores experts one tensor per expert."""
    classifier = Classifier(family, family_context(ckpt)[2])
    return any(classifier.classify(name).layout == "per-expert" for name in ckpt.tensors)


def _streamed(ckpt: Checkpoint, family: Family, device, dtype, trust_remote_code: bool, with_head: bool
              ) -> LoadedModel:
    """Meta-device model with everything but the decoder layers loaded; the engine loads each layer
    (LoadedModel.read_layer / install_layer / free_layer)."""
    config, model = empty_model(ckpt, family, dtype, trust_remote_code)
    dtype_name = _dtype_name(dtype)
    layout = _target_layout(ckpt, family)
    plan = plan_tensors(ckpt, PlanOptions(dtype=dtype_name, layout=layout, dequantize=_quantized(ckpt),
                                           model_names=True))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    plan.tensors = _named_as_model(plan.tensors, family, own)
    prefix, layers = _decoder_layers(model)
    per_layer: dict[int, list] = {}
    rest = {}
    for tensor in plan.tensors:
        if tensor.name.startswith(prefix + "."):
            index = int(tensor.name[len(prefix) + 1:].split(".", 1)[0])
            per_layer.setdefault(index, []).append(tensor)
        else:
            rest[tensor.name] = tensor
    stack = prefix.rpartition(".")[0] + "."   # the decoder stack; the lm_head only when asked
    head = set()
    if with_head:
        output = model.get_output_embeddings()
        head_name = next(n for n, m in model.named_modules() if m is output)
        head = {name for name, _ in output.named_parameters(prefix=head_name)}
    fp32 = fp32_names(ckpt, family, [t.name for t in plan.tensors], dtype, model)
    state = {name: _held(materialize(t), name in fp32).to(device) for name, t in rest.items()
             if name in own and (name.startswith(stack) or name in head)}
    model.load_state_dict(state, strict=False, assign=True)
    if with_head and getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, buffer in model.named_buffers():
        if buffer.device != device and buffer.device.type != "meta":
            set_tensor(model, name, buffer.to(device))
    return LoadedModel(model, family, "streamed", device, dtype, prefix, layers, config=ckpt.config or {},
                       layer_plan=per_layer, fp32_names=fp32)


def _dtype_name(dtype) -> str | None:
    """moetool's name of a torch DTYPE (bf16, fp16, fp32; None for another)."""
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)


def _held(tensor, fp32: bool):
    """TENSOR as the model holds it: a floating one of the fp32 names in fp32."""
    return tensor.float() if fp32 and tensor.is_floating_point() else tensor


def load_pretrained(path, *, dtype=None, device="cpu", trust_remote_code: bool = False):
    """A transformers model for any checkpoint moetool writes: quantized ones (their weights stay
    quantized, dequantized when used), and globally pruned ones whose layers keep different numbers
    of experts (recorded as "moetool_experts_per_layer" in the config): each such layer is built
    with its own expert count, then every weight is loaded. Also GGUF files of the families moetool
    runs from GGUF (dequantized to DTYPE)."""
    import torch


    dtype = dtype or torch.float32
    with open_checkpoint(path) as source:
        ckpt = runnable(source)
        family = check_runnable(ckpt)
        formats = recorded_formats(ckpt.config, ckpt.tensors)
        if formats is not None:
            from moetool.runner.quantized import load_quantized  # (its modules import torch: only here)

            return load_quantized(ckpt, family, formats, device=device, dtype=dtype,
                                  trust_remote_code=trust_remote_code)
        return _load_planned(ckpt, family, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


def _load_planned(ckpt: Checkpoint, family: Family, *, dtype, device, trust_remote_code: bool):
    """Every weight read through the tensor plan (fused as transformers 5 holds experts) into the model
    built on the meta device."""
    import torch

    config, model = empty_model(ckpt, family, dtype, trust_remote_code)
    layout = _target_layout(ckpt, family)
    # quantized weights dequantized in DTYPE (as the streamed loader does), the rest cast below
    plan = plan_tensors(ckpt, PlanOptions(layout=layout, dequantize=_quantized(ckpt), model_names=True,
                                          dtype=_dtype_name(dtype)))
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    plan.tensors = _named_as_model(plan.tensors, family, own)
    fp32 = fp32_names(ckpt, family, [t.name for t in plan.tensors], dtype, model)
    # floating tensors in DTYPE, but those transformers keeps in fp32 (routers, correction biases)
    state = {t.name: materialize(t).to(device=device, dtype=(torch.float32 if t.name in fp32 else dtype)
                                       if t.dtype in ("F32", "F16", "BF16") else None)
             for t in plan.tensors if t.name in own}
    model.load_state_dict(state, strict=False, assign=True)
    load_unnamed(model, ckpt, family, plan.tensors, own, device=device, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise UnsupportedError(f"{ckpt.source}: {len(missing)} parameters are not in the checkpoint "
                               f"(first: {missing[0]})")
    for name, buffer in model.named_buffers():
        if buffer.device.type != torch.device(device).type:
            set_tensor(model, name, buffer.to(device))
    return model.eval()
