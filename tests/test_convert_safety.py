"""convert never harms its input and never leaves a half-written output that looks complete."""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from moetool.checkpoint import open_checkpoint
from moetool.errors import OutputWriteError, UsageError
from moetool.ops.convert import ConvertOptions, convert
from tests.headersets import write_header_set


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moetool", *args], capture_output=True, text=True, cwd=cwd)


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if name in p.name]


def test_existing_output_needs_force(tmp_path, tiny):
    src = tiny("mixtral")
    with open_checkpoint(src) as ckpt:   # an earlier output
        convert(ckpt, tmp_path / "out", ConvertOptions())
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = cli("convert", str(src), str(tmp_path / "out"))
    assert proc.returncode == 8 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    proc = cli("convert", str(src), str(tmp_path / "out"), "--force", "--dtype", "bf16")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert leftovers(tmp_path, "moetool-") == []


def test_output_inside_source_is_refused(tmp_path, tiny):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    before = digest(src)
    proc = cli("convert", str(src), str(src / "converted"))
    assert proc.returncode == 2 and "inside the source" in proc.stderr
    assert digest(src) == before and not (src / "converted").exists()


@pytest.mark.parametrize("command", [
    ["convert", "{src}", "{out}"], ["convert", "{src}/model.safetensors", "{out}"],
    ["convert", "{src}/model.safetensors", "{src}/model.safetensors"],
    ["prune", "{src}", "{out}", "--keep", "2", "--criterion", "random"],
    ["quantize", "{src}", "{out}", "--format", "int4-g8-sym"],
    ["upcycle", "{dense}", "{out}", "--experts", "2"],
    ["profile", "{src}", "--trace", "{out}", "--max-tokens", "64"],
    ["quantize", "{src}", "{tmp}/q", "--format", "int4-g8-sym", "--emit-llama-quantize", "{src}/types.txt"],
])
def test_force_never_replaces_a_folder_holding_the_source(tmp_path, tiny, command):
    """--force replaces OUT; where OUT is the source, or holds it, that would delete the input."""
    import shutil

    parent = tmp_path / "parent"
    src, dense = parent / "src", parent / "dense"
    shutil.copytree(tiny("mixtral"), src)
    shutil.copytree(tiny("llama"), dense)
    (parent / "mine.txt").write_text("mine")
    before = digest(parent)
    args = [a.format(src=src, dense=dense, out=parent, tmp=tmp_path) for a in command]
    proc = cli(*args, "--force")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the input is never overwritten" in proc.stderr or "inside the source" in proc.stderr
    assert digest(parent) == before and not (tmp_path / "q").exists()


def test_force_replaces_earlier_outputs_only(tmp_path):
    """An empty OUT is the current folder; --force would delete it, a device at OUT, or a folder of
    the user's files: each is refused (exit 2), and nothing is touched."""
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    os.mkfifo(tmp_path / "fifo")
    before = digest(tmp_path)
    for out, said in (("", "current folder"), (".", "current folder"), ("..", "current folder"),
                      ("mine", "no earlier output"), ("fifo", "not a folder"), ("link", "not a folder")):
        proc = cli("convert", "builtin:tiny-moe", out, "--force", cwd=tmp_path)
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, (out, proc.stderr)
    assert digest(tmp_path) == before and (tmp_path / "fifo").exists()
    gguf = cli("prune", "builtin:tiny-moe", "fifo", "--force", cwd=tmp_path)   # (a folder output: the same check)
    assert gguf.returncode == 2


def test_dry_run_writes_nothing(tmp_path, tiny):
    proc = cli("convert", str(tiny("qwen3_moe")), str(tmp_path / "out"), "--layout", "fused", "--dtype", "bf16",
               "--max-shard-size", "30KB", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["target_layout"] == "fused" and len(plan["shards"]) > 1
    assert plan["actions"]["expert groups converted"] == 2
    assert not (tmp_path / "out").exists()


def test_bad_source_is_refused_like_inspect(tmp_path, tiny):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    raw = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(raw[:-100])   # truncated
    proc = cli("convert", str(src), str(tmp_path / "out"))
    assert proc.returncode == 4 and "truncated" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "moetool-") == []


