"""Checkpoint sources (local folder, single file, .bin, hub id) behind one lazy abstraction."""

from __future__ import annotations

from pathlib import Path

from moetool.checkpoint.checkpoint import BYTES_READ, Checkpoint, Shard, TensorRef, open_local
from moetool.errors import CheckpointFormatError, SourceNotFoundError, UsageError

__all__ = ["BYTES_READ", "Checkpoint", "Shard", "TensorRef", "open_checkpoint"]


BUILTIN_MODELS = ("tiny-moe", "tiny-dense")
DEFAULT_MODEL = "builtin:tiny-moe"


def builtin_model_path(name: str) -> Path:
    """The folder of a built-in model (``builtin:tiny-moe``, ``builtin:tiny-dense``)."""
    from importlib.resources import files

    short = name.removeprefix("builtin:")
    if short not in BUILTIN_MODELS:
        raise SourceNotFoundError(f"{name}: no such built-in model (built-in: "
                                  f"{', '.join('builtin:' + m for m in BUILTIN_MODELS)})")
    path = Path(str(files("moetool.data").joinpath("models", short)))
    if not (path / "config.json").exists():
        raise SourceNotFoundError(f"{name}: the built-in model files are missing from this installation",
                                  hint="rebuild them with python scripts/train_builtin.py")
    return path


def open_checkpoint(spec: str | Path, *, headers_only: bool = False) -> Checkpoint:
    """Open a checkpoint from a folder, a .safetensors/.bin/.gguf file (or a GGUF split set or the
    folder holding it), a hub id ``org/name[@rev]`` or a built-in model ``builtin:tiny-moe`` /
    ``builtin:tiny-dense``.

    Args:
        spec: the path, hub id or built-in name.
        headers_only: for hub ids, read only safetensors headers remotely (no download).
    """
    if isinstance(spec, str) and spec.startswith("builtin:"):
        return open_local(builtin_model_path(spec), source=spec)
    if str(spec) == "":   # Path("") is the current folder
        raise UsageError("no checkpoint given (an empty path)")
    path = Path(spec).expanduser()
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise CheckpointFormatError(f"{path}: neither a file nor a folder (a device or a pipe?)")
    if path.exists():
        from moetool.checkpoint.gguf import is_gguf_source, open_gguf

        if is_gguf_source(path):
            return open_gguf(path, source=str(spec))
        return open_local(path, source=str(spec))
    from moetool.checkpoint.hub import looks_like_hub_id, open_hub

    if isinstance(spec, str) and looks_like_hub_id(spec) and not spec.startswith((".", "/")):
        return open_hub(spec, headers_only=headers_only)
    raise SourceNotFoundError(f"{spec}: no such file or folder, and not a hub id (org/name[@revision])")
