from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="gemma2",
    title="Gemma 2 (dense)",
    model_types=('gemma2',),
)
