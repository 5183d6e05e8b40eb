"""Checkpoints with multi-token-prediction (MTP) modules, as DeepSeek-V3, GLM-4.5 and Kimi-K2 ship them:
layer num_hidden_layers (and on) is a whole extra decoder layer with its own routed experts, which
transformers neither loads nor runs. prune drops it (its experts cannot be chosen alike: no routing
reaches them) and quantize keeps it as it is; either way the rest equals what the same command makes
of the checkpoint without the MTP layer."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moetool.checkpoint import open_checkpoint
from moetool.ops.profile import ProfileOptions
from moetool.ops.prune import PruneOptions, prune
from moetool.ops.quantize import QuantizeOptions, quantize

MTP = "model.layers.3."


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(without, with): a tiny DeepSeek-V3 of 8 experts, and the same plus one MTP layer."""
    import transformers

    root = tmp_path_factory.mktemp("mtp")
    cfg = transformers.DeepseekV3Config(
        vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=12,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)
    torch.manual_seed(0)
    plain = root / "plain"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(plain, save_original_format=True)
    with_mtp = root / "mtp"
    shutil.copytree(plain, with_mtp)
    state = load_file(with_mtp / "model.safetensors")
    for name in list(state):   # the MTP layer: a decoder layer like the last, plus its own projections
        if name.startswith("model.layers.2."):
            state[MTP + name.removeprefix("model.layers.2.")] = state[name] + 0.01
    state |= {MTP + "enorm.weight": torch.ones(32), MTP + "hnorm.weight": torch.ones(32),
              MTP + "eh_proj.weight": torch.randn(32, 64), MTP + "shared_head.norm.weight": torch.ones(32),
              MTP + "shared_head.head.weight": torch.randn(64, 32)}
    save_file(state, with_mtp / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((with_mtp / "config.json").read_text())
    # (num_mtp_layers: Sarvam MoE's name for it, an alias in transformers: set to 0 alike)
    (with_mtp / "config.json").write_text(json.dumps(config | {"num_nextn_predict_layers": 1, "num_mtp_layers": 1}))
    ids = root / "ids.json"
    ids.write_text(json.dumps(torch.randint(0, 64, (640,), generator=torch.Generator().manual_seed(1)).tolist()))
    return plain, with_mtp, ids


def _tensors(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("sequential", [False, True])
def test_prune_drops_the_mtp_layer(tmp_path, pair, sequential):
    plain, with_mtp, ids = pair
    options = PruneOptions(keep=4, criterion="reap", sequential=sequential,
                           calibration=ProfileOptions(token_ids=ids, seq_len=40))
    with open_checkpoint(plain) as ckpt:
        expected = prune(ckpt, tmp_path / "plain", options)
    with open_checkpoint(with_mtp) as ckpt:
        report = prune(ckpt, tmp_path / "mtp", options)
    assert report.kept == expected.kept and any("multi-token-prediction" in w for w in report.warnings)
    got, want = _tensors(tmp_path / "mtp"), _tensors(tmp_path / "plain")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    config = json.loads((tmp_path / "mtp" / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["num_mtp_layers"] == 0 and config["n_routed_experts"] == 4


@pytest.mark.parametrize("options", [
    dict(format="int4-g8-sym"),
    dict(format="int4-g8-sym", method="gptq", rules=("shared_experts=int8-g8-sym",)),
    dict(bits_budget=7.0, candidates="int4-g8-sym,int8-g8-sym", method="gptq"),
    dict(format="int4-g8-sym", layout="compressed-tensors"),
])
def test_quantize_keeps_the_mtp_layer_as_it_is(tmp_path, pair, options):
    plain, with_mtp, ids = pair
    options = QuantizeOptions(**options, calibration=ProfileOptions(token_ids=ids, seq_len=40))
    with open_checkpoint(plain) as ckpt:
        quantize(ckpt, tmp_path / "plain", options)
    with open_checkpoint(with_mtp) as ckpt:
        report = quantize(ckpt, tmp_path / "mtp", options)
    assert any("multi-token-prediction" in w for w in report.warnings)
    got, want, source = _tensors(tmp_path / "mtp"), _tensors(tmp_path / "plain"), _tensors(with_mtp)
    mtp = {k for k in source if k.startswith(MTP)}
    assert got.keys() == want.keys() | mtp
    assert all(torch.equal(got[k], want[k]) for k in want) and all(torch.equal(got[k], source[k]) for k in mtp)
    if options.layout == "compressed-tensors":   # vLLM must not look for quantized MTP weights
        ignore = json.loads((tmp_path / "mtp" / "config.json").read_text())["quantization_config"]["ignore"]
        assert MTP + "mlp.experts.0.up_proj" in ignore
    else:   # and the result loads (transformers ignores the MTP layer), as the plain one does
        import moetool

        batch = torch.tensor(json.loads(ids.read_text())[:40]).unsqueeze(0)
        logits = [moetool.load_model(tmp_path / name)(batch).logits for name in ("mtp", "plain")]
        assert torch.equal(*logits)
