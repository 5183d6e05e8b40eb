"""Calibration input: text files, .jsonl, or token ids, packed into sequences of --seq-len tokens."""

from __future__ import annotations

import json
from pathlib import Path

from moetool.errors import MoetoolError, UsageError


class DataError(MoetoolError):
    """The calibration data is missing, empty or unusable."""

    exit_code = 11


BUILTIN = {"builtin": "train", "builtin:train": "train", "builtin:heldout": "heldout"}


def builtin_texts(split: str) -> list[str]:
    """The built-in sample corpus (Shakespeare, public domain; see moetool/data/corpus/SOURCES.md)."""
    import gzip
    from importlib.resources import files

    raw = files("moetool.data").joinpath("corpus", f"{split}.txt.gz").read_bytes()
    return [gzip.decompress(raw).decode("utf-8")]


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Documents from a .txt file (one document), a .jsonl file (FIELD of each line), a folder of them,
    or the built-in corpus ("builtin", "builtin:train", "builtin:heldout")."""
    if str(path) in BUILTIN:
        return builtin_texts(BUILTIN[str(path)])
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_dir():
        texts = []
        for child in sorted(path.iterdir()):
            if child.suffix in (".txt", ".jsonl", ".md"):
                texts.extend(read_texts(child, field))
        return texts
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    if path.suffix != ".jsonl":
        return [raw] if raw.strip() else []
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)[field]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: not a JSON object with a {field!r} field") from None
        if isinstance(value, str) and value.strip():
            texts.append(value)
    return texts


def read_token_ids(path: Path) -> list[int]:
    """Token ids from a JSON list (or list of lists) or whitespace-separated integers."""
    try:
        raw = path.read_text(encoding="utf-8")
        data = json.loads(raw) if raw.lstrip().startswith("[") else [int(t) for t in raw.split()]
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not a token-id file (a JSON list or integers separated by spaces): {exc}") \
            from None
    flat = [t for seq in data for t in seq] if data and isinstance(data[0], list) else data
    if not all(isinstance(t, int) and t >= 0 for t in flat):
        raise DataError(f"{path}: token ids must be non-negative integers")
    return flat


def tokenize(texts: list[str], tokenizer_path: Path) -> list[int]:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as exc:   # no tokenizer files, or unreadable ones
        raise DataError(f"{tokenizer_path}: no usable tokenizer ({type(exc).__name__})",
                        hint="give token ids with --token-ids instead of text") from None
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=True)["input_ids"])
    return ids


def pack(ids: list[int], *, seq_len: int, max_tokens: int | None, vocab_size: int | None,
         max_positions: int | None):
    """A [N, seq_len] LongTensor of consecutive tokens (the remainder is dropped unless it is all)."""
    import torch

    if seq_len <= 0:
        raise UsageError("--seq-len must be positive")
    if max_positions and seq_len > max_positions:
        raise UsageError(f"--seq-len {seq_len} is beyond the model's maximum of {max_positions} positions")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not ids:
        raise DataError("the calibration data holds no tokens")
    if vocab_size and max(ids) >= vocab_size:
        raise DataError(f"token id {max(ids)} is outside the model's vocabulary of {vocab_size}")
    count = max(1, len(ids) // seq_len)
    length = seq_len if len(ids) >= seq_len else len(ids)
    return torch.tensor(ids[: count * length], dtype=torch.long).reshape(count, length)
