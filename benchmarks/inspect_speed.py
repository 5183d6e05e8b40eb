"""Time `moetool inspect --json` on a DeepSeek-V3-sized header set against bare safetensors.

Writes 163 sparse shards (~92,000 tensors, the real DeepSeek-V3 layout) to a temporary
folder, then times, as whole processes (best of N runs):
  * moetool:     python -m moetool inspect FOLDER --json
  * safetensors: a process that opens every shard with safetensors.safe_open and reads
                 every tensor's shape and dtype (the bare cost of reading the headers)
and prints both and their ratio. Run: python benchmarks/inspect_speed.py [--runs N]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.headersets import write_header_set  # noqa: E402

BARE = """
import sys
from pathlib import Path
from safetensors import safe_open
count = 0
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            s = f.get_slice(name)
            s.get_shape(), s.get_dtype()
            count += 1
print(count)
"""


def best_of(runs: int, argv: list[str]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_header_set("deepseek_v3", Path(tmp) / "deepseek-v3")
        shards = len(list(folder.glob("*.safetensors")))
        moetool = best_of(args.runs, [sys.executable, "-m", "moetool", "inspect", str(folder), "--json"])
        bare = best_of(args.runs, [sys.executable, "-c", BARE, str(folder)])
        python = best_of(args.runs, [sys.executable, "-c", "pass"])
    print(f"DeepSeek-V3 header set: {shards} shards; best of {args.runs} runs, whole processes")
    print(f"  python startup alone            {python:6.3f} s")
    print(f"  safetensors (read all headers)  {bare:6.3f} s")
    print(f"  moetool inspect --json          {moetool:6.3f} s")
    print(f"  ratio moetool / safetensors     {moetool / bare:6.2f}x")
    print(f"  under the 1 s target            {'yes' if moetool < 1.0 else 'NO'}")


if __name__ == "__main__":
    main()
