"""GLM-4.5V / GLM-4.6V: GLM-4.5's text model (sigmoid router with correction bias, groups, shared expert,
first_k_dense_replace dense layers) inside the image-text wrapper Glm4vMoeForConditionalGeneration, which
transformers alone runs; the text model's tensors live under model.language_model., the vision tower's
under model.visual. Hub experts are one tensor per expert, fused on load as GLM-4.5's."""

from moetool.arch.families._shared import in_wrapper
from moetool.arch.families.glm4_moe import FAMILY as GLM4_MOE

FAMILY = in_wrapper(GLM4_MOE, name="glm4v_moe", model_types=("glm4v_moe",), title="GLM-4.5V / 4.6V",
                    defaults=(("first_k_dense_replace", 1), ("n_shared_experts", 1)),   # Glm4vMoeTextConfig's
                    notes="image-text wrapper; vision tensors (model.visual.*) are not the text model's; "
                          "layers past num_hidden_layers are MTP modules")
