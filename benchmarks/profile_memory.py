"""Peak memory of `moetool profile` against the number of calibration tokens (it must not grow
with them), and the weight bytes each streamed run read (each weight once).

`moetool profile builtin:tiny-moe --data FILE --max-tokens N --json` is run for N = 16k, 64k, 256k
and 1M tokens in full mode, streamed mode, and streamed mode with --offload-dir, as a new user
would. FILE is the built-in training corpus repeated until it holds enough text. Peak RSS is the
process's own (getrusage ru_maxrss, as the report gives it). The bounds, against the 16k run of
the same mode: full and streamed may grow by one fp32 copy of the hidden states (tokens x hidden
x 4 bytes) plus 100 MB; streamed with --offload-dir by 100 MB.

Run: python benchmarks/profile_memory.py [--tokens 16384,65536,262144,1048576]
"""

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
from importlib.resources import files
from pathlib import Path

HIDDEN = 128   # builtin:tiny-moe
MB = 1e6


def corpus_file(path: Path, repeats: int) -> Path:
    raw = gzip.decompress(files("moetool.data").joinpath("corpus", "train.txt.gz").read_bytes())
    with open(path, "wb") as fh:
        for _ in range(repeats):
            fh.write(raw)
    return path


def run(data: Path, tokens: int, mode: str, offload: Path | None) -> dict:
    cmd = [sys.executable, "-m", "moetool", "profile", "builtin:tiny-moe", "--data", str(data), "--max-tokens",
           str(tokens), "--mode", mode, "--json"]
    if offload is not None:
        cmd += ["--offload-dir", str(offload)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16384,65536,262144,1048576")
    args = parser.parse_args()
    sizes = [int(t) for t in args.tokens.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="moetool-profile-memory-"))
    try:
        data = corpus_file(tmp / "corpus.txt", repeats=max(1, -(-max(sizes) // 250_000)))
        print(f"builtin:tiny-moe (hidden {HIDDEN}), calibration text {data.stat().st_size / MB:.1f} MB; "
              "peak RSS in MB (excess over the 16k run; bound)")
        print(f"{'mode':24s}" + "".join(f"{n:>22,}" for n in sizes) + "   weight bytes read / checkpoint")
        for label, mode, offload in (("full", "full", None), ("streamed", "streamed", None),
                                     ("streamed --offload-dir", "streamed", tmp / "offload")):
            base = None
            cells, reads, verdicts = [], [], []
            for n in sizes:
                report = run(data, n, mode, offload)
                peak = report["memory"]["host_peak_rss_bytes"]
                base = peak if base is None else base
                excess = peak - base
                bound = (0 if offload else report["tokens"] * HIDDEN * 4) + 100 * MB
                ok = excess <= bound
                verdicts.append(ok)
                cells.append(f"{peak / MB:7.0f} (+{excess / MB:5.0f}; {bound / MB:5.0f})")
                io = report["io"]
                if io.get("weight_bytes_read") is not None:
                    reads.append(f"{io['weight_bytes_read'] / io['checkpoint_bytes']:.3f}")
            read = " ".join(reads) or "n/a (transformers reads)"
            print(f"{label:24s}" + "".join(f"{c:>22s}" for c in cells) + f"   {read}"
                  + ("   met" if all(verdicts) else "   MISSED"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
