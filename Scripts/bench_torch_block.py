#!/usr/bin/env python3
"""Times one Llama decoder block in PyTorch (transformers' LlamaDecoderLayer), fp32 on
the CPU, for comparison with `mbq bench`. Forward+backward takes gradients w.r.t. the
block input only (weights frozen), as the engine does. Prints one JSON line.

  .venv/bin/python Scripts/bench_torch_block.py --threads 2 --tokens 2048
"""
import argparse
import json
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=a.intermediate, num_attention_heads=a.heads,
                      num_key_value_heads=a.heads, num_hidden_layers=1, max_position_embeddings=max(4096, a.tokens))
    cfg._attn_implementation = a.attention
    layer = LlamaDecoderLayer(cfg, layer_idx=0).float().eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.rand(1, a.tokens, a.hidden) * 2 - 1
    pos = torch.arange(a.tokens)[None]
    cos_sin = rope(x, pos)
    mask = torch.full((a.tokens, a.tokens), float("-inf")).triu(1)[None, None]

    def fwd(inp):
        out = layer(inp, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        return out[0] if isinstance(out, tuple) else out

    def best(fn):
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.no_grad():
        f = best(lambda: fwd(x))

    def fb():
        xi = x.clone().requires_grad_(True)
        fwd(xi).backward(x)
    fbt = best(fb)
    print(json.dumps({"torch": torch.__version__, "threads": a.threads, "tokens": a.tokens, "attention": a.attention,
                      "forward_s": f, "forward_backward_s": fbt}))


if __name__ == "__main__":
    main()
