from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="qwen3",
    title="Qwen3 (dense)",
    model_types=('qwen3',),
)
