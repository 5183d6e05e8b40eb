from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="gemma",
    title="Gemma (dense)",
    model_types=('gemma',),
)
