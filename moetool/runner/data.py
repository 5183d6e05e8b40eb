"""Calibration input: text, .jsonl, parquet, Arrow, saved Hugging Face datasets or token ids, tokenized lazily
up to --max-tokens and packed into sequences of --seq-len tokens."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moetool.checkpoint.gguf_view import VIEW_KIND
from moetool.errors import MoetoolError, UsageError

log = logging.getLogger(__name__)


class DataError(MoetoolError):
    """The calibration data is missing, empty or unusable."""

    exit_code = 11


UTF8 = "utf-8-sig"   # UTF-8, a leading byte-order mark (Windows exports) dropped
BUILTIN = {"builtin": "train", "builtin:train": "train", "builtin:heldout": "heldout"}
BLOCK = 64 * 1024                       # a text file larger than this is read and tokenized in blocks of about this
TEXT_SUFFIXES = (".txt", ".md")
ARROW_SUFFIXES = (".parquet", ".arrow")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", *ARROW_SUFFIXES)
BATCH_ROWS = 256                        # parquet rows read at a time
NO_TOKENIZER_HINT = "give token ids with --token-ids instead of text"


def calibration_ids(*, data: Path | str | None, token_ids: Path | None, field: str = "text",
                    max_tokens: int | None, tokenizer_path: Path | None, chat_template: str | None = None,
                    default: str = "builtin") -> np.ndarray:
    """The calibration data's token ids (int64, 1-D), at most MAX_TOKENS of them.

    Documents are read and tokenized one by one, and reading stops as soon as MAX_TOKENS ids exist: later
    documents are never read or tokenized, and the last one's ids are cut.

    Args:
        data: what to read (None: DEFAULT; "builtin", "builtin:train" or "builtin:heldout": the built-in corpus):
            - a .txt or .md file (any file whose ending is not listed here, too) is one document, tokenized as
              ``tokenizer(text, add_special_tokens=True)``; a file larger than 64 KiB is read and tokenized in blocks
              of about 64 KiB split at line boundaries, with the special tokens (BOS, EOS) only at the document's
              start and end, so it never sits in memory whole;
            - a .jsonl file: FIELD of each line, read line by line;
            - a .parquet or .arrow file (Arrow IPC file or stream format): column FIELD, read in record batches
              (needs pyarrow, ``pip install 'moetool[data]'``);
            - a folder saved by ``datasets.Dataset.save_to_disk`` (``state.json``): its arrow files in the order
              state.json lists; a ``DatasetDict`` folder (``dataset_dict.json``): its ``train`` split, else its
              first (logged);
            - any other folder: its own files of the kinds above, sorted by name; subfolders and hidden files are
              not read (so train/ and test/ subfolders are never mixed).
            Empty and whitespace-only texts are skipped (and null or non-text values of FIELD).
        token_ids: a token-id file (a JSON list or list of lists, or whitespace-separated integers) instead of
            DATA; read block by block only until MAX_TOKENS ids exist: what follows them is never read or checked.
        field: the field (jsonl) or column (parquet, arrow, datasets) of each record that holds its text or,
            with CHAT_TEMPLATE, its list of chat messages.
        max_tokens: at most this many ids (None: all).
        tokenizer_path: the folder of the tokenizer that tokenizes text (read with ``AutoTokenizer``).
        chat_template: None: FIELD holds text. Otherwise FIELD holds a list of messages
            (``[{"role": ..., "content": ...}, ...]``), rendered with ``tokenizer.apply_chat_template(messages,
            tokenize=False)`` and tokenized without adding special tokens again: "model" uses the tokenizer's
            own template, anything else is the path of a Jinja template file to use instead.
        default: what DATA None means ("builtin" for calibration, "builtin:heldout" for evaluation).

    Raises:
        DataError: a missing, unreadable or empty input, a bad record, no usable tokenizer, bad token ids.
        UsageError: both DATA and TOKEN_IDS, or MAX_TOKENS below 1.
    """
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be positive, not {max_tokens}")
    if any(path is not None and str(path) == "" for path in (data, token_ids)):
        raise UsageError("--data / --token-ids: an empty path (it would read the current folder)")
    if token_ids is not None:
        if data is not None:
            raise UsageError("give either --data or --token-ids, not both")
        ids = _read_token_ids(Path(token_ids), max_tokens)
        if ids.size == 0:
            raise DataError(f"{token_ids}: holds no token ids")
        return ids
    source = str(data) if data is not None else default
    encoder = _Encoder(tokenizer_path, chat_template)
    parts: list[np.ndarray] = []
    count = 0
    records = _records(source, field, chat=chat_template is not None)
    texts = False
    try:
        for where, value in records:
            texts = texts or bool(value)
            for piece in encoder.encode(where, value):
                parts.append(np.asarray(piece, dtype=np.int64))
                count += len(piece)
                if max_tokens is not None and count >= max_tokens:
                    return np.concatenate(parts)[:max_tokens]
    finally:
        records.close()
    if count == 0 and texts:   # transformers builds an empty tokenizer from a config without vocabulary files
        raise DataError(f"{tokenizer_path}: its tokenizer turns the text into no tokens (no vocabulary files?)",
                        hint=NO_TOKENIZER_HINT)
    if count == 0:
        raise DataError(f"{source}: holds no text")
    return np.concatenate(parts)


def builtin_texts(split: str) -> list[str]:
    """The built-in sample corpus (Shakespeare, public domain; see moetool/data/corpus/SOURCES.md)."""
    import gzip
    from importlib.resources import files

    raw = files("moetool.data").joinpath("corpus", f"{split}.txt.gz").read_bytes()
    return [gzip.decompress(raw).decode("utf-8")]


def read_texts(path: Path, field: str = "text") -> list[str]:
    """Documents of PATH, read whole (the formats of `calibration_ids`, without chat records)."""
    return [value.read() if isinstance(value, _LargeText) else value
            for _, value in _records(str(path), field, chat=False)]


def read_token_ids(path: Path, max_tokens: int | None = None) -> list[int]:
    """Token ids from a JSON list (or list of lists) or whitespace-separated integers, at most MAX_TOKENS of
    them (None: all): the file is read block by block until MAX_TOKENS exist, and what follows is never read
    or checked."""
    return _read_token_ids(path, max_tokens).tolist()


def _read_token_ids(path: Path, max_tokens: int | None) -> np.ndarray:
    """`read_token_ids` as an int64 array, gathered from arrays of a block's ids (never a list of them all)."""
    if not path.is_file():
        raise DataError(f"{path}: {'not a regular file' if path.exists() else 'no such token-id file'}")
    parts: list[np.ndarray] = []
    count = 0
    try:
        with path.open(encoding=UTF8) as file:
            for part in _TokenIds(path, file).arrays():
                parts.append(part)
                count += part.size
                if max_tokens is not None and count >= max_tokens:
                    break
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a token-id file ({TOKEN_ID_FORMATS}): {exc}") from None
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))[:max_tokens]


