"""Checkpoint sources (local folder, single file, .bin, hub id) behind one lazy abstraction."""

from __future__ import annotations

from pathlib import Path

from moetool.checkpoint.checkpoint import Checkpoint, Shard, TensorRef, open_local
from moetool.errors import SourceNotFoundError

__all__ = ["Checkpoint", "Shard", "TensorRef", "open_checkpoint"]


def open_checkpoint(spec: str | Path, *, headers_only: bool = False) -> Checkpoint:
    """Open a checkpoint from a folder, a .safetensors/.bin file or a hub id ``org/name[@rev]``.

    Args:
        spec: the path or hub id.
        headers_only: for hub ids, read only safetensors headers remotely (no download).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return open_local(path, source=str(spec))
    from moetool.checkpoint.hub import looks_like_hub_id, open_hub

    if isinstance(spec, str) and looks_like_hub_id(spec) and not spec.startswith((".", "/")):
        return open_hub(spec, headers_only=headers_only)
    raise SourceNotFoundError(f"{spec}: no such file or folder, and not a hub id (org/name[@revision])")
