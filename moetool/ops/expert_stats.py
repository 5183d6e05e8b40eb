"""Value-level statistics for inspect: expert norms and similarity, NaN/Inf scans.

Everything streams: expert weights are read row-block by row-block for all experts
of a layer at once, and only the E x E Gram matrix is kept, so memory stays at one
block (about CHUNK_BYTES) whatever the model size.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from math import ceil

import numpy as np

from moetool.arch.matcher import scale_of
from moetool.arch.schema import Role
from moetool.checkpoint import Checkpoint, TensorRef
from moetool.checkpoint.values import FLOAT_DTYPES, matrix_shape, read_rows

log = logging.getLogger(__name__)

CHUNK_BYTES = 128 << 20
_E2M1 = np.array((0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6), dtype=np.float32)
FP8_BLOCK = 128
WEIGHT_ROLES = (Role.EXPERT_GATE, Role.EXPERT_UP, Role.EXPERT_GATE_UP, Role.EXPERT_DOWN)


class _ExpertSlices:
    """One weight role of one layer: a row range of the expert-stacked matrix per expert."""

    def __init__(self, per_expert: dict[int, TensorRef] | None = None, fused: TensorRef | None = None,
                 experts: int = 0, scales: dict[int, TensorRef] | None = None,
                 block: tuple[int, int] = (FP8_BLOCK, FP8_BLOCK)):
        self.per_expert, self.fused, self.scales = per_expert, fused, scales or {}
        self.block = block   # the rows and columns block fp8 shares a scale over (weight_block_size)
        if fused is not None:
            rows, self.cols = matrix_shape(fused)
            self.experts = experts
            # [E, r, c], whose E may count identity experts' rows past the real ones (LongCat-Flash), or
            # DBRX's packed [E*r, c]
            self.rows = rows // (fused.shape[0] if len(fused.shape) == 3 else experts)
        else:
            first = per_expert[min(per_expert)]
            self.rows, self.cols = matrix_shape(first)
            self.experts = experts
            self.fp4 = first.dtype == "I8"   # (with scales: FP4 e2m1, two values a byte, DeepSeek-V4's)
            if self.fp4:
                self.cols *= 2

    def read(self, expert: int, start: int, stop: int) -> np.ndarray:
        if self.fused is not None:
            base = expert * self.rows
            return read_rows(self.fused, base + start, base + stop)
        ref = self.per_expert[expert]
        block = read_rows(ref, start, stop)
        scale = self.scales.get(expert)
        if self.fp4:   # [rows, cols / 2] e2m1 pairs, the low nibble first; a scale per group of a row
            codes = block.astype(np.int8).view(np.uint8)
            values = _E2M1[np.stack((codes & 0x0F, codes >> 4), axis=-1)].reshape(block.shape[0], -1)
            s = read_rows(scale, start, stop)
            return (values.reshape(*s.shape, -1) * s[..., None]).reshape(values.shape)
        if scale is not None and scale.numel == 1:   # fp8 with one scale for the matrix (Mistral's qscale_weight)
            return block * read_rows(scale, 0, 1).reshape(())
        if scale is not None:   # block fp8: W = q * scale_inv[row // b0, col // b1]
            rows, cols = self.block
            s = read_rows(scale, start // rows, ceil(stop / rows))
            s = np.repeat(np.repeat(s, rows, axis=0), cols, axis=1)
            offset = start - (start // rows) * rows
            block = block * s[offset:offset + block.shape[0], :block.shape[1]]
        return block


def _layer_slices(ckpt: Checkpoint, records, layer: int, experts: int) -> list[_ExpertSlices] | str:
    """The weight roles of one layer, or the reason they cannot be read."""
    per_expert: dict[Role, dict[int, TensorRef]] = defaultdict(dict)
    fused: dict[Role, TensorRef] = {}
    for r in records:
        m = r.match
        if m.layer != layer or m.role not in WEIGHT_ROLES or m.aux:
            continue
        if m.packed or r.ref.dtype in ("U8", "I32") or r.ref.dtype not in FLOAT_DTYPES | {"I8"} or \
                (r.ref.dtype == "I8" and (m.expert is None or scale_of(ckpt.tensors, r.ref.name) is None)):
            return f"expert weights are stored quantized ({r.ref.dtype}); dequantize them first"
        if m.expert is None:
            fused[m.role] = r.ref
        elif m.expert < experts:   # (not the gate and up transformers 5 saves for identity experts, never used)
            per_expert[m.role][m.expert] = r.ref
    slices = [_ExpertSlices(fused=ref, experts=experts) for ref in fused.values()]
    for role, refs in per_expert.items():
        if len(refs) != experts:
            return f"{len(refs)} of {experts} experts have a {role.value} tensor"
        scales = {}
        if len({ref.dtype for ref in refs.values()}) > 1:
            return f"the {role.value} tensors of its experts are stored in several dtypes"
        for e, ref in refs.items():
            if ref.dtype.startswith("F8") or ref.dtype == "I8":
                scale = scale_of(ckpt.tensors, ref.name)
                if scale is None:
                    return f"{ref.name} is stored quantized ({ref.dtype}) without its scales"
                scales[e] = scale
        block = tuple(((ckpt.config or {}).get("quantization_config") or {}).get("weight_block_size") or
                      (FP8_BLOCK, FP8_BLOCK))
        slices.append(_ExpertSlices(per_expert=refs, experts=experts, scales=scales, block=block))
    return slices or "no expert weights found"


def expert_statistics(ckpt: Checkpoint, records, experts_per_layer: dict[int, int], threshold: float,
                      progress=None):
    """Per MoE layer: expert weight norms, the cosine-similarity matrix, near-duplicate pairs.

    Args:
        records: inspect's classified tensors.
        experts_per_layer: MoE layer -> number of routed experts found there.
    """
    from moetool.ops.inspect import ExpertStats

    plans = {layer: (experts, _layer_slices(ckpt, records, layer, experts) if experts else "no experts")
             for layer, experts in experts_per_layer.items()}
    total = sum(s.experts * s.rows * s.cols * 4 for _, sl in plans.values() if not isinstance(sl, str)
                for s in sl)
    done = 0
    results = []
    for layer, (experts, slices) in plans.items():
        if isinstance(slices, str):
            log.warning("layer %d: expert statistics skipped: %s", layer, slices)
            continue
        gram = np.zeros((experts, experts), dtype=np.float64)
        for sl in slices:
            rows = sl.block[0] if sl.fused is None else FP8_BLOCK   # (row steps whole blocks: each reads its scales)
            step = max(rows, (CHUNK_BYTES // max(1, experts * sl.cols * 4)) // rows * rows)
            for start in range(0, sl.rows, step):
                stop = min(start + step, sl.rows)
                block = np.stack([sl.read(e, start, stop).ravel() for e in range(experts)])
                gram += (block @ block.T).astype(np.float64)
                done += block.nbytes
                if progress:
                    progress(done, total)
        norms = np.sqrt(np.clip(np.diag(gram), 0, None))
        denom = np.outer(norms, norms)
        cosine = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
        duplicates = [(i, j, float(cosine[i, j])) for i in range(experts) for j in range(i + 1, experts)
                      if cosine[i, j] >= threshold]
        results.append(ExpertStats(layer, [float(n) for n in norms],
                                   [[round(float(v), 6) for v in row] for row in cosine], duplicates))
    return results


def find_non_finite(ckpt: Checkpoint, progress=None):
    """Yield (tensor name, count) for every floating tensor holding NaN or Inf."""
    refs = [ref for ref in ckpt.tensors.values() if ref.dtype in FLOAT_DTYPES]
    total = sum(ref.nbytes for ref in refs)
    done = 0
    for ref in refs:
        rows, cols = matrix_shape(ref)
        step = max(1, CHUNK_BYTES // max(1, cols * 4))
        bad = 0
        for start in range(0, rows, step):
            block = read_rows(ref, start, start + step)
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
        done += ref.nbytes
        if progress:
            progress(done, total)
        if bad:
            yield ref.name, bad
