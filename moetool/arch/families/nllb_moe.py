from moetool.arch.schema import Config, Family, Role, Router


def nllb_sparse(cfg: Config, layer: int) -> bool:
    n_enc = cfg.get("encoder_layers") or 0
    if layer < n_enc:
        step, index = cfg.get("encoder_sparse_step") or 0, layer
    else:
        step, index = cfg.get("decoder_sparse_step") or 0, layer - n_enc
    return (index + 1) % step == 0 if step > 0 else False


ENC = "model.encoder.layers.{L}.ffn"
DEC = "model.decoder.layers.{D}.ffn"


def both(suffix: str) -> tuple[str, str]:
    return ENC + suffix, DEC + suffix


FAMILY = Family(
    name="nllb_moe",
    model_types=("nllb-moe", "nllb_moe"),
    title="NLLB-MoE (encoder-decoder)",
    router=Router("softmax", renormalize=True,
                  notes="top-2 with expert capacity; eval output scaled by 1 - moe_token_dropout"),
    keys={"num_layers": ("encoder_layers",), "hidden": ("d_model",), "vocab": ("vocab_size",),
          "tie": ("tie_word_embeddings",), "num_experts": ("num_experts",),
          "expert_ffn": ("encoder_ffn_dim",), "dense_ffn": ("encoder_ffn_dim",)},
    common={Role.EMBED: "model.shared.weight", Role.LM_HEAD: "lm_head.weight",
            Role.ROUTER: both(".router.classifier.weight"),
            Role.DENSE_UP: both(".fc1.weight"), Role.DENSE_UP_BIAS: both(".fc1.bias"),
            Role.DENSE_DOWN: both(".fc2.weight"), Role.DENSE_DOWN_BIAS: both(".fc2.bias")},
    per_expert={Role.EXPERT_UP: both(".experts.expert_{E}.fc1.weight"),
                Role.EXPERT_UP_BIAS: both(".experts.expert_{E}.fc1.bias"),
                Role.EXPERT_DOWN: both(".experts.expert_{E}.fc2.weight"),
                Role.EXPERT_DOWN_BIAS: both(".experts.expert_{E}.fc2.bias")},
    fused=None,
    is_moe_layer=nllb_sparse,
    num_layers=lambda cfg: (cfg.get("encoder_layers") or 0) + (cfg.get("decoder_layers") or 0),
    decoder_offset=lambda cfg: cfg.get("encoder_layers") or 0,
    top_k=lambda cfg: 2,
    notes="layers 0..encoder_layers-1 are the encoder, the rest the decoder",
    router_module=both(".router"),
    router_output="nllb",
    experts_module=None,
)
