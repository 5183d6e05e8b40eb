"""Time `moetool inspect --json` on DeepSeek-V3-sized checkpoints against the bare header reads.

Writes, to a temporary folder, sparse files shaped like the released DeepSeek-V3 (headers only,
tensor data a hole): 163 safetensors shards (~92,000 tensors, tests/headersets.py) and one GGUF
as llama.cpp writes it (deepseek2, 61 blocks, Q4_K with Q6_K down projections and output, the
129,280-token vocabulary with token types and 127,741 merges). Then times, as whole processes
(best of N runs, the commands taking turns; the spread is printed too):
  * moetool inspect FOLDER --json  vs  a process that opens every shard with safetensors.safe_open
    and reads every tensor's shape and dtype (the bare cost of reading the headers);
  * moetool inspect FILE.gguf --json  vs  a process that opens the file with gguf-py's GGUFReader.
Goal (issue 13): each ratio at most 2x. Run: python benchmarks/inspect_speed.py [--runs N]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.headersets import write_header_set  # noqa: E402

GOAL = 2.0

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

BARE_GGUF = """
import sys
from gguf import GGUFReader
print(len(GGUFReader(sys.argv[1]).tensors))
"""


def write_deepseek_v3_gguf(path: Path) -> Path:
    """DeepSeek-V3 as a sparse GGUF: gguf-py writes the header, metadata and tensor infos; the
    tensor data is never written, the file is only extended to its full size (~380 GB)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, ExpertGatingFuncType, GGUFWriter, TokenType
    from gguf import GGMLQuantizationType as Q

    H, V, D, F, E, L, DENSE = 7168, 129280, 18432, 2048, 256, 61, 3
    writer = GGUFWriter(path, "deepseek2")
    for method, value in (("add_block_count", L), ("add_context_length", 163840), ("add_embedding_length", H),
                          ("add_feed_forward_length", D), ("add_head_count", 128), ("add_head_count_kv", 128),
                          ("add_rope_freq_base", 10000.0), ("add_layer_norm_rms_eps", 1e-6),
                          ("add_vocab_size", V), ("add_q_lora_rank", 1536), ("add_kv_lora_rank", 512),
                          ("add_key_length", 192), ("add_value_length", 128), ("add_rope_dimension_count", 64),
                          ("add_leading_dense_block_count", DENSE), ("add_expert_feed_forward_length", F),
                          ("add_expert_count", E), ("add_expert_shared_count", 1), ("add_expert_used_count", 8),
                          ("add_expert_weights_scale", 2.5), ("add_expert_weights_norm", True),
                          ("add_expert_gating_func", ExpertGatingFuncType.SIGMOID), ("add_expert_group_count", 8),
                          ("add_expert_group_used_count", 4), ("add_tokenizer_model", "gpt2"),
                          ("add_tokenizer_pre", "deepseek-v3"), ("add_bos_token_id", 0), ("add_eos_token_id", 1),
                          ("add_file_type", 15)):
        getattr(writer, method)(value)
    writer.add_token_list([f"<token {i}>" for i in range(V)])
    writer.add_token_types([int(TokenType.NORMAL)] * V)
    writer.add_token_merges([f"m{i} e{i}" for i in range(127741)])

    def tensor(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)

    tensor("token_embd.weight", (V, H), Q.Q4_K)
    for layer in range(L):
        b = f"blk.{layer}."
        for norm, n in (("attn_norm", H), ("attn_q_a_norm", 1536), ("attn_kv_a_norm", 512), ("ffn_norm", H)):
            tensor(b + norm + ".weight", (n,), Q.F32)
        for name, shape in (("attn_q_a", (1536, H)), ("attn_q_b", (128 * 192, 1536)),
                            ("attn_kv_a_mqa", (576, H)), ("attn_kv_b", (128 * 256, 512)),
                            ("attn_output", (H, 128 * 128))):
            tensor(b + name + ".weight", shape, Q.Q4_K)
        if layer < DENSE:
            tensor(b + "ffn_gate.weight", (D, H), Q.Q4_K)
            tensor(b + "ffn_up.weight", (D, H), Q.Q4_K)
            tensor(b + "ffn_down.weight", (H, D), Q.Q6_K)
            continue
        tensor(b + "ffn_gate_inp.weight", (E, H), Q.F32)
        tensor(b + "exp_probs_b.bias", (E,), Q.F32)
        tensor(b + "ffn_gate_exps.weight", (E, F, H), Q.Q4_K)
        tensor(b + "ffn_up_exps.weight", (E, F, H), Q.Q4_K)
        tensor(b + "ffn_down_exps.weight", (E, H, F), Q.Q6_K)
        tensor(b + "ffn_gate_shexp.weight", (F, H), Q.Q4_K)
        tensor(b + "ffn_up_shexp.weight", (F, H), Q.Q4_K)
        tensor(b + "ffn_down_shexp.weight", (H, F), Q.Q6_K)
    tensor("output_norm.weight", (H,), Q.F32)
    tensor("output.weight", (V, H), Q.Q6_K)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fh = writer.fout[0]
    data_start = GGUFWriter.ggml_pad(fh.tell(), writer.data_alignment)
    data = sum(GGUFWriter.ggml_pad(ti.nbytes, writer.data_alignment) for ti in writer.tensors[0].values())
    fh.truncate(data_start + data)
    writer.close()
    return path


def timings(runs: int, commands: dict[str, list[str]]) -> dict[str, list[float]]:
    """Each command's times, sorted. The commands take turns (one run of each per round), so that a
    change in the machine's load affects a command and its baseline alike."""
    times: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            times[label].append(time.perf_counter() - start)
    return {label: sorted(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    inspect = [sys.executable, "-m", "moetool", "inspect"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_header_set("deepseek_v3", Path(tmp) / "deepseek-v3")
        shards = len(list(folder.glob("*.safetensors")))
        gguf = write_deepseek_v3_gguf(Path(tmp) / "DeepSeek-V3-Q4_K_M.gguf")
        rows = timings(args.runs, {"python startup alone": [sys.executable, "-c", "pass"],
                                   "safetensors (read all headers)": [sys.executable, "-c", BARE, str(folder)],
                                   "moetool inspect --json (safetensors)": [*inspect, str(folder), "--json"],
                                   "gguf-py GGUFReader(path)": [sys.executable, "-c", BARE_GGUF, str(gguf)],
                                   "moetool inspect --json (GGUF)": [*inspect, str(gguf), "--json"]})
    print(f"DeepSeek-V3: {shards} safetensors shards, and one GGUF; {args.runs} runs each, whole processes")
    for label, times in rows.items():
        print(f"  {label:38s} best {times[0]:6.3f} s   (median {times[len(times) // 2]:.3f}, worst {times[-1]:.3f})")
    for fmt, bare in (("safetensors", "safetensors (read all headers)"), ("GGUF", "gguf-py GGUFReader(path)")):
        ratio = rows[f"moetool inspect --json ({fmt})"][0] / rows[bare][0]
        print(f"  ratio moetool / bare, {fmt:12s} {ratio:6.2f}x   goal <= {GOAL:.0f}x: "
              f"{'met' if ratio <= GOAL else 'MISSED'}")


if __name__ == "__main__":
    main()
