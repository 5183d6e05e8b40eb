"""The command line as a whole: parse errors in one line, data printed as text, report files checked
before the run."""

import shutil
import subprocess
import sys

import pytest


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "moetool", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("args, said", [
    (["prune"], "Missing argument 'model'"),
    (["prune", "builtin:tiny-moe", "out", "--bogus"], "No such option: --bogus"),
    (["bogus"], "No such command 'bogus'"),
    (["convert", "builtin:tiny-moe", "out", "--dtype", "fp8"], "Invalid value for '--dtype'"),
    # pathlib reads "" as the current folder: --data "" would calibrate on every file in it
    (["profile", "builtin:tiny-moe", "--data", ""], "Invalid value for '--data': an empty path"),
    (["eval", "builtin:tiny-moe", "--token-ids", ""], "Invalid value for '--token-ids': an empty path"),
    (["profile", "builtin:tiny-moe", "--ep-replicas", "2"], "give --ep N as well"),   # (would be ignored)
])
def test_parse_errors_are_one_line(tmp_path, args, said):
    proc = cli(*args, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert lines[0].startswith("Error: ") and said in lines[0] and lines[1].startswith("Hint: see 'moetool")
    assert list(tmp_path.iterdir()) == []


def test_names_print_as_text_not_markup(tmp_path, tiny):
    src = tmp_path / "m[/b]x[bold]"   # rich read "[/b]" as a closing tag, and crashed
    shutil.copytree(tiny("mixtral"), src)
    proc = cli("inspect", src)
    assert proc.returncode == 0 and f"{src} (dir)" in proc.stdout.replace("\n", ""), proc.stderr


def test_report_files_are_checked_before_the_run(tmp_path):
    proc = cli("profile", "--csv", tmp_path / "missing" / "x.csv")
    assert proc.returncode == 9 and "folder does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("profile", "--csv", tmp_path)
    assert proc.returncode == 9 and "is a folder" in proc.stderr


def test_report_files_never_replace_the_model_or_the_inputs(tmp_path):
    """--csv/--plot/--html: an existing file needs --force (exit 8), and a file of the source model (or inside
    its folder), an input, or one file for two reports is refused even with --force (exit 2), before the run."""
    from moetool.checkpoint import builtin_model_path

    model = tmp_path / "m"
    shutil.copytree(builtin_model_path("tiny-moe"), model)
    weights = (model / "model.safetensors").read_bytes()
    ids = tmp_path / "ids.txt"
    ids.write_text(" ".join(str(i % 50) for i in range(64)))
    (tmp_path / "link.csv").symlink_to(model / "model.safetensors")
    run = ("profile", model, "--token-ids", ids, "--seq-len", "16")
    for extra, said in (
            (["--csv", model / "model.safetensors"], "already exists"),
            (["--csv", model / "model.safetensors", "--force"], "may not be inside the source folder"),
            (["--html", model / "report.html", "--force"], "may not be inside the source folder"),
            (["--csv", tmp_path / "link.csv", "--force"], "may not be inside the source folder"),
            (["--csv", ids, "--force"], "would replace the --token-ids input"),
            (["--csv", tmp_path / "r", "--html", tmp_path / "r"], "given to both --csv and --html")):
        proc = cli(*run, *extra)
        code = 8 if said == "already exists" else 2
        assert proc.returncode == code and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert (model / "model.safetensors").read_bytes() == weights and sorted(p.name for p in model.iterdir()) \
            == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert ids.read_text().startswith("0 1 2") and not (tmp_path / "r").exists()
    (tmp_path / "old.csv").write_text("mine")
    proc = cli(*run, "--csv", tmp_path / "old.csv")
    assert proc.returncode == 8 and "use --force" in proc.stderr and (tmp_path / "old.csv").read_text() == "mine"
    proc = cli(*run, "--csv", tmp_path / "old.csv", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "old.csv").read_text().startswith("layer,expert,tokens")


def test_odd_sources_are_refused_plainly(tmp_path):
    for source, code, said in (("", 2, "empty path"), ("/dev/null", 4, "neither a file nor a folder")):
        proc = cli("inspect", source, cwd=tmp_path)
        assert proc.returncode == code and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = cli("profile", "--token-ids", "/dev/null")
    assert proc.returncode == 11 and "not a regular file" in proc.stderr


@pytest.mark.parametrize("command", ["convert", "inspect", "profile", "eval", "prune", "quantize", "upcycle"])
def test_flags_show_no_value_placeholder(command):
    """A flag takes no value, so --help shows none beside it (typer shows "<bool>"); only typer's own
    --help line keeps it."""
    out = cli(command, "--help").stdout
    assert [line for line in out.splitlines() if "<bool>" in line and "--help" not in line] == []
    assert "--json" in out or command == "upcycle" and "--dry-run" in out
