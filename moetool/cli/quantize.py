"""`moetool quantize`: parse options, choose formats, write, render."""

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moetool.cli.convert import _Bar, parse_size
from moetool.cli.options import (
    FLAG,
    PATH,
    CalibBatchSizeOpt,
    CalibMaxTokensOpt,
    CalibSeqLenOpt,
    ChatTemplateOpt,
    DryRunOpt,
    FieldOpt,
    ForceOpt,
    JsonOpt,
    MaxShardSizeOpt,
    OutArg,
    ProfileDataOpt,
    QuantizeProfileOpt,
    TokenIdsOpt,
    calibration_options,
    refuse_unused_calibration,
)
from moetool.cli.output import emit_json, esc, size, stdout
from moetool.errors import UsageError


def quantize(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, hub id, or a built-in model (builtin:tiny-moe); "
                                         "not a GGUF file (llama-quantize quantizes those).")],
    out: OutArg,
    format: Annotated[str | None, typer.Option("--format", help="Every routed expert's format: nf4 (the "
                                               "default), fp4 (-b32..-b256 block, -dq double quantization), bnb8 "
                                               "(-b<block>), int8/int4/int3/int2 (-g<group>, -sym/-asym), e.g. "
                                               "nf4-b64-dq, int3-g128-asym; fp8 (e4m3 per row, --layout "
                                               "compressed-tensors); keep leaves them as they are (to quantize only "
                                               "what --rules name).")] = None,
    bits_budget: Annotated[float | None, typer.Option(min=1.0, max=32.0, help="Average bits per routed-expert "
                                                      "parameter (scales and state included); each expert's "
                                                      "format is chosen from --candidates.")] = None,
    candidates: Annotated[str | None, typer.Option(help="Formats the budget chooses from (comma-separated; default "
                                                   "int2-g64-asym,int3-g128-asym,int4-g128-asym,nf4-b64-dq,"
                                                   "int8-g128-sym; without nf4-b64-dq for --method gptq; for "
                                                   "compressed-tensors int4-g128-sym,int4-g32-sym,"
                                                   "int8-g128-sym).")] = None,
    budget_scope: Annotated[str, typer.Option(help="global: one budget for all layers; layer: met in every "
                                              "layer.")] = "global",
    policy: Annotated[str | None, typer.Option(help="Expert importance under a budget: uniform, frequency "
                                               "(tokens routed; the default), mass (gate weight) or saliency "
                                               "(REAP).")] = None,
    rules: Annotated[list[str] | None, typer.Option(help="ROLE_OR_REGEX=FORMAT for other weights: attention, "
                                                    "shared_experts, dense_mlp, a role (attn, shared_down) or a "
                                                    "regular expression, searched in the checkpoint's names and "
                                                    "transformers 5's where they differ; comma-separated or "
                                                    "repeated.")] = None,
    profile: QuantizeProfileOpt = None,
    data: ProfileDataOpt = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    chat_template: ChatTemplateOpt = None,
    max_tokens: CalibMaxTokensOpt = None,
    seq_len: CalibSeqLenOpt = None,
    batch_size: CalibBatchSizeOpt = None,
    layout: Annotated[str, typer.Option(help="moetool: every expert quantized (load with moetool.load_model); "
                                        "transformers: what stock transformers 5 + bitsandbytes loads (nf4/fp4; "
                                        "its fused experts stay unquantized); transformers4: experts quantized "
                                        "too, for transformers 4; compressed-tensors: pack-quantized int4/int8 "
                                        "for vLLM (a budget picks one format per MoE layer).")] = "moetool",
    emit_llama_quantize: Annotated[Path | None, typer.Option(**PATH, help="Also write a llama-quantize "
                                                             "--tensor-type-file from the allocation.")] = None,
    method: Annotated[str, typer.Option(help="rtn: round to nearest; gptq: GPTQ per routed expert on the Hessian "
                                        "of the calibration tokens routed to it (integer formats).")] = "rtn",
    sequential: Annotated[bool | None, typer.Option("--sequential/--no-sequential", **FLAG,
                                                    help="gptq: calibrate each layer on the outputs of the earlier "
                                                    "layers as quantized (the default).")] = None,
    act_order: Annotated[bool | None, typer.Option("--act-order/--no-act-order", **FLAG, help="gptq: quantize columns "
                                                   "in descending order of the Hessian's diagonal (static groups, "
                                                   "as llm-compressor does by default; the default).")] = None,
    damp: Annotated[float | None, typer.Option(min=0.0, help="gptq: dampening, a share of the Hessian's mean "
                                               "diagonal (default: 0.01).")] = None,
    min_tokens: Annotated[int | None, typer.Option(min=0, help="gptq: experts routed fewer calibration tokens "
                                                   "have their Hessian blended with their layer's (default: "
                                                   "128).")] = None,
    max_shard_size: MaxShardSizeOpt = "5GB",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
    experts_table: Annotated[bool, typer.Option("--experts", **FLAG, help="List every expert's format, error and "
                                                "size.")] = False,
) -> None:
    """Quantize each routed expert on its own; under --bits-budget, spend bits where routing says they matter."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.quantize import QuantizeOptions
    from moetool.ops.quantize import quantize as run_quantize
    from moetool.runner.distributed import is_primary

    if bits_budget is None and (candidates or policy or budget_scope != "global" or profile):
        raise UsageError("--candidates, --policy, --budget-scope and --profile shape a --bits-budget allocation; "
                         "give --bits-budget")
    if bits_budget is not None and format is not None:
        raise UsageError("--format gives every expert one format, --bits-budget chooses them from --candidates: "
                         "give one of the two")
    gptq_only = {"--sequential/--no-sequential": sequential, "--act-order/--no-act-order": act_order,
                 "--damp": damp, "--min-tokens": min_tokens}
    given = [name for name, value in gptq_only.items() if value is not None]
    if given and method != "gptq":
        raise UsageError(f"{', '.join(given)}: options of --method gptq")
    calibrating = method == "gptq" or bits_budget is not None and profile is None and policy != "uniform"
    refuse_unused_calibration(calibrating, "calibration runs for --method gptq, and for a --bits-budget by "
                              "routing without a --profile", data=data, token_ids=token_ids,
                              chat_template=chat_template, max_tokens=max_tokens, seq_len=seq_len,
                              batch_size=batch_size)
    options = QuantizeOptions(
        format=format or "nf4", bits_budget=bits_budget, candidates=candidates,
        budget_scope=budget_scope, policy=policy or "frequency", rules=tuple(rules or ()), profile=profile,
        calibration=calibration_options(data, token_ids, field, chat_template, max_tokens or 8192, seq_len,
                                        batch_size or 8),
        layout=layout, llama_quantize=emit_llama_quantize, max_shard_size=parse_size(max_shard_size),
        method=method, sequential=sequential is not False, act_order=act_order is not False,
        damp=0.01 if damp is None else damp, min_tokens=128 if min_tokens is None else min_tokens,
        command=shlex.join(["moetool", *sys.argv[1:]]) if sys.argv else "moetool quantize")
    primary = is_primary()   # torchrun: every rank calibrates its share, rank 0 alone writes and prints
    quiet = json_out or not primary
    with open_checkpoint(model) as ckpt:
        bars = _Bars()
        try:
            report = run_quantize(ckpt, out, options, force=force, dry_run=dry_run,
                                  analysis_progress=None if quiet else bars.measuring,
                                  progress=None if quiet else bars.writing)
        finally:
            bars.close()
    if not primary:
        return
    if json_out:
        emit_json(report.to_dict())
        return
    _render(report, dry_run, out, experts_table)


class _Bars:
    """A "measuring" bar while candidate formats are tried, then a "writing" bar; each shown once used."""

    def __init__(self):
        self.label, self.bar = None, None

    def _advance(self, label: str, n: int) -> None:
        if self.label != label:
            self.close()
            self.label, self.bar = label, _Bar(label)
        self.bar.advance(n)

    def measuring(self, n: int) -> None:
        self._advance("measuring", n)

    def writing(self, n: int) -> None:
        self._advance("writing", n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _render(report, dry_run: bool, out: Path, experts_table: bool) -> None:
    formats = ", ".join(f"{fid} x{n}" for fid, n in sorted(report.formats.items()))
    budget = f" (budget {report.bits_budget}, policy {report.policy})" if report.bits_budget else ""
    stdout.print(f"{esc(report.source)} ({report.family}): {len(report.experts)} experts -> {formats}{budget}")
    stdout.print(f"  routed experts: {report.expert_bits:.3f} bits per parameter, {size(report.expert_bytes_before)}"
                 f" -> {size(report.expert_bytes_after)}")
    if report.rule_tensors:
        stdout.print(f"  other weights quantized (by --rules, or the layout): {len(report.rule_tensors)}")
    stdout.print(f"  checkpoint: {size(report.bytes_before)} -> {size(report.bytes_after)}"
                 + ("" if dry_run else f"; written to {esc(str(out))}"))
    if report.llama_quantize:
        stdout.print(f"  llama-quantize tensor types: {esc(report.llama_quantize)}" + (" (not written: dry run)"
                                                                                  if dry_run else ""))
    if report.coverage:
        counts = [n for layer in report.coverage.values() for n in layer]
        stdout.print(f"  gptq: calibration tokens routed per expert: min {min(counts):,}, median "
                     f"{sorted(counts)[len(counts) // 2]:,}, max {max(counts):,} (--experts for each)")
    if experts_table:
        columns = ("layer", "expert", "format", "bits", "rel. error", "importance", "bytes")
        table = Table(*columns, *(("tokens",) if report.coverage else ()))
        for e in report.experts:
            tokens = report.coverage.get(e.layer)
            table.add_row(str(e.layer), str(e.expert), e.format, f"{e.bits:.3f}",
                          "" if e.rel_error is None else f"{e.rel_error:.4f}",
                          "" if e.importance is None else f"{e.importance:.3f}", f"{e.bytes:,}",
                          *((f"{tokens[e.expert]:,}" if tokens else "",) if report.coverage else ()))
        stdout.print(table)
    for warning in report.warnings:
        stdout.print(f"[yellow]warning[/] {esc(warning)}")
