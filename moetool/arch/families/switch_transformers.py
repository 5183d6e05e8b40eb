from moetool.arch.schema import Config, Family, Role, Router


def switch_sparse(cfg: Config, layer: int) -> bool:
    n_enc = cfg.get("num_layers") or 0
    if layer < n_enc:
        step, index = cfg.get("encoder_sparse_step") or 0, layer
    else:
        step, index = cfg.get("decoder_sparse_step") or 0, layer - n_enc
    return (index % step == 1 or step == 1) if step > 0 else False


ENC = "encoder.block.{L}.layer.1.mlp"
DEC = "decoder.block.{D}.layer.2.mlp"
FAMILY = Family(
    name="switch_transformers",
    model_types=("switch_transformers",),
    title="Switch Transformers (encoder-decoder)",
    router=Router("softmax", renormalize=False,
                  notes="top-1 with per-sequence expert capacity; overflow tokens skip the experts"),
    keys={"num_layers": ("num_layers",), "hidden": ("d_model",), "vocab": ("vocab_size",),
          "tie": ("tie_word_embeddings",), "num_experts": ("num_experts",),
          "expert_ffn": ("d_ff",), "dense_ffn": ("d_ff",)},
    common={Role.EMBED: "shared.weight", Role.LM_HEAD: "lm_head.weight",
            Role.ROUTER: (f"{ENC}.router.classifier.weight", f"{DEC}.router.classifier.weight"),
            Role.DENSE_UP: (f"{ENC}.wi.weight", f"{DEC}.wi.weight"),
            Role.DENSE_DOWN: (f"{ENC}.wo.weight", f"{DEC}.wo.weight")},
    per_expert={Role.EXPERT_UP: (ENC + ".experts.expert_{E}.wi.weight", DEC + ".experts.expert_{E}.wi.weight"),
                Role.EXPERT_DOWN: (ENC + ".experts.expert_{E}.wo.weight", DEC + ".experts.expert_{E}.wo.weight")},
    fused=None,
    is_moe_layer=switch_sparse,
    num_layers=lambda cfg: (cfg.get("num_layers") or 0) + (cfg.get("num_decoder_layers") or cfg.get("num_layers") or 0),
    decoder_offset=lambda cfg: cfg.get("num_layers") or 0,
    top_k=lambda cfg: 1,
    notes="layers 0..num_layers-1 are the encoder, the rest the decoder",
    router_module=(f"{ENC}.router", f"{DEC}.router"),
    router_output="switch",
    experts_module=None,
)
