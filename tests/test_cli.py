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


def test_odd_sources_are_refused_plainly(tmp_path):
    for source, code, said in (("", 2, "empty path"), ("/dev/null", 4, "neither a file nor a folder")):
        proc = cli("inspect", source, cwd=tmp_path)
        assert proc.returncode == code and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = cli("profile", "--token-ids", "/dev/null")
    assert proc.returncode == 11 and "not a regular file" in proc.stderr
