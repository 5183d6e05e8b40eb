from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="qwen2",
    title="Qwen2 (dense)",
    model_types=('qwen2',),
)
