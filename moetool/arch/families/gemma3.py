from moetool.arch.families._shared import dense_family

FAMILY = dense_family(
    name="gemma3",
    title="Gemma 3 (dense, text)",
    model_types=('gemma3', 'gemma3_text'),
    config_root="text_config",
    name_prefixes=(("language_model.", ""), ("model.language_model.", "model.")),
)
