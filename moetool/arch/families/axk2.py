"""SK Telecom A.X-K2 ("axk2"): DeepSeek-V3.2 (MLA with the DSA lightning indexer; sigmoid router with
correction bias, group-limited only where n_group is set, as the larger releases; A.X-K2-Light routes over
all experts) with gated RMSNorms and a gated attention output; MoE layers by mlp_layer_types. The hub
names the norms' gate MLP W_down / W_up and the query up-projection q_b_proj; transformers renames them."""

from dataclasses import replace

from moetool.arch.families.axk1 import FAMILY as AXK1

FAMILY = replace(AXK1, name="axk2", model_types=("axk2",), title="A.X-K2",
                 router=replace(AXK1.router, config_defaults=(
                     ("n_group", None), ("topk_group", None), ("norm_topk_prob", True),
                     ("routed_scaling_factor", 2.5)),
                     notes="groups (where n_group is set) ranked by the sum of their top-2 biased scores; "
                           "experts outside the kept groups are masked to 0, not -inf"),
                 renames=((".W_down.", ".mlp.fc1."), (".W_up.", ".mlp.fc2."),
                          (".self_attn.q_b_proj.", ".self_attn.q_gate_proj.")),
                 notes="MLA with the DSA indexer (indexed_attention); input and MoE-layer post-attention norms "
                       "gated by a low-rank MLP; layers past num_hidden_layers are MTP modules")
