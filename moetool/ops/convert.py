"""`moetool convert`: dtype, expert layout, shard size, .bin -> safetensors, dequantization.

The plan (moetool.layout.plan) lists every output tensor's pieces, read from headers only; the
writer streams them into shards, atomically, and --verify reads them back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moetool import __version__
from moetool.checkpoint import Checkpoint
from moetool.checkpoint.pieces import CHUNK_BYTES
from moetool.checkpoint.writer import RawPiece, refuse_inside_source, tensor_bytes, write_checkpoint
from moetool.layout.plan import PlanOptions, TensorPlan, plan_tensors

plan_convert = plan_tensors   # the convert command's name for it (`moetool convert --dry-run`)


@dataclass
class ConvertOptions(PlanOptions):
    command: str = ""                   # recorded in the model card


@dataclass
class ConvertReport:
    out: str
    plan: dict[str, Any]
    seconds: float
    bytes_written: int
    verified: bool | None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "moetool_version": __version__, "out": self.out, "plan": self.plan,
                "seconds": round(self.seconds, 3), "bytes_written": self.bytes_written, "verified": self.verified}


# ---------------------------------------------------------------- execution

def convert(ckpt: Checkpoint, out: Path, options: ConvertOptions, *, force: bool = False, verify: bool = False,
            progress=None) -> ConvertReport:
    """Convert CKPT into OUT (atomically). PROGRESS(bytes) is called as data is written."""
    out = Path(out)
    refuse_inside_source(out, ckpt)
    plan = plan_tensors(ckpt, options)
    start = time.perf_counter()
    write_checkpoint(out, plan.shards, op="convert", config=plan.config, files=plan.files,
                     readme=_model_card(plan, options, out), force=force, progress=progress,
                     check=(lambda tmp: verify_output(tmp, plan)) if verify else None)
    return ConvertReport(str(out), plan.summary(), time.perf_counter() - start, plan.output_bytes,
                         True if verify else None)


def verify_output(folder: Path, plan: TensorPlan) -> None:
    """Re-read every output tensor: header as planned, bytes equal to the source's (raw pieces)
    or to the recomputed cast / transform (computed pieces)."""
    import os

    from moetool.checkpoint import open_checkpoint
    from moetool.errors import MoetoolError

    with open_checkpoint(folder) as written:
        for tensor in plan.tensors:
            ref = written.tensors.get(tensor.name)
            if ref is None or ref.dtype != tensor.dtype or ref.shape != tensor.shape:
                raise MoetoolError(f"verify: {tensor.name} was not written as planned")
            fd = os.open(ref.shard.path, os.O_RDONLY)
            try:
                offset = ref.start
                for piece in tensor.pieces:
                    for pos in range(0, piece.length, CHUNK_BYTES):
                        length = min(CHUNK_BYTES, piece.length - pos)
                        got = os.pread(fd, length, offset + pos)
                        if isinstance(piece, RawPiece):
                            with open(piece.path, "rb") as src:
                                src.seek(piece.start + pos)
                                want = src.read(length)
                        else:
                            want = bytes(tensor_bytes(piece.compute()))[pos:pos + length]
                        if got != want:
                            raise MoetoolError(f"verify: {tensor.name} differs from the source at byte {pos}")
                    offset += piece.length
            finally:
                os.close(fd)


def _model_card(plan: TensorPlan, options: ConvertOptions, out: Path) -> str:
    actions = ", ".join(f"{k}: {v}" for k, v in sorted(plan.actions.items())) or "copied"
    notes = "".join(f"- {n}\n" for n in plan.notes)
    return (f"---\nbase_model: {plan.source}\ntags:\n- moetool\n- mixture-of-experts\n---\n\n"
            f"# {out.name}\n\nConverted from `{plan.source}` by moetool {__version__}:\n\n"
            f"```\n{options.command or 'moetool convert'}\n```\n\n"
            f"- family: {plan.family or 'unknown'}; expert layout: {plan.source_layout} -> {plan.target_layout}\n"
            f"- {len(plan.tensors)} tensors in {len(plan.shards)} shard(s), {plan.output_bytes:,} bytes\n"
            f"- {actions}\n{notes}")