TOKEN_ID_FORMATS = "a JSON list or integers separated by spaces"
JSON_SPACE = " \t\n\r"
_LAST_SPACE = re.compile(r"\s\S*\Z")
LONGEST_ID = 64          # characters: anything longer is not a token id (a 64-bit integer has 19 digits)


class _TokenIds:
    """The ids of an open token-id file as int64 arrays, one per block of text read: whitespace-separated
    integers (each block cut after its last whitespace), or a JSON list of integers or of lists of them, whose
    brackets and commas are followed here and whose runs of integers (a block's, up to its last comma) are
    parsed by the JSON parser. Nothing deeper than a list of lists is parsed, so no nesting exhausts recursion."""

    def __init__(self, path: Path, file):
        self.path, self.file = path, file
        self.buffer = ""
        self.eof = False

    def fail(self, why: str) -> DataError:
        return DataError(f"{self.path}: not a token-id file ({TOKEN_ID_FORMATS}): {why}")

    def mix(self) -> DataError:
        return DataError(f"{self.path}: a JSON list of token ids, or of lists of them, not a mix of both")

    def more(self) -> bool:
        """Append the next block of the file to the buffer; False at the end of the file."""
        block = "" if self.eof else self.file.read(BLOCK)
        self.eof = not block
        self.buffer += block
        return bool(block)

    def ids(self, values: list) -> np.ndarray:
        if not all(type(t) is int and 0 <= t < 2**63 for t in values):
            raise DataError(f"{self.path}: token ids must be non-negative integers")
        return np.asarray(values, dtype=np.int64)

    def arrays(self) -> Iterator[np.ndarray]:
        while True:
            self.buffer = self.buffer.lstrip()
            if self.buffer or not self.more():
                break
        if self.buffer.startswith("["):
            self.buffer = self.buffer[1:]
            yield from self._json()
        else:
            yield from self._words()

    def _words(self) -> Iterator[np.ndarray]:
        while True:   # the buffer holds a block: its words but the last (which may go on in the next block)
            tail = None if self.eof else _LAST_SPACE.search(self.buffer)
            cut = len(self.buffer) if self.eof else tail.start() + 1 if tail else 0
            words, self.buffer = self.buffer[:cut].split(), self.buffer[cut:]
            if len(self.buffer) > LONGEST_ID:
                raise self.fail(f"{self.buffer[:20]!r}... is not an integer")
            try:
                values = [int(word) for word in words]
            except ValueError as exc:
                raise self.fail(str(exc)) from None
            if values:
                yield self.ids(values)
            if self.eof:
                return
            self.more()

    def _next(self) -> str:
        """The next character that is not JSON whitespace, left in the buffer ("" at the end of the file)."""
        while True:
            self.buffer = self.buffer.lstrip(JSON_SPACE)
            if self.buffer or not self.more():
                return self.buffer[:1]

    def _json(self) -> Iterator[np.ndarray]:
        """The ids of the JSON list whose "[" was read, then nothing but whitespace to the end of the file."""
        if self._next() == "[":                  # a list of lists of ids
            while True:
                self.buffer = self.buffer[1:]
                yield from self._run(nested=True)
                after = self._next()
                self.buffer = self.buffer[1:]
                if after == "]":
                    break
                if after != ",":
                    raise self.fail("the JSON list does not end") if not after else self.mix()
                if self._next() != "[":
                    raise self.mix()
        else:
            yield from self._run(nested=False)
        if self._next():
            raise self.fail("more text after the JSON list")

    def _run(self, nested: bool) -> Iterator[np.ndarray]:
        """The ids of a list of integers whose "[" was read, up to its "]" (read too), a block at a time."""
        values = 0
        while True:
            close = self.buffer.find("]")
            end = close if close >= 0 else self.buffer.rfind(",")
            run = self.buffer[:end] if end >= 0 else self.buffer
            if "[" in run:
                raise self.fail("lists nested deeper than a list of lists of token ids") if nested else self.mix()
            if end < 0:                                # not a whole value yet
                value = run.strip(JSON_SPACE)
                if len(value) > LONGEST_ID:
                    raise self.fail(f"{value[:20]!r}... is not a token id")
                if len(run) > len(value) + 2:   # whitespace runs are kept short: the buffer stays small
                    self.buffer = run[:len(run) - len(run.lstrip(JSON_SPACE))][:1] + value + \
                        (" " if run[-1:] in JSON_SPACE and value else "")
                if not self.more():
                    raise self.fail("the JSON list does not end")
                continue
            self.buffer = self.buffer[end + 1:]
            if not run.strip(JSON_SPACE):
                if end == close and values == 0:
                    return                        # an empty list
                raise self.fail("a comma without a value")
            try:
                parsed = json.loads(f"[{run}]")
            except (ValueError, RecursionError) as exc:
                raise self.fail(_line(exc)) from None
            values += len(parsed)
            yield self.ids(parsed)
            if end == close:
                return


