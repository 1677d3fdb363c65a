#!/usr/bin/env python3
"""A random Llama-7B-shaped checkpoint with N decoder layers (bf16), and a one-sample
calibration bundle, for measuring output sizes and memory at real shapes without
downloading a model. Not used by CI.

    .venv/bin/python Scripts/reference/make_llama7b_layers.py --layers 4 --out /tmp/llama7b-4
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    H, I, V, heads = 4096, 11008, 32000, 32
    g = torch.Generator().manual_seed(0)
    os.makedirs(a.out, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": a.layers, "num_attention_heads": heads, "num_key_value_heads": heads,
           "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "vocab_size": V, "tie_word_embeddings": False,
           "hidden_act": "silu", "torch_dtype": "bfloat16"}
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
    index = {}
    shards = [("model.embed_tokens.weight", w(V, H)), ("lm_head.weight", w(V, H)),
              ("model.norm.weight", torch.ones(H, dtype=torch.bfloat16))]
    save_file(dict(shards), os.path.join(a.out, "model-rest.safetensors"), metadata={"format": "pt"})
    index.update({k: "model-rest.safetensors" for k, _ in shards})
    for l in range(a.layers):
        p = f"model.layers.{l}."
        t = {p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "post_attention_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
             p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(H, H),
             p + "self_attn.v_proj.weight": w(H, H), p + "self_attn.o_proj.weight": w(H, H),
             p + "mlp.gate_proj.weight": w(I, H), p + "mlp.up_proj.weight": w(I, H), p + "mlp.down_proj.weight": w(H, I)}
        name = f"model-layer{l:02d}.safetensors"
        save_file(t, os.path.join(a.out, name), metadata={"format": "pt"})
        index.update({k: name for k in t})
    with open(os.path.join(a.out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f, indent=2)
    T = a.tokens
    labels = torch.full((1, T), -100, dtype=torch.int64)
    labels[0, T // 2:] = torch.randint(0, V, (T - T // 2,), generator=g)
    vision = torch.zeros(1, T, dtype=torch.bool)
    vision[0, 4:T // 2] = True
    save_file({"inputs_embeds": torch.randn(1, T, H, generator=g) * 0.02, "attention_mask": torch.ones(1, T, dtype=torch.int64),
               "position_ids": torch.arange(T).unsqueeze(0), "vision_mask": vision, "labels": labels},
              os.path.join(a.out, "calib.safetensors"), metadata={"format": "mbq-calib", "version": "1"})
    print(a.out)


if __name__ == "__main__":
    main()
