"""Qwen3-Omni-MoE (Qwen3-Omni-30B-A3B: Instruct, Thinking, Captioner): its thinker's text model is Qwen3-MoE's
(softmax router, norm_topk_prob, no shared expert, mlp_only_layers dense), nested two configs deep
(thinker_config.text_config; a thinker saved alone, model_type qwen3_omni_moe_thinker: text_config). moetool's
family is the thinker's text MoE: the runner builds the thinker (Qwen3OmniMoeThinkerForConditionalGeneration,
text logits; transformers loads it alone from the whole checkpoint). The hub stores it under thinker.model.
(experts one tensor each) beside thinker.audio_tower. and thinker.visual.; transformers 5 holds and saves them
under thinker.model.language_model. / thinker.model.audio_tower. / thinker.model.visual. (fused experts).
Every other tensor is another tower, carried through as stored: the audio and vision encoders and the whole
talker (talker.*: a second MoE decoder, with a shared expert, that speaks the thinker's hidden states) and
code2wav (the vocoder); moetool neither prunes nor quantizes them, and inspect counts them as "other"."""

from dataclasses import replace

from moetool.arch.families._shared import in_wrapper
from moetool.arch.families.qwen3_moe import FAMILY as QWEN3_MOE

FAMILY = replace(
    in_wrapper(QWEN3_MOE, name="qwen3_omni_moe", model_types=("qwen3_omni_moe", "qwen3_omni_moe_thinker"),
               title="Qwen3-Omni-MoE (thinker)",
               # (Qwen3OmniMoeTextConfig's default)
               router=replace(QWEN3_MOE.router, config_defaults=(("norm_topk_prob", True),)),
               root_keys=("tie_word_embeddings",), defaults=(("tie_word_embeddings", False),),   # the thinker's own
               # templates name the thinker as transformers builds it alone; first rewrite that fits wins
               name_prefixes=(("thinker.model.language_model.", "model.language_model."),
                              ("thinker.model.audio_tower.", "model.audio_tower."),
                              ("thinker.model.visual.", "model.visual."),
                              ("thinker.audio_tower.", "model.audio_tower."), ("thinker.visual.", "model.visual."),
                              ("thinker.model.", "model.language_model."), ("thinker.lm_head.", "lm_head.")),
               notes="the thinker's text MoE; audio and vision towers, talker (its own MoE) and code2wav are "
                     "other towers, carried through unchanged"),
    config_root=("thinker_config.text_config", "text_config"),
)