def test_write_failure_leaves_nothing(tmp_path, tiny, monkeypatch):
    import moetool.checkpoint.writer as writer

    calls = {"n": 0}
    real = writer._write_all

    def failing(fd, data):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(writer, "_write_all", failing)
    src = tiny("deepseek_v3")
    before = digest(src)
    with open_checkpoint(src) as ckpt, pytest.raises(OutputWriteError, match="No space left"):
        convert(ckpt, tmp_path / "out", ConvertOptions(dtype="bf16", max_shard_size=10_000))
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path, "out") == []
    assert digest(src) == before
    calls["n"] = 0   # folders made for OUT go too
    with open_checkpoint(src) as ckpt, pytest.raises(OutputWriteError):
        convert(ckpt, tmp_path / "new" / "deeper" / "out", ConvertOptions(dtype="bf16", max_shard_size=10_000))
    assert not (tmp_path / "new").exists()


def test_interrupt_removes_the_temporary_folder(tmp_path):
    """Ctrl-C mid-way: exit 130, no output, no temporary folder, source untouched."""
    src = write_header_set("mixtral_8x7b", tmp_path / "big")   # sparse: reads zeros, writes for real
    before = {p.name: p.stat().st_size for p in src.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "moetool", "convert", str(src), str(tmp_path / "out"),
                             "--dtype", "fp32"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.stat().st_size > 50_000_000 for p in tmp_path.glob(
            ".out.moetool-tmp-*/*.safetensors")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "moetool-") == []
    assert {p.name: p.stat().st_size for p in src.iterdir()} == before


def test_verify_catches_a_corrupted_write(tmp_path, tiny, monkeypatch):
    """--verify re-reads what was written: a writer that flips a byte is caught."""
    import moetool.checkpoint.writer as writer
    from moetool.errors import MoetoolError

    real = writer._copy_range

    def corrupting(src, dst, start, length):
        real(src, dst, start, length)
        os.lseek(dst, -1, os.SEEK_CUR)
        os.write(dst, b"\x7f")

    monkeypatch.setattr(writer, "_copy_range", corrupting)
    with open_checkpoint(tiny("olmoe")) as ckpt, pytest.raises(MoetoolError, match="verify"):
        convert(ckpt, tmp_path / "out", ConvertOptions(), verify=True)
    assert not (tmp_path / "out").exists()


def test_cli_json_report_and_verify(tmp_path, tiny):
    proc = cli("convert", str(tiny("phimoe")), str(tmp_path / "out"), "--layout", "fused", "--dtype", "fp16",
               "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verified"] is True and report["plan"]["target_layout"] == "fused"
    assert report["bytes_written"] == sum(s["bytes"] for s in report["plan"]["shards"])
    card = (tmp_path / "out" / "README.md").read_text()
    assert "moetool convert" in card and "--layout fused" in card


def test_a_side_file_linked_out_of_the_source_is_refused(tmp_path, tiny):
    """tokenizer.json -> a file elsewhere would be copied into OUT (which may then be published): refused,
    exit 4, nothing written. A link to a file inside the source folder is copied as the file."""
    src = tmp_path / "src"
    shutil.copytree(tiny("mixtral"), src)
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (src / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    proc = cli("convert", str(src), str(tmp_path / "out"))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr, proc.stderr
    assert "tokenizer.json" in proc.stderr and "outside the checkpoint folder" in proc.stderr
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "moetool-") == []
    (src / "tokenizer.json").unlink()
    (src / "shared").mkdir()
    (src / "shared" / "tok.json").write_text('{"inside": true}')
    (src / "tokenizer.json").symlink_to("shared/tok.json")
    with open_checkpoint(src) as ckpt:
        convert(ckpt, tmp_path / "out", ConvertOptions())
    copied = tmp_path / "out" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_text() == '{"inside": true}'


def _earlier_output(tiny, out):
    with open_checkpoint(tiny("mixtral")) as ckpt:
        convert(ckpt, out, ConvertOptions(max_shard_size=20_000))   # (several shards, each marked)
    return out


@pytest.mark.parametrize("case", ["project", "project_without_weights", "subfolder", "other_files",
                                  "marked_shard_in_project"])
