"""Mistral Large 4 (Mistral-Large-4-1T-A52B): an image-text wrapper (MistralLarge4ForConditionalGeneration, the only
class transformers runs its text model with; text_config model_type "mistral_large4_text") around Mistral 4's MoE
block: a softmax router in fp32, groups ranked by the sum of their best two scores, weights always renormalised,
x routed_scaling_factor; n_shared_experts shared experts; dense layers by mlp_layer_types (first_k_dense_replace).
Its attention (DSA-indexed MLA with KV sharing between layers, softmax scaling, LeRoPE, NoPE layers) and softcapped
logits are transformers'.

The hub names are Mistral's own, without model.: tok_embeddings, layers.{L}.attention.wq, .experts.{E}.w1/w2/w3
(gate/down/up), .shared_experts.w1, .feed_forward.w1 (dense), .gate, output, norm, lerope.alpha. transformers renames
the root prefix and the infixes (layers.{L}.gate -> model.language_model.layers.{L}.mlp.gate), so moetool's names in
transformers' form take its held prefix (Family.held_prefixes), and the hub's form the hub's. The vision tower and
projector (vision_encoder.*, vision_language_adapter.*, patch_merger.*, pre_mm_projector_norm) keep their hub names:
transformers' conversion renames them and permutes the tower's wq/wk for RoPE as it loads them (the runner's
load_unnamed). mtp_dspark.* (a draft head) transformers ignores."""

from dataclasses import replace

from moetool.arch.families._shared import first_k_dense, mlp_layer_types
from moetool.arch.families.mistral4 import FAMILY as MISTRAL4
from moetool.arch.schema import Role

L = "model.layers.{L}."
SHARED = (("w1", "gate_proj", Role.SHARED_GATE, Role.DENSE_GATE),   # (hub, held, shared role, dense role)
          ("w2", "down_proj", Role.SHARED_DOWN, Role.DENSE_DOWN), ("w3", "up_proj", Role.SHARED_UP, Role.DENSE_UP))
HELD_AND_HUB = {   # (transformers 5's name, the hub's), in template form
    Role.ROUTER: (f"{L}mlp.gate.weight", f"{L}gate.weight"),
    **{shared: (f"{L}mlp.shared_experts.{proj}.weight", f"{L}shared_experts.{w}.weight")
       for w, proj, shared, _ in SHARED},
    **{dense: (f"{L}mlp.{proj}.weight", f"{L}feed_forward.{w}.weight") for w, proj, _, dense in SHARED},
}
# transformers' mistral_large4_text renames, chained, as (hub infix, held infix); the more specific first (one a name)
ATTENTION = tuple((f".attention.{hub}", f".self_attn.{held}") for hub, held in (
    ("indexer.ssmax_scaling.s", "indexer.softmax_scaling.scale"),
    ("indexer.ssmax_scaling.b", "indexer.softmax_scaling.bias"),
    ("indexer.", "indexer."), ("ssmax_scaling.s", "softmax_scaling.scale"), ("ssmax_scaling.b", "softmax_scaling.bias"),
    ("wq.", "q_proj."), ("wkv_a_with_mqa.", "kv_a_proj_with_mqa."), ("wkv_b.", "kv_b_proj."), ("wo.", "o_proj."),
    ("kv_a_norm.", "kv_a_layernorm.")))
MLPS = ((".gate.weight", ".mlp.gate.weight"),
        *((f".shared_experts.{w}.", f".mlp.shared_experts.{proj}.") for w, proj, _, _ in SHARED),
        *((f".feed_forward.{w}.", f".mlp.{proj}.") for w, proj, _, _ in SHARED))

FAMILY = replace(
    MISTRAL4, name="mistral_large4", model_types=("mistral_large4",), title="Mistral Large 4",
    router=replace(MISTRAL4.router, renormalize=True, notes="softmax in fp32; groups ranked by the sum of their "
                   "top-2 scores; always renormalised", config_defaults=(   # MistralLarge4TextConfig's
                       ("n_group", 1), ("topk_group", 1), ("routed_scaling_factor", 1.0))),
    common={**MISTRAL4.common, **HELD_AND_HUB},
    per_expert={Role.EXPERT_GATE: L + "experts.{E}.w1.weight", Role.EXPERT_UP: L + "experts.{E}.w3.weight",
                Role.EXPERT_DOWN: L + "experts.{E}.w2.weight"},
    is_moe_layer=mlp_layer_types(first_k_dense),
    fp32_roles=frozenset({Role.ROUTER}),
    fp32_suffixes=("rotary_emb.alpha", "lerope.alpha"),   # (transformers keeps rotary_emb in fp32, strictly)
    defaults=(("first_k_dense_replace", 1), ("n_shared_experts", 1), ("moe_intermediate_size", 6144),
              ("intermediate_size", 24576)),   # MistralLarge4TextConfig's
    name_prefixes=(("model.language_model.", "model."), ("layers.", "model.layers."),
                   ("tok_embeddings.", "model.embed_tokens."), ("norm.", "model.norm."), ("output.", "lm_head."),
                   ("lerope.", "model.rotary_emb.")),
    held_prefixes=(("layers.", "model.language_model.layers."),),
    router_module="model.language_model.layers.{L}.mlp.gate",   # in the wrapper transformers builds
    experts_module="model.language_model.layers.{L}.mlp.experts",
    mtp=True,   # (mtp_dspark.*, a draft head transformers does not build)
    renames=(*ATTENTION, (".attention_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
             *MLPS),
    notes="image-text wrapper; DSA-indexed MLA with KV sharing and softmax scaling, LeRoPE (lerope.alpha), logits "
          "softcapped; hub names Mistral's own; vision tensors (vision_encoder.*, vision_language_adapter.*, "
          "patch_merger.*, pre_mm_projector_norm) are not the text model's; mtp_dspark.* is ignored by transformers",
)
