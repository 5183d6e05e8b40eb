"""Calibration data (moetool.runner.data): every input format against the tokenizer called directly, lazy reading up
to --max-tokens, large text files in blocks, chat records, and the one-line errors."""

import json
import logging
import sys

import numpy as np
import pytest

from moetool.errors import UsageError
from moetool.runner import data
from moetool.runner.data import DataError, calibration_ids, pack, read_texts, read_token_ids, tokenize

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards box and judge my vow "
         "user assistant system said hello < > : [ ] { } \" , . ! ?").split()
LONG_WORDS = ["internationalization", "counterrevolutionary", "incomprehensibilities", "electroencephalograph"]
TEXTS = ["the quick brown fox jumps over a lazy dog", "seven wizards box , and judge my vow !",
         "hello . the dog said : my fox"]
CHATS = [[{"role": "user", "content": "hello wizards"}, {"role": "assistant", "content": "the fox jumps !"}],
         [{"role": "system", "content": "judge my vow"}, {"role": "user", "content": "a lazy dog ?"}]]
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
FILE_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"


def make_tokenizer(folder, chat_template=TEMPLATE):
    """A word-level tokenizer that wraps each text in [BOS] ... [EOS], saved to FOLDER."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS + LONG_WORDS)], trainers.WordLevelTrainer(
        vocab_size=100, special_tokens=["[UNK]", "[BOS]", "[EOS]"]))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", tokenizer.token_to_id("[BOS]")),
                                                 ("[EOS]", tokenizer.token_to_id("[EOS]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def oracle(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def expected(oracle, texts):
    return [t for text in texts for t in oracle(text, add_special_tokens=True)["input_ids"]]


def ids_of(path, tok_dir, **kw):
    kw.setdefault("max_tokens", None)
    out = calibration_ids(data=path, token_ids=None, tokenizer_path=tok_dir, **kw)
    assert out.dtype == np.int64 and out.ndim == 1
    return out.tolist()


class Counting:
    """The tokenizer, counting the texts it is called on."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, **kw):
        self.texts.append(text)
        return self.tokenizer(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.fixture
def counting(monkeypatch, oracle):
    spy = Counting(oracle)
    monkeypatch.setattr(data, "_load_tokenizer", lambda path: spy)
    return spy


def arrow_table(column, values):
    import pyarrow as pa

    return pa.table({column: values, "other": list(range(len(values)))})


def write_arrow(path, table, stream):
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink:
        writer = (pa.ipc.new_stream if stream else pa.ipc.new_file)(sink, table.schema)
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)
        writer.close()


def write_parquet(path, table):
    import pyarrow.parquet as pq

    pq.write_table(table, path, row_group_size=2)


def save_dataset(path, column, values, splits=None):
    import datasets

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_dict({column: values, "other": list(range(len(values)))})
    if splits:
        half = datasets.Dataset.from_dict({column: values[:1], "other": [0]})
        datasets.DatasetDict({name: dataset if name == "train" else half for name in splits}).save_to_disk(path)
    else:
        dataset.save_to_disk(path)


def write_jsonl(path, column, values):
    path.write_text("".join(json.dumps({column: v, "other": 1}) + "\n" for v in values))


def write_format(kind, path, column, values):
    """VALUES (texts or chats) as one input of KIND under PATH; returns what to give as --data."""
    if kind == "jsonl":
        write_jsonl(path / "d.jsonl", column, values)
        return path / "d.jsonl"
    if kind == "parquet":
        write_parquet(path / "d.parquet", arrow_table(column, values))
        return path / "d.parquet"
    if kind in ("arrow-file", "arrow-stream"):
        write_arrow(path / "d.arrow", arrow_table(column, values), stream=kind == "arrow-stream")
        return path / "d.arrow"
    save_dataset(path / "ds", column, values, splits=["test", "train"] if kind == "datasetdict" else None)
    return path / "ds"


FORMATS = ["jsonl", "parquet", "arrow-file", "arrow-stream", "dataset", "datasetdict"]


