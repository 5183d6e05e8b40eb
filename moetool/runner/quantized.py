"""Run checkpoints `moetool quantize` wrote: each quantized weight stays quantized in memory and is
dequantized when it is used (bitsandbytes' own kernels for its formats, on CUDA as on CPU). Also
compressed-tensors pack-quantized checkpoints (int4/int8 groups: what `--layout compressed-tensors`
writes, and llm-compressor), dequantized exactly as that package does.

* a quantized nn.Linear weight (attention, shared experts; experts of families transformers keeps
  as one Linear per expert) becomes a QuantLinear
* a fused expert parameter of transformers 5 (`gate_up_proj [E, 2I, H]`, `down_proj`) becomes an
  ExpertBank: indexing expert e dequantizes that expert's matrices only, which is how the eager
  experts forward reads it (`gate_up_proj[e]`); for families that multiply the whole stack
  (Llama 4) the stack is dequantized for the layer's forward and dropped after it
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from moetool.arch import Family, Role
from moetool.arch.matcher import Classifier
from moetool.checkpoint import Checkpoint
from moetool.checkpoint.writer import materialize
from moetool.errors import CheckpointFormatError
from moetool.layout.plan import PlanOptions, family_context, plan_tensors
from moetool.quant import compressed_tensors as ct
from moetool.quant.formats import Format, stacked_slices
from moetool.runner.building import empty_model, load_unnamed
from moetool.runner.modules import as_model_shape, fp32_names, model_name, set_tensor

log = logging.getLogger(__name__)


class QuantizedWeight(nn.Module):
    """One weight matrix in its stored form (codes, scales, state as buffers)."""

    def __init__(self, fmt: Format, shape: tuple[int, ...], parts: dict[str, torch.Tensor], name: str = ""):
        super().__init__()
        self.fmt, self.shape, self.name = fmt, tuple(shape), name   # NAME: the stored weight's
        self.suffixes = list(parts)
        self._state = None
        for i, tensor in enumerate(parts.values()):
            self.register_buffer(f"part{i}", tensor)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        parts = {s: getattr(self, f"part{i}") for i, s in enumerate(self.suffixes)}
        if self.fmt.is_bnb4 and self._state is None:
            self._state = self.fmt.bnb_state(parts, self.name)
        return self.fmt.dequantize(parts, self.shape, dtype, self._state, self.name)

    def _apply(self, fn, recurse=True):
        """Device moves only: a cast (model.to(bfloat16), .half()) would change the codes and scales."""
        self._state = None   # parsed again from the moved buffers
        for name, buffer in self._buffers.items():
            if buffer is not None:
                device = fn(torch.empty(0, dtype=buffer.dtype, device=buffer.device)).device
                self._buffers[name] = buffer.to(device)
        return self

    def extra_repr(self) -> str:
        return f"{self.fmt.id}, shape={list(self.shape)}"


class QuantLinear(nn.Module):
    """nn.Linear with a quantized weight. DTYPE: the model's (default: the bias's, else torch's
    default), what `.weight` is dequantized to; a model cast changes it, as it would an nn.Linear's."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype | None = None):
        super().__init__()
        self.weight_q = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.dtype = dtype or (bias.dtype if bias is not None else torch.get_default_dtype())

    def _apply(self, fn, recurse=True):
        """A model cast (model.to(bfloat16), .half()) changes the dtype the weight is dequantized to."""
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in the module's dtype, for model code that reads it (T5-style
        DenseActDense casts its hidden states to `wo.weight.dtype`)."""
        return self.weight_q.dequantize(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight_q.dequantize(x.dtype), self.bias)


class ExpertBank(nn.Module):
    """Stands in for a fused expert parameter: expert e is its matrices (gate and up, or down),
    dequantized and concatenated along the output axis, transposed where the fused parameter is
    [E, in, out] and the stored matrices [out, in] (Llama 4; GPT-OSS stores them as fused)."""

    def __init__(self, experts: list[list[QuantizedWeight]], transposed: bool, expert_shape: tuple[int, ...],
                 dtype: torch.dtype):
        super().__init__()
        self.experts = nn.ModuleList(nn.ModuleList(ws) for ws in experts)
        self.transposed, self.dtype = transposed, dtype
        stored = (sum(w.shape[0] for w in experts[0]), experts[0][0].shape[1])
        if (stored[::-1] if transposed else stored) != tuple(expert_shape):
            raise CheckpointFormatError(f"quantized experts of shape {list(stored)} cannot form {list(expert_shape)}")

    def __len__(self) -> int:
        return len(self.experts)

    def _apply(self, fn, recurse=True):
        """A model cast (model.to(bfloat16)) changes the dtype experts are dequantized to."""
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def __getitem__(self, index) -> torch.Tensor:
        matrices = [w.dequantize(self.dtype) for w in self.experts[int(index)]]
        whole = torch.cat(matrices, 0) if len(matrices) > 1 else matrices[0]
        return whole.T if self.transposed else whole

    def full(self) -> torch.Tensor:
        return torch.stack([self[e] for e in range(len(self))])


def _whole_stack_hooks(module: nn.Module, attrs: list[str]) -> None:
    """For experts that multiply the whole stack: dequantize it for the forward, drop it after."""
    def before(mod, args):
        for attr in attrs:
            mod._parameters[attr] = nn.Parameter(getattr(mod, f"{attr}_quantized").full(), requires_grad=False)

    def after(mod, args, output):
        for attr in attrs:
            mod._parameters[attr] = None

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def plain_linear(module) -> bool:
    """Whether MODULE is an nn.Linear computing x @ W.T + b, which a QuantLinear can stand in for (not a subclass
    with a forward of its own: DeepSeek-V4's block-diagonal DeepseekV4GroupedLinear)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def linear_weights(ckpt: Checkpoint, family: Family, *, head: bool = False, trust_remote_code: bool = False
                   ) -> set[str]:
    """Names of the weights transformers holds in nn.Linear modules (what a QuantLinear can replace),
    the output embedding only when HEAD."""
    _, model = empty_model(ckpt, family, torch.float32, trust_remote_code)
    output = model.get_output_embeddings()
    names = {f"{name}.weight" for name, module in model.named_modules()
             if plain_linear(module) and (head or module is not output)}
    # and the checkpoint's names of them, where a wrapper stores its model under other prefixes than the built
    # model holds (Qwen3-Omni's thinker.model.layers.*: the thinker built alone holds model.language_model.layers.*)
    return names | {name for name in ckpt.tensors if name not in names and model_name(name, family, names) in names}