def tokenize(texts: list[str], tokenizer_path: Path) -> list[int]:
    """The ids of TEXTS, each tokenized with its special tokens, one after the other."""
    encoder = _Encoder(tokenizer_path, None)
    return [t for text in texts for piece in encoder.encode("", text) for t in piece]


def pack(ids, *, seq_len: int, max_tokens: int | None, vocab_size: int | None, max_positions: int | None):
    """A [N, seq_len] LongTensor of consecutive tokens of IDS (a list or 1-D array; the remainder is dropped
    unless it is all)."""
    import torch

    if seq_len <= 0:
        raise UsageError("--seq-len must be positive")
    if max_positions and seq_len > max_positions:
        raise UsageError(f"--seq-len {seq_len} is beyond the model's maximum of {max_positions} positions")
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.size == 0:
        raise DataError("the calibration data holds no tokens")
    if vocab_size and int(ids.max()) >= vocab_size:
        raise DataError(f"token id {int(ids.max())} is outside the model's vocabulary of {vocab_size}")
    count = max(1, len(ids) // seq_len)
    length = seq_len if len(ids) >= seq_len else len(ids)
    return torch.tensor(ids[: count * length], dtype=torch.long).reshape(count, length)


# --- reading records -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _LargeText:
    """A text file too large to read whole: one document, read in blocks split at line boundaries."""

    path: Path

    def blocks(self) -> Iterator[str]:
        try:
            with self.path.open(encoding=UTF8) as file:
                parts: list[str] = []
                size = 0
                while line := file.readline(BLOCK):
                    parts.append(line)
                    size += len(line)
                    if size >= BLOCK:
                        text = "".join(parts)
                        # a line longer than a block: cut before a space, not inside a word
                        cut = len(text) if text.endswith("\n") else text.rfind(" ")
                        cut = cut if cut > 0 else len(text)
                        yield text[:cut]
                        parts = [text[cut:]] if cut < len(text) else []
                        size = len(text) - cut
                if parts:
                    yield "".join(parts)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.path}: cannot be read as UTF-8 text ({exc})") from None

    def read(self) -> str:
        return "".join(self.blocks())