@pytest.mark.parametrize("kind", FORMATS)
def test_record_formats_give_the_tokenizers_ids(tmp_path, tok_dir, oracle, kind):
    source = write_format(kind, tmp_path, "content", TEXTS)
    assert ids_of(source, tok_dir, field="content") == expected(oracle, TEXTS)
    assert read_texts(source, "content") == TEXTS


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_text_file_is_one_document(tmp_path, tok_dir, oracle, suffix):
    text = "\n".join(TEXTS) + "\n"
    (tmp_path / f"d{suffix}").write_text(text)
    assert ids_of(tmp_path / f"d{suffix}", tok_dir) == expected(oracle, [text])


def test_a_folder_is_its_own_files_sorted_by_name(tmp_path, tok_dir, oracle):
    (tmp_path / "b.txt").write_text(TEXTS[0])
    write_jsonl(tmp_path / "a.jsonl", "text", [TEXTS[1]])
    write_parquet(tmp_path / "c.parquet", arrow_table("text", [TEXTS[2]]))
    (tmp_path / "notes.json").write_text("{}")                  # not a calibration file
    (tmp_path / ".hidden.txt").write_text("hidden words")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("a subfolder is not read")
    assert ids_of(tmp_path, tok_dir) == expected(oracle, [TEXTS[1], TEXTS[0], TEXTS[2]])


def test_empty_folder_and_subfolders_only(tmp_path, tok_dir):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.txt").write_text("the fox")
    with pytest.raises(DataError, match="subfolders are not read"):
        ids_of(tmp_path, tok_dir)


