"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers") for one weight matrix and the group-wise integer formats of `formats.py`.

GPTQ rounds a weight W [rows, columns] one column at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse of the Hessian of the layer's
squared output error, H = 2/n * sum x x^T over the n calibration inputs x of the layer. What it
minimises is the output error on those inputs, trace((W - Q) H (W - Q)^T) (`output_error`).

The steps follow the reference code (IST-DASLab/gptq `fasterquant`, as AutoGPTQ and llm-compressor
carry it):

* dead columns (an input that is zero on every token, H[i, i] == 0): H[i, i] = 1 and W[:, i] = 0;
* dampening: damp * mean(diag(H)) added to the diagonal;
* the upper Cholesky factor U of H^-1 (Cholesky of H, its inverse, Cholesky of that);
* columns in blocks of `block_size`: within a block each rounding error updates the block's later
  columns at once, the columns after the block get the block's errors in one matrix product
  (lazy batch updates: the same result as updating everything column by column);
* groups, without act_order: a group's scale and zero point are chosen (`int_grid`) on the group's
  weights as updated so far when its first column is reached, as in the reference;
* act_order: columns in descending order of diag(H) (the inputs with the most energy first). The
  stored format has contiguous groups and no g_idx, so every group's scale and zero point are
  chosen up front from the original weights (AutoGPTQ's `static_groups`) and each column is
  rounded on its own group's grid; codes are returned in the original column order.

The result is stored exactly as round-to-nearest stores it (`Format.quantize`): the writer, the
loader and `Format.dequantize` need nothing new.

A Hessian that is singular after dampening (too few or degenerate calibration tokens) is retried
with ten times the dampening, a few times; if it still fails, or the result is not finite, the
weight is rounded to nearest instead and the result says why (`GptqResult.fallback`, also logged
as a warning).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from moetool.errors import UsageError
from moetool.quant.formats import TORCH_NAMES, Format, check_finite, int_codes, int_grid, int_parts

log = logging.getLogger(__name__)

DAMP_RETRIES = 3   # dampening tried: damp, 10 x damp, 100 x damp, 1000 x damp


class Hessian:
    """H = 2/n * sum x x^T accumulated over batches of inputs x [tokens, columns] (leading dims
    flattened). Memory is columns^2 whatever the number of tokens. `sum` and `count` are tensors
    on DEVICE, so ranks can all-reduce them (both, with SUM) before `matrix()`."""

    def __init__(self, columns: int, *, device="cpu", dtype=None):
        import torch

        self.columns = columns
        self.sum = torch.zeros(columns, columns, dtype=dtype or torch.float32, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, x) -> None:
        if x.shape[-1] != self.columns:
            raise UsageError(f"Hessian of {self.columns} columns given inputs of {x.shape[-1]} columns")
        x = x.detach().reshape(-1, self.columns).to(self.sum.device, self.sum.dtype)
        self.sum.addmm_(x.T, x)
        self.count += x.shape[0]

    def merge(self, other: Hessian) -> Hessian:
        """Add OTHER's tokens to these (in place); returns self."""
        if other.columns != self.columns:
            raise UsageError(f"cannot merge a Hessian of {other.columns} columns into one of {self.columns}")
        self.sum += other.sum.to(self.sum.device, self.sum.dtype)
        self.count += other.count.to(self.count.device)
        return self

    @property
    def tokens(self) -> int:
        return int(self.count)

    def matrix(self):
        """The averaged H (zero when no token was added); no host sync on CUDA."""
        return self.sum * 2 / self.count.clamp(min=1)


@dataclass
class GptqResult:
    parts: dict            # the stored tensors, as Format.quantize gives them (on the weight's device)
    weight: object         # the dequantized weight, float32 [rows, columns]
    damp: float            # the dampening used, as a fraction of mean(diag(H))
    fallback: str | None = None   # why the weight was rounded to nearest instead, or None
    dead_columns: int = 0  # inputs that were zero on every calibration token


def output_error(weight, quantized, hessian) -> float:
    """trace((W - Q) H (W - Q)^T): the squared output error on the calibration inputs (times 2/n)."""
    d = weight.double() - quantized.double()
    return float(((d @ hessian.double().to(d.device)) * d).sum())


def gptq(weight, hessian, fmt: Format, *, damp: float = 0.01, act_order: bool = False, block_size: int = 128,
         search: bool = True, name: str = "weight") -> GptqResult:
    """WEIGHT [rows, columns] quantized to FMT (an integer format) by GPTQ with HESSIAN [columns,
    columns] (`Hessian.matrix()`), on the weight's device, in float32 (float64 for a float64
    Hessian). DAMP: the fraction of mean(diag(H)) added to the diagonal. ACT_ORDER: columns in
    descending diag(H) order, on static groups (see the module docstring). BLOCK_SIZE: columns per
    lazy batch update (speed only). SEARCH: the clipping search of `int_grid` for each group's grid
    (keep it on: without it, int2 without act_order can lose even to round-to-nearest, as the
    compensated weights widen the ranges of later groups). NAME is used in messages.

    Rows are independent: weights that share a Hessian (an expert's gate and up) can be stacked
    and quantized in one call, with one factorization. Raises UsageError for a format other than
    the integers, mismatched shapes, or a weight round-to-nearest cannot hold either."""
    import torch

    if fmt.kind != "int":
        method = "a bitsandbytes format" if fmt.kind in ("nf4", "fp4", "bnb8") else "not an integer format"
        raise UsageError(f"GPTQ quantizes the integer formats int2/3/4/8; {fmt.id} is {method}: use --method rtn")
    fmt.check(name, tuple(weight.shape))
    check_finite(weight, name)
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise UsageError(f"{name}: a weight of {cols} columns needs a [{cols}, {cols}] Hessian, "
                         f"not {list(hessian.shape)}")
    if damp < 0 or block_size < 1:
        raise UsageError(f"{name}: GPTQ needs damp >= 0 and block_size >= 1 (given {damp}, {block_size})")

    # float32 math; float64 when the Hessian is float64 (the tests compare with a float64 reference)
    dtype = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.detach().to(W.device, dtype).clone()
    if not bool(torch.isfinite(H).all()):
        return _fallback(weight, fmt, damp, name, "the Hessian is not finite")
    diag = H.diagonal()
    dead = diag == 0
    dead_columns = int(dead.sum())
    if dead_columns == cols:
        return _fallback(weight, fmt, damp, name, "the Hessian is zero (no calibration signal)")
    diag[dead] = 1.0   # an input that is always zero: its weights do not matter, keep H invertible
    W[:, dead] = 0.0

    perm = None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        H = H[perm][:, perm]

    used = damp
    U = _inverse_factor(H, damp)
    for _ in range(DAMP_RETRIES if damp > 0 else 0):
        if U is not None:
            break
        log.info("%s: the Hessian is singular at dampening %g; retrying with %g", name, used, used * 10)
        used *= 10
        U = _inverse_factor(H, used)
    if U is None:
        return _fallback(weight, fmt, used, name, f"the Hessian is singular after dampening {used:g}",
                         dead_columns)
    try:
        codes, Q, scale, zero = _quantize_columns(W, U, fmt, perm, block_size, search)
    except UsageError:   # error propagation drove a group past float16 scales: not this weight's fault
        return _fallback(weight, fmt, used, name, "GPTQ's updates grew too large for float16 scales",
                         dead_columns)
    if not bool(torch.isfinite(Q).all()):
        return _fallback(weight, fmt, used, name, "GPTQ's result is not finite", dead_columns)
    if dead_columns:
        log.debug("%s: %d of %d inputs are zero on every calibration token", name, dead_columns, cols)
    parts = int_parts(codes.reshape(rows, cols // fmt.block, fmt.block), scale, zero, fmt)
    return GptqResult(parts, Q.float(), used, None, dead_columns)


def _inverse_factor(H, damp: float):
    """The upper Cholesky factor of (H + damp * mean(diag(H)) I)^-1, or None if it does not exist."""
    import torch

    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if int(info):
        return None
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) or not bool(torch.isfinite(U).all()):
        return None
    return U


def _quantize_columns(W, U, fmt: Format, perm, block_size: int, search: bool):
    """GPTQ's loop. W [rows, cols] (float32 or float64), U the upper factor of H^-1 (permuted when
    PERM is given). Returns (codes, dequantized weight, scale, zero), in the original column order.
    The loop runs on W transposed, so that a column is a contiguous row."""
    import torch

    rows, cols = W.shape
    G, groups, top = fmt.block, cols // fmt.block, (1 << fmt.bits) - 1
    scale = torch.empty(rows, groups, dtype=getattr(torch, TORCH_NAMES[fmt.scale_dtype]), device=W.device)
    zero = torch.empty(rows, groups, dtype=W.dtype, device=W.device)
    if perm is not None:   # static groups: every grid from the original weights, then the columns permuted
        scale[:], zero[:] = int_grid(W.reshape(rows, groups, G), fmt, search=search)
        W = W[:, perm]
        group_of = (perm // G).tolist()
        grid = (scale.T.to(W.dtype), zero.T)   # [groups, rows]
    Wt = W.T.contiguous()   # [cols, rows]
    Qt = torch.empty_like(Wt)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = Wt[i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if perm is None:
                if j % G == 0:   # a group starts: its grid from its columns as updated so far
                    g = j // G
                    scale[:, g], zero[:, g] = _grid_now(Wt, W1, Err1, U, i1, i, G, fmt, search)
                    s, z = scale[:, g].to(W.dtype), zero[:, g]
            else:
                s, z = grid[0][group_of[j]], grid[1][group_of[j]]
            w = W1[i]
            q = torch.div(w, s).round_().add_(z).clamp_(0, top).sub_(z).mul_(s)   # int_round, one column
            Qt[j] = q
            err = (w - q).div_(U1[i, i])
            W1[i:].addr_(U1[i, i:], err, alpha=-1)   # the rounding error, onto the block's later columns
            Err1[i] = err
        Wt[i2:].sub_(U[i1:i2, i2:].T @ Err1)   # the block's errors, onto the columns after it at once
    Q = Qt.T
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    Q = Q.contiguous()
    # Q lies on the grid, so its codes come back exactly: (code - zero) * scale / scale
    codes = int_codes(Q.reshape(rows, groups, G), scale, zero, fmt).reshape(rows, cols)
    return codes, Q, scale, zero


def _grid_now(Wt, W1, Err1, U, i1: int, i: int, G: int, fmt: Format, search: bool):
    """The grid of the group starting at column i1 + i, on its weights as updated by every column
    rounded so far: inside the block W1 has them; past the block Wt still lacks this block's
    errors. (All transposed: [columns, rows].)"""
    import torch

    i2 = i1 + W1.shape[0]
    end = i1 + i + G
    now = W1[i:min(end, i2) - i1]
    if end > i2:
        now = torch.cat([now, Wt[i2:end] - U[i1:i1 + i, i2:end].T @ Err1[:i]])
    scale, zero = int_grid(now.T.unsqueeze(1), fmt, search=search)
    return scale[:, 0], zero[:, 0]


def _fallback(weight, fmt: Format, damp: float, name: str, reason: str, dead_columns: int = 0) -> GptqResult:
    """Round to nearest instead, saying why."""
    import torch

    parts = fmt.quantize(weight, name)   # raises first if the weight itself cannot be quantized
    log.warning("%s: %s; rounded to nearest instead of GPTQ", name, reason)
    return GptqResult(parts, fmt.dequantize(parts, tuple(weight.shape), torch.float32), damp, reason, dead_columns)