def _records(source: str, field: str, chat: bool) -> Iterator[tuple[str, Any]]:
    """(where, value) of each document of SOURCE, lazily: value is a text, a `_LargeText` or (CHAT) a list of
    messages; where names the file and record, for errors."""
    if source in BUILTIN:
        if chat:
            raise DataError(f"{source}: the built-in corpus is plain text, not chat records",
                            hint="give chat records with --data, or no --chat-template")
        yield source, builtin_texts(BUILTIN[source])[0]
        return
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not path.is_dir():
        yield from _file_records(path, field, chat)
    elif (path / "dataset_dict.json").is_file():
        listing = path / "dataset_dict.json"
        splits = _json_file(listing, "a datasets DatasetDict file").get("splits") or []
        if not isinstance(splits, list) or not all(isinstance(split, str) for split in splits):
            raise DataError(f"{listing}: not a datasets DatasetDict file (its splits are not a list of names)")
        if not splits:
            raise DataError(f"{listing}: lists no splits")
        split = "train" if "train" in splits else splits[0]
        log.info("%s: a dataset with the splits %s; reading %r", path, ", ".join(splits), split)
        yield from _dataset_records(_inside(path, split, listing), field, chat)
    elif (path / "state.json").is_file():
        yield from _dataset_records(path, field, chat)
    else:
        children = sorted(child for child in path.iterdir()
                          if child.suffix.lower() in SUFFIXES and not child.name.startswith(".") and child.is_file())
        if not children:
            raise DataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder (subfolders are not read)")
        for child in children:
            yield from _file_records(child, field, chat)


def _json_file(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding=UTF8))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: not {what} ({exc})") from None
    except RecursionError:
        raise DataError(f"{path}: not {what} (JSON nested too deeply)") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: not {what} (not a JSON object)")
    return data


