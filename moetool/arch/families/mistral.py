from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="mistral",
    title="Mistral (dense)",
    model_types=('mistral',),
)
