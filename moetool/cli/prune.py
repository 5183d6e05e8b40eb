"""`moetool prune`: parse options, choose experts, write, render."""

from typing import Annotated

import typer

from moetool.cli.convert import _Bar, parse_size
from moetool.cli.options import (
    FLAG,
    CalibBatchSizeOpt,
    CalibMaxTokensOpt,
    CalibSeqLenOpt,
    ChatTemplateOpt,
    DryRunOpt,
    FieldOpt,
    ForceOpt,
    JsonOpt,
    MaxShardSizeOpt,
    ModelArg,
    OutArg,
    ProfileDataOpt,
    PruneProfileOpt,
    TokenIdsOpt,
    calibration_options,
    refuse_unused_calibration,
)
from moetool.cli.output import PassProgress, emit_json, esc, size, stdout


class _LazyBar:
    """The writing bar, shown from its first bytes, once the calibration's bars (BEFORE) are closed."""

    def __init__(self, before: PassProgress):
        self.bar, self.before = None, before

    def advance(self, n: int) -> None:
        if self.bar is None:
            self.before.close()
            self.bar = _Bar()
        self.bar.advance(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def prune(
    model: ModelArg,
    out: OutArg,
    keep: Annotated[int | None, typer.Option(min=1, help="Experts kept in every MoE layer.")] = None,
    ratio: Annotated[float | None, typer.Option(min=0.0, max=1.0, help="Share of each layer's experts "
                                                "removed.")] = None,
    experts: Annotated[str | None, typer.Option(help="The experts kept in each MoE layer, every one listed, "
                                                "e.g. 0:1,2,5;1:0,3,4 (instead of --keep/--ratio).")] = None,
    criterion: Annotated[str, typer.Option(help="frequency (tokens routed), soft-count (gate-weight mass), reap "
                                           "(gate weight x output norm), ean (output norm), weight-norm or "
                                           "random.")] = "frequency",
    profile: PruneProfileOpt = None,
    data: ProfileDataOpt = None,
    token_ids: TokenIdsOpt = None,
    field: FieldOpt = "text",
    chat_template: ChatTemplateOpt = None,
    max_tokens: CalibMaxTokensOpt = None,
    seq_len: CalibSeqLenOpt = None,
    batch_size: CalibBatchSizeOpt = None,
    scope: Annotated[str, typer.Option(help="per-layer: the same count in every layer (stock transformers loads "
                                       "it); global: experts ranked across layers (load with "
                                       "moetool.load_model).")] = "per-layer",
    merge: Annotated[bool, typer.Option("--merge", **FLAG, help="Fold each removed expert into its most similar kept "
                                        "expert (routing-mass-weighted average) instead of dropping it.")] = False,
    sequential: Annotated[bool, typer.Option("--sequential", **FLAG, help="Score each layer on the outputs of the "
                                             "already-pruned (or merged) earlier layers, layer by layer on "
                                             "the calibration data.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random criterion.")] = 0,
    max_shard_size: MaxShardSizeOpt = "5GB",
    dry_run: DryRunOpt = False,
    force: ForceOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Remove the least important experts of every MoE layer."""
    from moetool.checkpoint import open_checkpoint
    from moetool.ops.prune import prune as run_prune
    from moetool.ops.prune_choice import PruneOptions, calibrates, parse_experts
    from moetool.runner.distributed import is_primary

    options = PruneOptions(keep=keep, ratio=ratio, experts=parse_experts(experts) if experts else None,
                           criterion=criterion, profile=profile,
        calibration=calibration_options(data, token_ids, field, chat_template, max_tokens or 8192, seq_len,
                                        batch_size or 8),
        seed=seed, merge=merge, scope=scope, sequential=sequential,
                           max_shard_size=parse_size(max_shard_size))
    refuse_unused_calibration(calibrates(options), "a --profile gives the routing; --experts, weight-norm and "
                              "random need none", data=data, token_ids=token_ids, chat_template=chat_template,
                              max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    primary = is_primary()
    dry_run = dry_run or not primary   # torchrun: every rank calibrates, rank 0 alone writes and prints
    with open_checkpoint(model) as ckpt:
        passes = PassProgress(enabled=primary and not json_out)   # the calibration, layer by layer
        bar = None if json_out or dry_run else _LazyBar(passes)
        try:
            with passes:
                report = run_prune(ckpt, out, options, force=force, dry_run=dry_run,
                                   progress=bar.advance if bar else None, analysis_progress=passes.update)
        finally:
            if bar:
                bar.close()
    if not primary:
        return
    if json_out:
        emit_json(report.to_dict())
        return
    mass = "" if report.routing_mass_removed is None else f", {report.routing_mass_removed:.1%} of the routing mass"
    stdout.print(f"{esc(report.source)}: {report.experts_before} -> {report.experts_after_text} experts per layer "
                 f"({report.criterion}), top-{report.top_k}; {report.params_removed:,} parameters and "
                 f"{size(report.bytes_removed)} removed{mass}" + ("" if dry_run else f"; written to {esc(str(out))}"))
    for layer, kept in report.kept.items():
        stdout.print(f"  layer {layer}: kept {kept}")
    for warning in report.warnings:
        stdout.print(f"[yellow]warning[/] {esc(warning)}")
