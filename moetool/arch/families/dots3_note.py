"""dots.llm3 Note (text model dots3_note_text; the image-audio-text wrapper dots3_note, whose text config is
text_config and tensors model.language_model.*): dots1's DeepSeek-V3 names, group-limited sigmoid router
(fp32 weight and correction bias, weights x routed_scaling_factor) and shared experts, whose FFN size is
shared_experts_intermediate_size (raw configs: moe_shared_expert_intermediate_size) x n_shared_experts.
Which layers are MoE: mlp_layer_types, else first_k_dense_replace (1) and moe_layer_freq (an int step
or a per-layer list) of a raw config.json. MLA with an indexer and sliding-window layers."""

from dataclasses import replace

from moetool.arch.families.dots1 import FAMILY as DOTS1
from moetool.arch.schema import Config


def _moe_layer(cfg: Config, layer: int) -> bool:
    """Dots3NoteTextConfig: mlp_layer_types, else first_k_dense_replace and moe_layer_freq."""
    types = cfg.get("mlp_layer_types")
    if types is not None:
        return layer < len(types) and types[layer] == "sparse"
    first = cfg.get("first_k_dense_replace")
    freq = cfg.get("moe_layer_freq")
    freq = 1 if freq is None else freq
    if layer < (1 if first is None else first):
        return False
    if isinstance(freq, list):
        return layer < len(freq) and bool(freq[layer])
    return layer % freq == 0


def _shared_ffn(cfg: Config) -> int:
    size = cfg.get("shared_experts_intermediate_size")
    size = cfg.get("moe_shared_expert_intermediate_size") if size is None else size
    return (1536 if size is None else size) * (cfg.get("n_shared_experts") or 0)


FAMILY = replace(
    DOTS1, name="dots3_note", model_types=("dots3_note_text", "dots3_note"), title="dots.llm3 Note (text)",
    # Dots3NoteTextConfig's defaults
    router=replace(DOTS1.router, config_defaults=(("n_group", 1), ("topk_group", 1), ("norm_topk_prob", True),
                                                  ("routed_scaling_factor", 1.0))),
    is_moe_layer=_moe_layer,
    shared_ffn=_shared_ffn,
    defaults=(("n_shared_experts", 1),),
    config_root="text_config",
    name_prefixes=(("model.language_model.", "model."),),
    mtp=True,
    buffer_suffixes=(".mlp.router_bias", ".mlp.gate.e_score_correction_bias"),   # the wrapper's vision experts'
    notes="MLA with a DSA indexer (indexed_attention) and sliding-window MLA layers; layers past "
          "num_hidden_layers and mtp.* tensors are ignored by transformers; the wrapper's vision and audio towers "
          "are not the text model's",
)