def _dataset_records(folder: Path, field: str, chat: bool) -> Iterator[tuple[str, Any]]:
    """The records of a folder written by `datasets.Dataset.save_to_disk`, in the order its state.json lists."""
    state = _json_file(folder / "state.json", "a datasets state file")
    try:
        names = [entry["filename"] for entry in state["_data_files"]]
        assert all(isinstance(name, str) for name in names)
    except (KeyError, TypeError, AssertionError):
        raise DataError(f"{folder / 'state.json'}: not a datasets state file (no list of _data_files)") from None
    files = [_inside(folder, name, folder / "state.json") for name in names]
    for file in files:
        if not file.is_file():
            raise DataError(f"{file}: no such file (listed in {folder / 'state.json'})")
        yield from _arrow_records(file, field, chat)


def _inside(folder: Path, name: str, listing: Path) -> Path:
    """FOLDER / NAME, where NAME, read from the file LISTING, must be a relative name of a file in
    FOLDER (no absolute path, no ".."): a saved dataset never names files elsewhere. (A file that is a
    symbolic link is read where it leads, as datasets does: hub-cache snapshots link to their blobs.)"""
    path = folder / name
    try:
        inside = bool(name) and "\0" not in name and not Path(name).is_absolute() \
            and ".." not in Path(name).parts and path.resolve() != folder.resolve()
    except (OSError, ValueError, RuntimeError):   # a symbolic-link loop
        inside = False
    if not inside:
        raise DataError(f"{listing}: names {name!r}, not a file inside {folder}; a saved dataset names its own "
                        "files only")
    return path


def _file_records(path: Path, field: str, chat: bool) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_records(path, field, chat)
    elif suffix in ARROW_SUFFIXES:
        yield from _arrow_records(path, field, chat)
    elif chat:
        raise DataError(f"{path}: plain text holds no chat records",
                        hint="chat records come from .jsonl, .parquet, .arrow files or saved datasets")
    elif path.stat().st_size > BLOCK:
        yield str(path), _LargeText(path)
    else:
        try:
            raw = path.read_text(encoding=UTF8)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
        if raw.strip():
            yield str(path), raw


def _jsonl_records(path: Path, field: str, chat: bool) -> Iterator[tuple[str, Any]]:
    try:
        with path.open(encoding=UTF8) as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if not isinstance(record, dict) or (field not in record and not chat):
                    raise DataError(f"{where}: not a JSON object with a {field!r} field")
                value = _value(record.get(field), where, field, chat)
                if value is not None:
                    yield where, value
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({exc})") from None


def _arrow_records(path: Path, field: str, chat: bool) -> Iterator[tuple[str, Any]]:
    """FIELD of each row of a parquet or Arrow IPC (file or stream format) file, read in record batches."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet and Arrow files needs pyarrow",
                        hint="pip install 'moetool[data]'") from None
    kind = "parquet" if path.suffix.lower() == ".parquet" else "Arrow IPC"
    try:
        with pa.memory_map(str(path)) as source:
            if kind == "parquet":
                parquet = pq.ParquetFile(source)
                schema = parquet.schema_arrow
                batches: Iterable = parquet.iter_batches(batch_size=BATCH_ROWS, columns=[field]) \
                    if field in schema.names else ()
            else:
                try:
                    reader = pa.ipc.open_file(source)
                    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
                except pa.ArrowInvalid:        # not the file format: the stream format (datasets writes it)
                    source.seek(0)
                    reader = pa.ipc.open_stream(source)
                    batches = reader
                schema = reader.schema
            if field not in schema.names:
                raise DataError(f"{path}: row 1: no {field!r} field (the columns are {', '.join(schema.names)})")
            kind_of = schema.field(field).type
            if not chat and not (pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)):
                raise DataError(f"{path}: column {field!r} holds {kind_of}, not text")
            row = 0
            for batch in batches:
                for value in batch.column(field).to_pylist():
                    row += 1
                    where = f"{path}: row {row}"
                    value = _value(value, where, field, chat)
                    if value is not None:
                        yield where, value
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot be read as {kind} data ({type(exc).__name__}: {_line(exc)})") from None


def _value(value: Any, where: str, field: str, chat: bool) -> Any:
    """A record's usable FIELD: a non-blank text, or (CHAT) a list of messages; None for a text record to skip."""
    if not chat:
        return value if isinstance(value, str) and value.strip() else None
    if value is None:
        raise DataError(f"{where}: no {field!r} field (a list of chat messages)")
    if not (isinstance(value, list) and value
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)):
        raise DataError(f"{where}: {field!r} is not a list of chat messages "
                        '([{"role": ..., "content": ...}, ...])')
    return value


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


