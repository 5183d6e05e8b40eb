"""Hugging Face Hub sources: `org/name[@revision]`.

Header-only opening (for inspect) reads the safetensors headers over HTTP range
requests through ``HfApi.get_safetensors_metadata``: no weights are downloaded.
Full opening downloads (or reuses) a snapshot in huggingface_hub's cache.
HF_HUB_OFFLINE=1 is honoured: only the local cache is used.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from moetool.checkpoint.checkpoint import (
    BIN_INDEX,
    SAFETENSORS_INDEX,
    Checkpoint,
    Shard,
    TensorRef,
    open_local,
    read_config,
    read_index,
    with_side_quantization,
)
from moetool.checkpoint.header import parse_header
from moetool.errors import CheckpointFormatError, SourceNotFoundError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".gguf")   # names that are files, not repos
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "*.txt"]


def looks_like_hub_id(spec: str) -> bool:
    """org/name[@revision]; a name ending like a weights file is taken for a missing path."""
    return bool(HUB_ID.match(spec)) and not spec.split("@")[0].endswith(FILE_SUFFIXES)


def split_hub_id(spec: str) -> tuple[str, str | None]:
    repo, _, revision = spec.partition("@")
    return repo, revision or None


def open_hub(spec: str, *, headers_only: bool) -> Checkpoint:
    """Open a hub repository, from the local cache when possible."""
    from huggingface_hub import constants

    repo, revision = split_hub_id(spec)
    cached = _cached_snapshot(repo, revision)
    if cached is not None:
        ckpt = open_local(cached, source=spec)
        ckpt.kind = "hub"
        return ckpt
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise SourceNotFoundError(f"{spec}: not (or not wholly) in the local Hugging Face cache and "
                                  "HF_HUB_OFFLINE is set",
                                  hint="unset HF_HUB_OFFLINE or download the model first")
    if headers_only:
        return _open_remote_headers(repo, revision, spec)
    return _download(repo, revision, spec)


def _hub_errors():
    from huggingface_hub import errors

    return (errors.RepositoryNotFoundError, errors.RevisionNotFoundError, errors.GatedRepoError,
            errors.EntryNotFoundError, errors.LocalEntryNotFoundError, errors.HfHubHTTPError)


def _cached_snapshot(repo: str, revision: str | None) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except Exception:  # not cached (the exact error type varies by hub version)
        return None
    if not (path / "config.json").exists():
        return None
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):   # the index open_local would use
        if (path / index_name).exists():
            # a download cut short leaves some shards cached: complete only with every one
            try:
                files = read_index(path / index_name)[1]
            except CheckpointFormatError:
                return path   # a bad index: open_local says what is wrong with it
            return path if all((path / f).is_file() for f in files) else None
    has_weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return path if has_weights else None


def _download(repo: str, revision: str | None, spec: str) -> Checkpoint:
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(repo, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo, revision=revision,
                                          allow_patterns=SNAPSHOT_PATTERNS + ["pytorch_model*.bin"]))
    except _hub_errors() as exc:
        raise SourceNotFoundError(f"{spec}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    ckpt = open_local(path, source=spec)
    ckpt.kind = "hub"
    return ckpt


def _open_remote_headers(repo: str, revision: str | None, spec: str) -> Checkpoint:
    from huggingface_hub import HfApi, hf_hub_download

    try:
        config = read_config(Path(hf_hub_download(repo, "config.json", revision=revision)))
        config = with_side_quantization(config, lambda name: _side_file(repo, revision, name))
        meta = HfApi().get_safetensors_metadata(repo, revision=revision)
    except _hub_errors() as exc:
        raise SourceNotFoundError(f"{spec}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # NotASafetensorsRepoError, SafetensorsParsingError, network errors
        raise CheckpointFormatError(f"{spec}: cannot read safetensors headers from the hub "
                                    f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return checkpoint_from_remote_metadata(meta, config, spec)


def _side_file(repo: str, revision: str | None, name: str) -> dict | None:
    """One of SIDE_QUANTIZATION's files from the repository, or None where it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return read_config(Path(hf_hub_download(repo, name, revision=revision)))
    except EntryNotFoundError as exc:   # (the hub's 404: RemoteEntryNotFoundError, a subclass)
        if isinstance(exc, LocalEntryNotFoundError):   # (a network failure, not a missing file: said, not ignored)
            raise
        return None


def checkpoint_from_remote_metadata(meta, config: dict, spec: str) -> Checkpoint:
    """Build a header-only Checkpoint from huggingface_hub's SafetensorsRepoMetadata."""
    tensors: dict[str, TensorRef] = {}
    shards: list[Shard] = []
    for file_name, file_meta in sorted(meta.files_metadata.items()):
        shard = Shard(file_name, None, "remote", None, dict(file_meta.metadata or {}))
        shards.append(shard)
        raw = {name: {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
               for name, info in file_meta.tensors.items()}
        infos, _ = parse_header(json.dumps(raw).encode(), where=f"{spec}/{file_name}", data_start=0,
                                file_size=None)
        for name, dtype, shape, start, end in infos:
            if name in tensors:   # as a local checkpoint is refused (open_local)
                raise CheckpointFormatError(f"{spec}/{file_name}: tensor {name!r} is also stored in "
                                            f"{tensors[name].shard.name}")
            tensors[name] = TensorRef(name, dtype, shape, shard, start, end)
    return Checkpoint(spec, "hub-headers", None, config, tensors, shards, notes=[])
