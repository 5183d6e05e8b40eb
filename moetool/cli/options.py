"""Options shared by the commands that run a model (profile, eval): one definition each."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Mode(str, Enum):
    auto = "auto"
    full = "full"
    streamed = "streamed"


ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, hub id, or builtin:tiny-moe (the default).")]
TokenIdsOpt = Annotated[Path | None, typer.Option(help="Token ids (JSON list or whitespace-separated) instead of "
                                                  "text, for models without a tokenizer.")]
FieldOpt = Annotated[str, typer.Option(help="Text field of .jsonl records.")]
SeqLenOpt = Annotated[int, typer.Option(min=2, help="Tokens per sequence.")]
MaxTokensOpt = Annotated[int, typer.Option(min=2, help="Use at most this many tokens.")]
BatchSizeOpt = Annotated[int, typer.Option(min=1, help="Sequences per forward pass (full mode).")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32.")]
ModeOpt = Annotated[Mode, typer.Option(help="full: whole model on the device; streamed: one decoder layer at a "
                                       "time; auto: by free memory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON (schema in README).")]
TrustRemoteCodeOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own code from "
                                                  "the hub.")]

# options of the commands that write a checkpoint (convert, upcycle, prune)
OutArg = Annotated[Path, typer.Argument(help="Output folder (written atomically).")]
MaxShardSizeOpt = Annotated[str, typer.Option(help="Largest shard, e.g. 5GB, 500MB, 2GiB.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")]

# where routing statistics come from (prune, quantize)
ProfileFileOpt = Annotated[Path | None, typer.Option("--profile", help="A `moetool profile --json` file (with "
                                                     "--saliency for reap, ean and the saliency policy).")]
ProfileDataOpt = Annotated[Path | None, typer.Option("--data", help="Without --profile: text to profile "
                                                     "(default: the built-in corpus).")]
