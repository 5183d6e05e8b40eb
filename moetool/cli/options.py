"""Options shared by the commands that run a model (profile, eval): one definition each."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from moetool.errors import UsageError


def _path(value: str) -> Path:
    """A path option's value. An empty one is refused here, since pathlib reads "" as the current folder."""
    if not value:
        raise typer.BadParameter("an empty path")
    return Path(value)


PATH = {"parser": _path, "metavar": "<path>"}   # every Path option and argument: non-empty, shown as before
FLAG = {"metavar": " "}   # flags take no value: no "<bool>" beside them in --help

class Mode(str, Enum):
    auto = "auto"
    full = "full"
    streamed = "streamed"


ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, .gguf file, hub id, or a built-in model "
                                         "(builtin:tiny-moe).")]
TokenIdsOpt = Annotated[Path | None, typer.Option(**PATH, help="Token ids (JSON list or whitespace-separated) "
                                                  "instead of text, for models without a tokenizer.")]
DataOpt = Annotated[Path | None, typer.Option(**PATH, help="Calibration data: .txt/.md, .jsonl, .parquet, .arrow, a "
                                              "folder of them, a dataset saved with datasets' save_to_disk, or "
                                              "builtin / builtin:heldout (the built-in sample corpus).")]
FieldOpt = Annotated[str, typer.Option(help="Field (column) of .jsonl/parquet/arrow records: text, or chat "
                                       "messages with --chat-template.")]
ChatTemplateOpt = Annotated[str | None, typer.Option(help="Records are chat messages: render them with the "
                                                     "model's chat template (model) or a Jinja template FILE.")]
OffloadDirOpt = Annotated[Path | None, typer.Option(**PATH, help="Streamed mode: hidden states that do not fit on the "
                                                    "device go to files here instead of host memory (default: "
                                                    "host memory, then a temporary folder).")]
DeviceMapOpt = Annotated[str | None, typer.Option(help="Full mode: auto spreads the model over the node's GPUs "
                                                  "(accelerate's dispatch).")]
SeqLenOpt = Annotated[int, typer.Option(min=2, help="Tokens per sequence.")]
MaxTokensOpt = Annotated[int, typer.Option(min=2, help="Use at most this many tokens.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Sequences per micro-batch (each layer runs one at a time).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")]
ModeOpt = Annotated[Mode, typer.Option(help="full: whole model on the device; streamed: one decoder layer at a "
                                       "time; auto: by free memory.")]
JsonOpt = Annotated[bool, typer.Option("--json", **FLAG, help="Print the report as JSON (schema in README).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", **FLAG, help="Allow the model's own code from "
                                                  "the hub.")]

# options of the commands that write a checkpoint (convert, upcycle, prune)
OutArg = Annotated[Path, typer.Argument(help="Output folder (written atomically).")]
MaxShardSizeOpt = Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", **FLAG, help="Print the plan; write nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", **FLAG, help="Replace OUT if it exists.")]

# where routing statistics come from (prune, quantize)
PruneProfileOpt = Annotated[Path | None, typer.Option("--profile", **PATH, help="A `moetool profile --json` file of "
                                                      "this model instead of calibrating here (profiled with "
                                                      "--saliency for reap and ean).")]
QuantizeProfileOpt = Annotated[Path | None, typer.Option("--profile", **PATH, help="A `moetool profile --json` file "
                                                         "of this model instead of calibrating here (profiled "
                                                         "with --saliency for the saliency policy).")]
ProfileDataOpt = Annotated[Path | None, typer.Option("--data", **PATH, help="Without --profile: calibration data "
                                                     "to profile (formats as for moetool profile; default: the "
                                                     "built-in corpus).")]


# calibration data of the writing commands that profile first (prune, quantize)
CalibSeqLenOpt = Annotated[int | None, typer.Option(min=2, help="Tokens per calibration sequence (default: 256, "
                                                    "or the model's maximum positions if fewer).")]
CalibMaxTokensOpt = Annotated[int | None, typer.Option(min=2, help="Calibrate on at most this many tokens "
                                                       "(default: 8192).")]
CalibBatchSizeOpt = Annotated[int | None, typer.Option(min=1, help="Sequences per micro-batch (default: 8).")]


def refuse_unused_calibration(calibrating: bool, why: str, *, data, token_ids, chat_template, max_tokens,
                               seq_len, batch_size) -> None:
    """A writing command's calibration options given where nothing is calibrated (WHY says when it is):
    a usage error, not silently ignored."""
    given = {"--data/--token-ids": data or token_ids, "--chat-template": chat_template,
             "--max-tokens": max_tokens, "--seq-len": seq_len, "--batch-size": batch_size}
    named = [name for name, value in given.items() if value is not None]
    if named and not calibrating:
        raise UsageError(f"{', '.join(named)}: nothing is calibrated here ({why})")


def calibration_options(data, token_ids, field, chat_template, max_tokens, seq_len, batch_size):
    """The ProfileOptions of a writing command's calibration run (prune, quantize)."""
    from moetool.ops.profile import ProfileOptions

    return ProfileOptions(data=data, token_ids=token_ids, field=field, chat_template=chat_template,
                          max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
