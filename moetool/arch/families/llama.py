from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="llama",
    title="Llama (dense)",
    model_types=('llama',),
)