def load_quantized(ckpt: Checkpoint, family: Family, formats: dict[str, Format], *, device, dtype,
                   trust_remote_code: bool = False):
    """A transformers model of CKPT with its quantized weights kept quantized (FORMATS: name -> format)."""
    config, model = empty_model(ckpt, family, dtype, trust_remote_code, experts_implementation="eager")
    _, cfg, offset = family_context(ckpt)
    classifier = Classifier(family, offset)
    fused = "fused" in family.layouts
    identity = family.zero_expert_rows(cfg)   # rows of identity experts in gate_up (LongCat-Flash): never read
    # (a compressed-tensors checkpoint's packed weights are planned as the float weights they hold)
    plan = plan_tensors(ckpt, PlanOptions(layout="fused" if fused else None, dequantize=True, model_names=True))

    def weight(name: str) -> QuantizedWeight:
        fmt, shape = formats[name], _shape(ckpt, name, formats[name])
        parts = {}
        for suffix, _, _ in fmt.components(shape, "BF16"):
            ref = ckpt.tensors.get(name + suffix)
            if ref is None:
                raise CheckpointFormatError(f"{ckpt.source}: {name + suffix} is missing")
            parts[suffix] = ref.load().to(device)
        return QuantizedWeight(fmt, shape, parts, name)

    per_expert: dict[tuple[int, Role, int], str] = {}
    slices = stacked_slices(ckpt.config)   # experts of tensors the family stores stacked (Granite)
    for name in formats:
        stacked, expert = slices.get(name, (name, None))
        m = classifier.classify(stacked)
        if m.expert is not None or expert is not None:
            per_expert[(m.layer, m.role, m.expert if expert is None else expert)] = name

    # stored expert matrices are [out, in], unless the family's one-tensor-per-expert form is slices
    # of its fused tensors (the same roles in both layouts: GPT-OSS)
    matrices = {Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_DOWN, Role.EXPERT_GATE_UP}
    slices = fused and set(family.per_expert or {}) & matrices == set(family.fused) & matrices
    # (a family transformers transposes as it loads holds its experts [E, out, in], as stored per expert)
    transposed = family.fused_transposed and not slices and not family.transposed_on_load
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    fp32 = fp32_names(ckpt, family, [t.name for t in plan.tensors], dtype, model)
    state, linears, banks = {}, {}, {}
    for tensor in plan.tensors:   # read under the checkpoint's names, placed under the model's
        m = classifier.classify(tensor.name)
        target = model_name(tensor.name, family, own)
        # (a fused up_proj alone: experts without a gate, Nemotron-H)
        if fused and m.role in (Role.EXPERT_GATE_UP, Role.EXPERT_UP, Role.EXPERT_DOWN) and m.expert is None \
                and (m.layer, Role.EXPERT_DOWN, 0) in per_expert:
            if (m.layer, m.role, 0) in per_expert:
                roles = (m.role,)
            elif m.role == Role.EXPERT_GATE_UP:
                roles = (Role.EXPERT_GATE, Role.EXPERT_UP)
            else:
                raise CheckpointFormatError(f"{tensor.name}: the checkpoint's quantization_config has no "
                                            f"quantized experts for it")
            experts = tensor.shape[0] - (identity if m.role == Role.EXPERT_GATE_UP else 0)
            banks[target] = ExpertBank([[weight(per_expert[(m.layer, r, e)]) for r in roles]
                                        for e in range(experts)], transposed,
                                       own[target].shape[1:] if target in own else tensor.shape[1:], dtype)
        elif plan.renamed.get(tensor.name, tensor.name) in formats:   # (quantized under its hub name)
            linears[target] = weight(plan.renamed.get(tensor.name, tensor.name))
        elif target in own:   # floating tensors in DTYPE, but those transformers keeps in fp32 (routers)
            held = as_model_shape(replace(tensor, name=target), family, own)
            state[target] = materialize(held).to(device=device, dtype=(
                torch.float32 if tensor.name in fp32 else dtype) if tensor.dtype in ("F32", "F16", "BF16") else None)
    model.load_state_dict(state, strict=False, assign=True)
    for name, bank in banks.items():
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        del owner._parameters[attr]
        if family.experts_indexed:
            setattr(owner, attr, bank)
        else:
            setattr(owner, f"{attr}_quantized", bank)
            owner._parameters[attr] = None
    for owner in {name.rpartition(".")[0] for name in banks} if not family.experts_indexed else ():
        module = model.get_submodule(owner)
        _whole_stack_hooks(module, [n.rpartition(".")[2] for n in banks if n.rpartition(".")[0] == owner])
    for name, qweight in linears.items():
        module_name = name.removesuffix(".weight")
        linear = model.get_submodule(module_name)
        if not plain_linear(linear):
            raise CheckpointFormatError(f"{ckpt.source}: {name} is quantized but is not a plain Linear weight in "
                                        f"transformers' {type(model).__name__}")
        bias = linear.bias if linear.bias is not None and linear.bias.device.type != "meta" else None
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, QuantLinear(qweight, bias, dtype))
    load_unnamed(model, ckpt, family, plan.tensors, own, device=device, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointFormatError(f"{ckpt.source}: {len(missing)} parameters are not in the checkpoint "
                                    f"(first: {missing[0]})")
    for name, buffer in list(model.named_buffers()):
        if buffer.device.type != torch.device(device).type:
            set_tensor(model, name, buffer.to(device))
    return model.eval()


def _shape(ckpt: Checkpoint, name: str, fmt: Format) -> tuple[int, ...]:
    if isinstance(fmt, ct.CompressedFormat):   # compressed-tensors: X.weight_packed, no X.weight
        return fmt.original_shape(ckpt.tensors[name + ct.PACKED].shape)
    blob = ckpt.tensors.get(f"{name}.quant_state.bitsandbytes__{fmt.kind}")
    parts = {s: ckpt.tensors[name + s].shape for s in fmt.suffixes if s and name + s in ckpt.tensors}
    return fmt.original_shape(ckpt.tensors[name].shape, blob.load if blob is not None else None, name, parts)
