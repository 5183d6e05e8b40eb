"""`moetool upcycle`: parse options, plan, show or write, render."""

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from moetool.checkpoint.writer import refuse_inside_source
from moetool.cli.convert import _Bar, parse_size
from moetool.cli.options import FLAG, PATH, DryRunOpt, ForceOpt, MaxShardSizeOpt, OutArg
from moetool.cli.output import emit_json, esc, report_json, size, stdout
from moetool.errors import UsageError


def _parse_layers(text: str | None, count: int | None = None) -> list[int] | None:
    """"all", "every:K" (layers K-1, 2K-1, ...) or a comma list "1,3,5"."""
    if text in (None, "all"):
        return None
    try:
        if text.startswith("every:"):
            step = int(text.split(":", 1)[1])
            if step < 1:
                raise ValueError
            return list(range(step - 1, count or 10_000, step))
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--layers {text!r}: use all, every:K (K >= 1), or a comma-separated list") from None


def upcycle(
    dense: Annotated[str, typer.Argument(help="Dense checkpoint (Llama, Mistral, Qwen2, Qwen3, Gemma 1/2/3), "
                                         "hub id or builtin:tiny-dense.")],
    out: OutArg,
    experts: Annotated[int, typer.Option(min=1, help="Experts per MoE layer (before --granularity).")] = 8,
    top_k: Annotated[int, typer.Option(min=1, help="Experts per token (before --granularity).")] = 2,
    family: Annotated[str | None, typer.Option(help="Target family (default: mixtral for Llama, Mistral and "
                                               "Gemma, qwen2_moe for Qwen2, qwen3_moe for Qwen3; Llama and "
                                               "Mistral also take glm4_moe or olmoe).")] = None,
    router_init: Annotated[str, typer.Option(help="random, zeros, hidden-kmeans (k-means centroids of the MLP "
                                             "inputs of --data) or prompts (each expert's mean over its "
                                             "--prompts).")] = "random",
    data: Annotated[Path | None, typer.Option(**PATH, help="Calibration text for hidden-kmeans (default: the built-in "
                                              "corpus).")] = None,
    prompts: Annotated[Path | None, typer.Option(**PATH, help="For --router-init prompts: a JSON list with one list of "
                                                 "prompts per expert.")] = None,
    router_std: Annotated[float, typer.Option(min=0.0, help="Standard deviation of a random router.")] = 0.02,
    noise: Annotated[float, typer.Option(min=0.0, help="Relative Gaussian noise on each expert copy.")] = 0.0,
    drop_ratio: Annotated[float, typer.Option(min=0.0, max=1.0, help="Drop-Upcycling: share of each expert's "
                                              "neurons re-initialised.")] = 0.0,
    granularity: Annotated[int, typer.Option(min=1, help="Split each FFN into G segments (N*G experts, "
                                             "top-k K*G), output unchanged at init.")] = 1,
    layers: Annotated[str | None, typer.Option(help="MoE layers: all, every:K, or a list like 1,3,5 "
                                               "(families with dense layers).")] = None,
    shared_experts: Annotated[int, typer.Option(min=0, help="Qwen2-MoE and GLM-4.5 targets: a shared expert of "
                                                "this many times the FFN size, starting as the dense MLP.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the router, noise and dropped neurons.")] = 0,
    also: Annotated[list[str] | None, typer.Option("--from", help="More dense sources of the same architecture "
                                                   "(repeat): expert e comes from source e mod the number of "
                                                   "sources (Branch-Train-MiX).")] = None,
    average_shared: Annotated[bool, typer.Option("--average-shared", **FLAG, help="With --from: average attention, "
                                                 "norms and embeddings over the sources (default: the "
                                                 "first's).")] = False,
    max_shard_size: MaxShardSizeOpt = "5GB",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_out: Annotated[bool, typer.Option("--json", **FLAG, help="Print the plan or report as JSON.")] = False,
) -> None:
    """Turn a dense model into an MoE whose experts start as copies of its MLP."""
    from contextlib import ExitStack

    from moetool.checkpoint import open_checkpoint
    from moetool.ops.upcycle import UpcycleOptions, plan_upcycle
    from moetool.ops.upcycle import upcycle as run_upcycle

    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(dense))
        others = [stack.enter_context(open_checkpoint(path)) for path in also or []]
        count = (ckpt.config or {}).get("num_hidden_layers")
        options = UpcycleOptions(experts=experts, top_k=top_k, target=family, router_init=router_init,
                                 router_std=router_std, noise=noise, drop_ratio=drop_ratio, granularity=granularity,
                                 layers=_parse_layers(layers, count), seed=seed, data=data, prompts=prompts,
                                 average_shared=average_shared, shared_experts=shared_experts,
                                 max_shard_size=parse_size(max_shard_size),
                                 command=shlex.join(["moetool", *sys.argv[1:]]))
        if dry_run:   # the checks of OUT the run makes first, but for an existing OUT (the run needs --force)
            refuse_inside_source(out, ckpt, *others)
            summary = plan_upcycle(ckpt, options, others).summary()
        else:
            bar = None if json_out else _Bar()
            try:
                summary = run_upcycle(ckpt, out, options, force=force, progress=bar.advance if bar else None,
                                      others=others)
            finally:
                if bar:
                    bar.close()
    if json_out:
        emit_json(report_json(summary, None if dry_run else out))
        return
    stdout.print(f"{esc(summary['source'])} ({summary['source_family']}) -> {summary['target_family']}: "
                 f"{summary['experts']} experts, top-{summary['top_k']}, MoE layers {summary['moe_layers']}, "
                 f"{summary['tensors']} tensors, {size(summary['output_bytes'])}"
                 + ("" if dry_run else f", written to {esc(str(out))} in {summary['seconds']} s"))
    for warning in summary["warnings"]:
        stdout.print(f"[yellow]warning[/] {esc(warning)}")