def test_datasetdict_uses_train_else_the_first_split(tmp_path, tok_dir, oracle, caplog):
    save_dataset(tmp_path / "dd", "text", TEXTS, splits=["test", "train"])
    with caplog.at_level(logging.INFO, logger="moetool.runner.data"):
        assert ids_of(tmp_path / "dd", tok_dir) == expected(oracle, TEXTS)
    assert "'train'" in caplog.text
    save_dataset(tmp_path / "dd2", "text", TEXTS, splits=["validation", "test"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moetool.runner.data"):
        assert ids_of(tmp_path / "dd2", tok_dir) == expected(oracle, TEXTS[:1])     # first split: "validation"
    assert "'validation'" in caplog.text


def test_dataset_shards_are_read_in_state_json_order(tmp_path, tok_dir, oracle):
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(tmp_path / "ds", num_shards=3)
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    assert len(state["_data_files"]) == 3
    state["_data_files"].reverse()
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    assert ids_of(tmp_path / "ds", tok_dir) == expected(oracle, TEXTS[::-1])


def test_max_tokens_stops_before_later_documents(tmp_path, tok_dir, oracle, counting):
    first = oracle(TEXTS[0])["input_ids"]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": TEXTS[0]}) + "\n" + "{this line is not JSON\n")
    assert ids_of(path, tok_dir, max_tokens=len(first)) == first
    assert ids_of(path, tok_dir, max_tokens=3) == first[:3]
    assert counting.texts == [TEXTS[0], TEXTS[0]]
    with pytest.raises(DataError, match=r"d.jsonl:2: not a JSON object with a 'text' field"):
        ids_of(path, tok_dir, max_tokens=len(first) + 1)
    # a parquet file of many rows: tokenizing stops at the row that reaches max_tokens
    counting.texts.clear()
    write_parquet(tmp_path / "d.parquet", arrow_table("text", TEXTS * 100))
    out = ids_of(tmp_path / "d.parquet", tok_dir, max_tokens=2 * len(first) + 1)
    assert out == expected(oracle, TEXTS[:3])[: 2 * len(first) + 1] and counting.texts == TEXTS[:3]


def test_large_text_file_is_tokenized_in_blocks(tmp_path, tok_dir, oracle, counting, monkeypatch):
    rng = np.random.default_rng(0)
    line = " ".join(rng.choice(LONG_WORDS, 2000))          # long words: fewer tokens, a faster test
    text = "\n".join(line for _ in range(data.BLOCK // len(line) + 2)) + "\n"   # a little over one block
    path = tmp_path / "big.txt"
    path.write_text(text)
    assert path.stat().st_size > data.BLOCK
    whole = oracle(text, add_special_tokens=True)["input_ids"]
    assert whole[0] == oracle.bos_token_id and whole[-1] == oracle.eos_token_id and oracle.unk_token_id not in whole
    assert ids_of(path, tok_dir) == whole
    blocks = [t for t in counting.texts if len(t) > 1000]
    assert len(blocks) == 2 and "".join(blocks) == text and all(b.endswith("\n") for b in blocks)
    # with smaller blocks (the same code), max_tokens stops after the first one
    monkeypatch.setattr(data, "BLOCK", 16 * 1024)
    counting.texts.clear()
    assert ids_of(path, tok_dir, max_tokens=100) == whole[:100]
    assert len([t for t in counting.texts if len(t) > 1000]) == 1
    assert read_texts(path) == [text]


@pytest.mark.parametrize("kind", FORMATS)
def test_chat_records_with_the_model_template(tmp_path, tok_dir, oracle, kind):
    source = write_format(kind, tmp_path, "messages", CHATS)
    want = [t for chat in CHATS for t in oracle.apply_chat_template(chat, tokenize=True, return_dict=False)]
    assert ids_of(source, tok_dir, field="messages", chat_template="model") == want
    assert oracle.bos_token_id not in want


def test_chat_records_with_a_template_file(tmp_path, tok_dir, oracle):
    source = write_format("jsonl", tmp_path, "messages", CHATS)
    (tmp_path / "t.jinja").write_text(FILE_TEMPLATE)
    want = [t for chat in CHATS for t in oracle.apply_chat_template(chat, chat_template=FILE_TEMPLATE,
                                                                    tokenize=True, return_dict=False)]
    got = ids_of(source, tok_dir, field="messages", chat_template=str(tmp_path / "t.jinja"))
    assert got == want and got != ids_of(source, tok_dir, field="messages", chat_template="model")
    with pytest.raises(DataError, match="not a readable chat template file"):
        ids_of(source, tok_dir, field="messages", chat_template=str(tmp_path / "none.jinja"))


def test_model_without_a_chat_template(tmp_path):
    tok_dir = make_tokenizer(tmp_path / "tok", chat_template=None)
    source = write_format("jsonl", tmp_path, "messages", CHATS)
    with pytest.raises(DataError, match="has no chat template") as info:
        ids_of(source, tok_dir, field="messages", chat_template="model")
    assert "--chat-template FILE" in info.value.hint


def one_line_error(source, tok_dir, **kw):
    with pytest.raises(DataError) as info:
        ids_of(source, tok_dir, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_chat_records_name_file_record_and_field(tmp_path, tok_dir):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": CHATS[0]}) + "\n\n" + json.dumps({"text": "hello"}) + "\n")
    assert one_line_error(path, tok_dir, field="messages", chat_template="model") == \
        f"{path}:3: no 'messages' field (a list of chat messages)"
    path.write_text(json.dumps({"messages": "hello"}) + "\n")
    assert one_line_error(path, tok_dir, field="messages", chat_template="model").startswith(
        f"{path}:1: 'messages' is not a list of chat messages")
    write_parquet(tmp_path / "c.parquet", arrow_table("messages", [CHATS[0], None]))
    assert one_line_error(tmp_path / "c.parquet", tok_dir, field="messages", chat_template="model") == \
        f"{tmp_path / 'c.parquet'}: row 2: no 'messages' field (a list of chat messages)"
    write_parquet(tmp_path / "t.parquet", arrow_table("text", TEXTS))
    assert one_line_error(tmp_path / "t.parquet", tok_dir, field="messages", chat_template="model") == \
        f"{tmp_path / 't.parquet'}: row 1: no 'messages' field (the columns are text, other)"
    assert one_line_error(tmp_path / "t.parquet", tok_dir, field="text", chat_template="model").startswith(
        f"{tmp_path / 't.parquet'}: row 1: 'text' is not a list of chat messages")
    (tmp_path / "p.txt").write_text("plain words")
    assert "plain text holds no chat records" in one_line_error(tmp_path / "p.txt", tok_dir, chat_template="model")


def test_missing_pyarrow_gives_the_install_hint(tmp_path, tok_dir, oracle, monkeypatch):
    write_parquet(tmp_path / "d.parquet", arrow_table("text", TEXTS))
    write_arrow(tmp_path / "d.arrow", arrow_table("text", TEXTS), stream=True)
    write_jsonl(tmp_path / "d.jsonl", "text", TEXTS)
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("d.parquet", "d.arrow"):
        with pytest.raises(DataError, match="needs pyarrow") as info:
            ids_of(tmp_path / name, tok_dir)
        assert info.value.hint == "pip install 'moetool[data]'"
    assert ids_of(tmp_path / "d.jsonl", tok_dir) == expected(oracle, TEXTS)


def test_default_is_the_builtin_corpus(tok_dir, oracle):
    heldout = data.builtin_texts("heldout")[0]
    assert ids_of(None, tok_dir, max_tokens=500, default="builtin:heldout") == expected(oracle, [heldout])[:500]
    assert ids_of("builtin", tok_dir, max_tokens=50) == expected(oracle, data.builtin_texts("train"))[:50]


def test_token_ids(tmp_path):
    def ids(text, max_tokens=None):
        (tmp_path / "ids").write_text(text)
        out = calibration_ids(data=None, token_ids=tmp_path / "ids", max_tokens=max_tokens, tokenizer_path=None)
        assert out.dtype == np.int64
        return out.tolist()

    assert ids("[1, 2, 3]") == [1, 2, 3] and ids("[[1, 2], [3]]", max_tokens=2) == [1, 2]
    assert ids(" 4 5\n6 ", max_tokens=10) == [4, 5, 6]
    for bad in ("[1, -2]", "[1.5]", "[true]", "1 x", "[[1], 2]", "[1", "{}"):
        with pytest.raises(DataError):
            ids(bad)
    with pytest.raises(DataError, match="holds no token ids"):
        ids("[]")
    with pytest.raises(DataError, match="no such token-id file"):
        calibration_ids(data=None, token_ids=tmp_path / "none", max_tokens=None, tokenizer_path=None)
    with pytest.raises(UsageError, match="not both"):
        calibration_ids(data=tmp_path / "x.txt", token_ids=tmp_path / "ids", max_tokens=None, tokenizer_path=None)
    with pytest.raises(UsageError, match="--max-tokens must be positive"):
        ids("[1]", max_tokens=0)
    assert read_token_ids(tmp_path / "ids") == [1]


def test_token_ids_are_read_only_up_to_max_tokens(tmp_path, monkeypatch):
    """A token-id file is read block by block until --max-tokens ids exist: what follows is never read, so a
    tail that is not token ids is refused only when it would be read."""
    monkeypatch.setattr(data, "BLOCK", 64)
    head = list(range(500))
    for name, text in (("ids.txt", " ".join(map(str, head)) + " not-an-id"),
                       ("ids.json", "[" + ", ".join(map(str, head)) + ', "not an id"'),
                       ("nested.json", "[[" + ", ".join(map(str, head)) + "], [1.5, {}")):
        (tmp_path / name).write_text(text)
        out = calibration_ids(data=None, token_ids=tmp_path / name, max_tokens=300, tokenizer_path=None)
        assert out.tolist() == head[:300]
        assert read_token_ids(tmp_path / name, 7) == head[:7]
        with pytest.raises(DataError, match=f"{name}: "):
            calibration_ids(data=None, token_ids=tmp_path / name, max_tokens=None, tokenizer_path=None)


def test_token_ids_never_held_as_one_python_list(tmp_path):
    import tracemalloc

    ids = np.random.default_rng(0).integers(0, 50_000, 300_000)
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids.tolist())) + "\n")    # 1.8 MB of text
    (tmp_path / "ids.json").write_text(json.dumps([ids[:1000].tolist(), ids[1000:].tolist()]))
    for name in ("ids.txt", "ids.json"):
        tracemalloc.start()
        try:
            small = calibration_ids(data=None, token_ids=tmp_path / name, max_tokens=1000, tokenizer_path=None)
            assert tracemalloc.get_traced_memory()[1] < 4_000_000      # a block or two, never the whole file
            tracemalloc.reset_peak()
            whole = calibration_ids(data=None, token_ids=tmp_path / name, max_tokens=None, tokenizer_path=None)
            assert tracemalloc.get_traced_memory()[1] < 12_000_000     # the int64 arrays: 2.4 MB, and their join
        finally:
            tracemalloc.stop()
        assert small.tolist() == ids[:1000].tolist() and np.array_equal(whole, ids)


def test_token_ids_split_across_blocks(tmp_path, monkeypatch):
    """Whatever the block size, a file gives the ids (or the error) the whole-file JSON parser gives."""
    cases = {"12 345\n6789  0": [12, 345, 6789, 0], "[12, 345 ,6789,0]": [12, 345, 6789, 0],
             "[[12, 345], [], [6789,0] ]  \n": [12, 345, 6789, 0], "[ ]": [], "[[]]": [],
             "[12, 34": None, "[12,,34]": None, "[12, 34,]": None, "[12 34]": None, "[[1], [2]] x": None,
             "[[1], 2]": None, "[1, [2]]": None, "[[1, [2]]]": None, "[012]": None, "[1e3]": None,
             '["1"]': None, "1 2x 3": None, "[true, 1]": None, "[-1]": None, "[9223372036854775808]": None,
             # long runs of whitespace around values, across block boundaries (JSON allows any amount)
             "[7" + " " * 200 + "]": [7], "[1," + "\n" * 300 + "2 " + " " * 100 + ", 3]": [1, 2, 3],
             "[[5" + "\t" * 150 + "], [6]]": [5, 6], "[" + " " * 200 + "]": [], "[7" + " " * 100 + "8]": None}
    for block in (1, 2, 3, 7, 64 * 1024):
        monkeypatch.setattr(data, "BLOCK", block)
        for text, want in cases.items():
            (tmp_path / "ids").write_text(text)
            if want is None:
                with pytest.raises(DataError):
                    read_token_ids(tmp_path / "ids")
            else:
                assert read_token_ids(tmp_path / "ids") == want, (text, block)


def test_deeply_nested_json_is_a_one_line_error(tmp_path, tok_dir):
    (tmp_path / "ids.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="ids.json: not a token-id file .*nested deeper"):
        calibration_ids(data=None, token_ids=tmp_path / "ids.json", max_tokens=None, tokenizer_path=None)
    (tmp_path / "flat.json").write_text("[1, " + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "]")
    with pytest.raises(DataError, match="flat.json: not a token-id file"):
        calibration_ids(data=None, token_ids=tmp_path / "flat.json", max_tokens=None, tokenizer_path=None)
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError, match="state.json: not a datasets state file .*nested too deeply"):
        ids_of(tmp_path / "ds", tok_dir)


def test_saved_dataset_names_only_its_own_files(tmp_path, tok_dir, oracle):
    """state.json and dataset_dict.json may name files and splits inside their folder only: an absolute
    name or ".." is refused, never read. A file or split in the folder that is a symbolic link is read
    where it leads, as datasets reads it (a hub-cache snapshot links its files to the blobs)."""
    save_dataset(tmp_path / "elsewhere", "text", TEXTS)
    outside = tmp_path / "elsewhere" / json.loads((tmp_path / "elsewhere" / "state.json").read_text()
                                                  )["_data_files"][0]["filename"]
    save_dataset(tmp_path / "ds", "text", TEXTS[:1])
    assert ids_of(tmp_path / "ds", tok_dir) == expected(oracle, TEXTS[:1])
    state = json.loads((tmp_path / "ds" / "state.json").read_text())
    (tmp_path / "ds" / "link.arrow").symlink_to(outside)
    for name in (f"../elsewhere/{outside.name}", str(outside), "", ".", "a\0b"):
        state["_data_files"] = [{"filename": name}]
        (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
        with pytest.raises(DataError, match="state.json: names .*, not a file inside"):
            ids_of(tmp_path / "ds", tok_dir)
    save_dataset(tmp_path / "dd", "text", TEXTS, splits=["train"])
    (tmp_path / "dd" / "link").symlink_to(tmp_path / "elsewhere")
    for split in ("../elsewhere", str(tmp_path / "elsewhere"), "."):
        (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": [split]}))
        with pytest.raises(DataError, match="dataset_dict.json: names .*, not a file inside"):
            ids_of(tmp_path / "dd", tok_dir)
    state["_data_files"] = [{"filename": "link.arrow"}]   # a link in the folder: read
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    assert ids_of(tmp_path / "ds", tok_dir) == expected(oracle, TEXTS)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["link"]}))
    assert ids_of(tmp_path / "dd", tok_dir) == expected(oracle, TEXTS)
    for splits in ("train", [1], {"train": {}}):
        (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": splits}))
        with pytest.raises(DataError, match="dataset_dict.json: not a datasets DatasetDict file"):
            ids_of(tmp_path / "dd", tok_dir)


def test_errors(tmp_path, tok_dir):
    assert one_line_error(tmp_path / "none.txt", tok_dir) == f"{tmp_path / 'none.txt'}: no such file or folder"
    (tmp_path / "blank.txt").write_text("  \n")
    assert one_line_error(tmp_path / "blank.txt", tok_dir) == f"{tmp_path / 'blank.txt'}: holds no text"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert "cannot be read as UTF-8 text" in one_line_error(tmp_path / "latin1.txt", tok_dir)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    assert "cannot be read as parquet data" in one_line_error(tmp_path / "broken.parquet", tok_dir)
    (tmp_path / "broken.arrow").write_bytes(b"not arrow at all")
    assert "cannot be read as Arrow IPC data" in one_line_error(tmp_path / "broken.arrow", tok_dir)
    write_parquet(tmp_path / "n.parquet", arrow_table("text", TEXTS))
    assert "column 'other' holds int64, not text" in one_line_error(tmp_path / "n.parquet", tok_dir, field="other")
    write_jsonl(tmp_path / "d.jsonl", "content", TEXTS)
    assert one_line_error(tmp_path / "d.jsonl", tok_dir) == f"{tmp_path / 'd.jsonl'}:1: not a JSON object with a " \
        "'text' field"
    for tokenizer_path in (None, tmp_path):
        with pytest.raises(DataError, match="tokeni") as info:
            calibration_ids(data=tmp_path / "d.jsonl", token_ids=None, field="content", max_tokens=None,
                            tokenizer_path=tokenizer_path)
        assert "--token-ids" in info.value.hint


def test_pack_takes_arrays_and_lists(tok_dir):
    ids = np.arange(100, dtype=np.int64)
    packed = pack(ids, seq_len=30, max_tokens=95, vocab_size=100, max_positions=64)
    assert packed.shape == (3, 30) and packed.dtype.is_floating_point is False
    assert packed.flatten().tolist() == list(range(90))
    assert pack(list(range(100)), seq_len=30, max_tokens=95, vocab_size=100, max_positions=64).equal(packed)
    assert pack(ids[:7], seq_len=30, max_tokens=None, vocab_size=None, max_positions=None).shape == (1, 7)
    with pytest.raises(DataError, match="token id 99 is outside the model's vocabulary of 50"):
        pack(ids, seq_len=10, max_tokens=None, vocab_size=50, max_positions=None)
    with pytest.raises(DataError, match="holds no tokens"):
        pack(np.array([], dtype=np.int64), seq_len=10, max_tokens=None, vocab_size=None, max_positions=None)
    with pytest.raises(UsageError, match="beyond the model's maximum of 64"):
        pack(ids, seq_len=65, max_tokens=None, vocab_size=None, max_positions=64)


def test_old_entry_points_still_work(tmp_path, tok_dir, oracle):
    write_jsonl(tmp_path / "d.jsonl", "content", TEXTS)
    assert read_texts(tmp_path / "d.jsonl", "content") == TEXTS
    assert tokenize(TEXTS, tok_dir) == expected(oracle, TEXTS)


def test_a_line_longer_than_a_block_is_cut_between_words(tmp_path, tok_dir, oracle, counting, monkeypatch):
    monkeypatch.setattr(data, "BLOCK", 16 * 1024)
    rng = np.random.default_rng(1)
    text = " ".join(rng.choice(LONG_WORDS, 6000))   # one line of about three blocks, no newline
    path = tmp_path / "one-line.txt"
    path.write_text(text)
    assert path.stat().st_size > 2 * data.BLOCK
    assert ids_of(path, tok_dir) == oracle(text, add_special_tokens=True)["input_ids"]
    blocks = [t for t in counting.texts if len(t) > 1000]
    assert len(blocks) >= 2 and "".join(blocks) == text and all(b[0] == " " for b in blocks[1:])


def test_a_byte_order_mark_is_not_text(tmp_path, tok_dir, oracle):
    """Windows tools start UTF-8 files with a byte-order mark; it is not part of the first record."""
    for name, body in (("bom.txt", TEXTS[0]), ("bom.jsonl", json.dumps({"text": TEXTS[0]}) + "\n")):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + body.encode())
        assert ids_of(path, tok_dir) == oracle(TEXTS[0])["input_ids"], name