def test_force_replaces_only_a_checkpoint_folder(tmp_path, tiny, case):
    """--force deletes OUT: a folder of the user's that merely holds a config.json (no weights, or a
    subfolder, or files no checkpoint holds) is refused with exit 2 and left as it was; so is an
    earlier output the user has since put a folder or other files into."""
    out = tmp_path / "out"
    if case == "project":
        out.mkdir()
        (out / "config.json").write_text('{"db": "x"}')
        (out / "main.py").write_text("print(1)")
        (out / "src").mkdir()
        (out / "src" / "important.txt").write_text("data")
    elif case == "project_without_weights":
        out.mkdir()
        (out / "config.json").write_text('{"db": "x"}')
        (out / "main.py").write_text("print(1)")
    elif case == "subfolder":
        _earlier_output(tiny, out)
        (out / "notes").mkdir()
        (out / "notes" / "todo.txt").write_text("mine")
    elif case == "other_files":
        _earlier_output(tiny, out)
        (out / "thesis.docx").write_bytes(b"mine")
    else:   # a shard moetool wrote, copied into a folder that holds a subfolder
        _earlier_output(tiny, tmp_path / "earlier")
        out.mkdir()
        shutil.copy(next((tmp_path / "earlier").glob("*.safetensors")), out)
        (out / "src").mkdir()
        (out / "src" / "main.py").write_text("print(1)")
    before = digest(out)
    with open_checkpoint(tiny("mixtral")) as ckpt, pytest.raises(UsageError, match="no earlier output") as error:
        convert(ckpt, out, ConvertOptions(), force=True)
    assert "remove it yourself" in error.value.hint
    assert digest(out) == before and leftovers(tmp_path, "moetool-") == []


@pytest.mark.parametrize("case", ["save_pretrained", "hub_download"])
def test_force_replaces_a_checkpoint_folder_moetool_did_not_write(tmp_path, tiny, case):
    """A folder transformers' save_pretrained wrote, or a `hf download --local-dir` (its .cache beside
    the files, a .gitattributes, a LICENSE) is an earlier output too: --force replaces it whole."""
    out = tmp_path / "out"
    shutil.copytree(tiny("mixtral"), out)
    if case == "hub_download":
        (out / ".cache" / "huggingface").mkdir(parents=True)
        (out / ".cache" / "huggingface" / "model.safetensors.metadata").write_text("x")
        (out / ".gitattributes").write_text("*.safetensors filter=lfs")
        (out / "LICENSE").write_text("apache-2.0")
    with open_checkpoint(tiny("mixtral")) as ckpt:
        convert(ckpt, out, ConvertOptions(dtype="bf16"), force=True)
    assert not (out / ".cache").exists() and not (out / "LICENSE").exists()
    with open_checkpoint(out) as ckpt:
        assert {t.dtype for t in ckpt.tensors.values()} == {"BF16"}


def test_force_replaces_an_earlier_output(tmp_path, tiny):
    out = _earlier_output(tiny, tmp_path / "out")
    assert len(list(out.glob("*.safetensors"))) > 1
    with open_checkpoint(tiny("mixtral")) as ckpt:
        convert(ckpt, out, ConvertOptions(dtype="bf16"), force=True)
    with open_checkpoint(out) as ckpt:
        assert {t.dtype for t in ckpt.tensors.values()} == {"BF16"}
        assert all(s.metadata["moetool_op"] == "convert" for s in ckpt.shards)
    assert leftovers(tmp_path, "moetool-") == []


@pytest.mark.parametrize("failure", ["oserror", "interrupt"])
def test_force_puts_the_earlier_output_back_if_the_new_one_cannot_take_its_place(tmp_path, tiny, monkeypatch,
                                                                                 failure):
    """--force moves the earlier output aside, then renames the new one into place: if that rename fails,
    or Ctrl-C lands between the two, the earlier output is back at OUT and nothing else is left."""
    from pathlib import Path

    import moetool.checkpoint.writer as writer

    out = _earlier_output(tiny, tmp_path / "out")
    before = digest(out)
    real = writer.os.replace

    def replace(src, dst):
        if ".moetool-tmp-" in Path(src).name:   # the new folder into place, after OUT went aside
            assert not out.exists()
            raise KeyboardInterrupt if failure == "interrupt" else OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    with open_checkpoint(tiny("mixtral")) as ckpt, pytest.raises(
            KeyboardInterrupt if failure == "interrupt" else OutputWriteError):
        convert(ckpt, out, ConvertOptions(dtype="bf16"), force=True)
    assert digest(out) == before and leftovers(tmp_path, "moetool-") == []