# --- tokenizing ------------------------------------------------------------------------------------------------

def tokenizer_source(ckpt) -> Path | None:
    """Where CKPT's tokenizer is read from: its folder, or for a GGUF its (first) file, whose metadata
    holds the vocabulary that transformers' GGUF integration builds a tokenizer from."""
    if ckpt.kind in ("gguf", VIEW_KIND):
        return ckpt.shards[0].path
    return ckpt.root


def _load_tokenizer(path: Path | None):
    if path is None:
        raise DataError("no tokenizer to tokenize the text with", hint=NO_TOKENIZER_HINT)
    try:
        from transformers import AutoTokenizer

        if path.suffix == ".gguf":
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:   # no tokenizer files, or unreadable ones
        if path.suffix == ".gguf":   # transformers says which tokenizer model the file names
            raise DataError(f"{path}: no tokenizer transformers can build from its metadata ({_line(exc)})",
                            hint=NO_TOKENIZER_HINT) from None
        raise DataError(f"{path}: no usable tokenizer ({type(exc).__name__})", hint=NO_TOKENIZER_HINT) from None


class _Encoder:
    """Token ids of records: the tokenizer (and chat template) are loaded at the first record."""

    def __init__(self, tokenizer_path: Path | None, chat_template: str | None):
        self.tokenizer_path = tokenizer_path
        self.chat_template = chat_template

    @cached_property
    def tokenizer(self):
        return _load_tokenizer(self.tokenizer_path)

    @cached_property
    def template(self) -> str | None:
        """The template to give apply_chat_template (None: the tokenizer's own)."""
        if self.chat_template == "model":
            if not self.tokenizer.chat_template:
                raise DataError(f"{self.tokenizer_path}: the tokenizer has no chat template",
                                hint="give a Jinja template file with --chat-template FILE")
            return None
        try:
            return Path(self.chat_template).read_text(encoding=UTF8)
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{self.chat_template}: not a readable chat template file ({exc})") from None

    def encode(self, where: str, value: Any) -> Iterator[list[int]]:
        """The ids of one document, in one piece or (a large text file) one piece per block."""
        if isinstance(value, _LargeText):
            yield from self._blocks(value)
        elif isinstance(value, str):
            yield self.tokenizer(value, add_special_tokens=True)["input_ids"]
        else:
            template = self.template
            try:
                text = self.tokenizer.apply_chat_template(value, tokenize=False, chat_template=template)
            except Exception as exc:   # the template's own errors (raise_exception), undefined names, ...
                raise DataError(f"{where}: the chat template cannot render this record "
                                f"({type(exc).__name__}: {_line(exc)})") from None
            yield self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _blocks(self, value: _LargeText) -> Iterator[list[int]]:
        prefix, suffix = self._special_tokens()
        for number, block in enumerate(value.blocks()):
            if prefix is None:                  # special tokens not found around a probe: the tokenizer's own
                yield self.tokenizer(block, add_special_tokens=number == 0)["input_ids"]
            else:
                ids = self.tokenizer(block, add_special_tokens=False)["input_ids"]
                yield prefix + ids if number == 0 else ids
        if suffix:
            yield suffix

    def _special_tokens(self) -> tuple[list[int] | None, list[int]]:
        """The ids the tokenizer adds before and after a text (None, [] where they cannot be told apart)."""
        probe = "Hello world"
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        for start in range(len(full) - len(bare) + 1):
            if bare and full[start:start + len(bare)] == bare:
                return full[:start], full[start + len(bare):]
        return None, []
