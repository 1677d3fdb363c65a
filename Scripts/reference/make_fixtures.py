#!/usr/bin/env python3
"""Writes the PyTorch/transformers reference fixtures the Swift tests compare against.

For each architecture it builds a tiny random VLM with transformers' own classes,
saves it as a Hugging Face directory, writes a calibration bundle (mbq-calib v1) with
padding, and records what transformers computes for its language model:

  layers.{l}.output          block outputs                       [N, T, C]
  layers.{l}.in_qkv / in_o / in_gate_up / in_down               linear inputs
  layers.{l}.attn_out / mlp_out                                 o_proj / down_proj outputs
  layers.{l}.grad_attn_out   dL/d(o_proj output)                 [N, T, C]
  layers.{l}.grad_mlp_out    dL/d(down_proj output)              [N, T, C]
  grad_inputs_embeds         dL/d(inputs_embeds)                 [N, T, C]
  loss, loss_count           per-sample caption CE and its token count   [N]

Each sample is run on its own (batch 1, its own attention mask), as MBQ's gradient
statistics are. Architectures:
  llava15      LLaVA-1.5: Llama text, GQA (4 heads / 2 kv), CLIP tower, fp32
  onevision    LLaVA-OneVision: Qwen2 text with q/k/v bias, GQA, SigLIP tower, fp32
  onevision_mha  the same without GQA (4 kv heads), so the v_proj -> o_proj group is searched
  qwen2vl      Qwen2-VL: M-RoPE (3-row positions), q/k/v bias, weights stored bf16
  qwen2_5_vl   Qwen2.5-VL: its language model (Qwen2 with M-RoPE), stored bf16
  internvl     InternVL as transformers ships it (`internvl`, -hf checkpoints): Qwen2 text,
               embeddings tied to the output (the config's default)
  internvl2    InternVL2 as released (`internvl_chat`): InternLM2 text, GQA, wqkv fused per
               KV head, dynamic RoPE scaling; computed by internlm2_port.py (remote code port)

Usage (from the repository root; nothing here is needed in CI):
  python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 transformers safetensors numpy
  .venv/bin/python Scripts/reference/make_fixtures.py [--out Tests/MBQModelTests/Fixtures]
Deterministic: rerunning writes the same numbers (torch CPU, fixed seeds).
"""
import argparse
import copy
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # internlm2_port

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 128, 256, 4, 2, 3, 256
N, T = 3, 16
ALL_ARCHS = ["llava15", "onevision", "qwen2vl", "onevision_mha", "qwen2_5_vl", "internvl", "internvl2"]
M_ROPE = ("qwen2vl", "qwen2_5_vl")


class InternVL2Tiny(torch.nn.Module):
    """InternVL2's checkpoint layout around the ported InternLM2: language_model.*,
    a vision_model and the mlp1 projector (never run here; they only fill the layout)."""

    def __init__(self, llm_config):
        super().__init__()
        from internlm2_port import InternLM2ForCausalLM
        self.llm_config = llm_config
        self.language_model = InternLM2ForCausalLM(llm_config)
        self.vision_model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.LayerNorm(32))
        self.mlp1 = torch.nn.Sequential(torch.nn.LayerNorm(128), torch.nn.Linear(128, HIDDEN), torch.nn.GELU(),
                                        torch.nn.Linear(HIDDEN, HIDDEN))

    @property
    def lm_head(self):
        return self.language_model.output

    def decoder(self):
        return self.language_model.model

    def save(self, d):
        os.makedirs(d)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
                  "template": "internlm2-chat", "torch_dtype": "float32",
                  "llm_config": dict(self.llm_config, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
                                     hidden_act="silu"),
                  "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 32}}
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def decoder(model):
    return model.decoder() if isinstance(model, InternVL2Tiny) else model.model.language_model


def modules(layer):
    """A block's modules whose inputs and outputs the fixtures record."""
    if hasattr(layer, "attention"):       # InternLM2
        return dict(qkv=layer.attention.wqkv, o=layer.attention.wo, gate_up=layer.feed_forward.w1, down=layer.feed_forward.w2)
    return dict(qkv=layer.self_attn.q_proj, o=layer.self_attn.o_proj, gate_up=layer.mlp.gate_proj, down=layer.mlp.down_proj)


def text_kwargs(**extra):
    d = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
             num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
             max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False)
    d.update(extra)
    return d


def build(arch):
    kv = HEADS if arch == "onevision_mha" else KV_HEADS
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaOnevisionConfig,
                              LlavaOnevisionForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    if arch == "llava15":
        cfg = LlavaConfig(
            text_config=dict(model_type="llama", rope_theta=10000.0, **text_kwargs()),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                               projection_dim=32),
            image_token_index=VOCAB - 1, image_seq_length=4)
        model = LlavaForConditionalGeneration(cfg)
    elif arch in ("onevision", "onevision_mha"):
        cfg = LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", rope_theta=1000000.0, **text_kwargs(num_key_value_heads=kv)),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
            image_token_index=VOCAB - 1, video_token_index=VOCAB - 2)
        model = LlavaOnevisionForConditionalGeneration(cfg)
    elif arch == "qwen2vl":
        cfg = Qwen2VLConfig(
            text_config=dict(model_type="qwen2_vl_text", rope_theta=1000000.0,
                             rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, **text_kwargs()),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
            vision_end_token_id=VOCAB - 4)
        model = Qwen2VLForConditionalGeneration(cfg)
    elif arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        cfg = Qwen2_5_VLConfig(
            text_config=dict(model_type="qwen2_5_vl_text", rope_theta=1000000.0,
                             rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, **text_kwargs()),
            vision_config=dict(depth=1, hidden_size=32, out_hidden_size=HIDDEN, intermediate_size=64, num_heads=2,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                               window_size=56),
            image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3,
            vision_end_token_id=VOCAB - 4)
        model = Qwen2_5_VLForConditionalGeneration(cfg)
    elif arch == "internvl":
        from transformers import InternVLConfig, InternVLForConditionalGeneration
        cfg = InternVLConfig(
            text_config=dict(model_type="qwen2", rope_theta=1000000.0, **text_kwargs()),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=[28, 28], patch_size=[14, 14]),
            image_token_id=VOCAB - 1)
        model = InternVLForConditionalGeneration(cfg)
    elif arch == "internvl2":
        llm = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6,
                   rope_theta=1000000.0, rope_scaling={"type": "dynamic", "factor": 2.0}, bias=False,
                   tie_word_embeddings=False)
        return InternVL2Tiny(llm).eval()
    else:
        raise SystemExit(f"unknown arch {arch}")
    model.config._attn_implementation = "eager"
    for sub in model.modules():
        if hasattr(sub, "config") and hasattr(sub.config, "_attn_implementation"):
            sub.config._attn_implementation = "eager"
    return model.eval()


def randomize(model, gen):
    """Realistic-ish weights: 1/sqrt(fan_in) linears, norms near 1 with a few outlier
    channels (the activation outliers that AWQ/MBQ scaling exists for), small biases."""
    lm = decoder(model)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("proj.weight") or name.split(".")[-2] in ("wqkv", "wo", "w1", "w2", "w3"):
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            elif name.endswith("proj.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
                if "layers." in name:
                    p[[3, 77]] *= 8.0
                    p[5] *= -4.0
            elif "embed_tokens" in name or "tok_embeddings" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) / HIDDEN ** 0.5)


def make_inputs(arch, gen):
    """N samples: 0 unpadded, 1 left-padded (4), 2 right-padded (3). Six image tokens
    (a 2x3 grid after merging) after a 2-token prompt, then text, then the caption."""
    emb = torch.randn(N, T, HIDDEN, generator=gen)
    emb[:, :, [11, 40]] *= 10.0           # outlier channels
    mask = torch.ones(N, T, dtype=torch.int64)
    mask[1, :4] = 0
    mask[2, T - 3:] = 0
    vision = torch.zeros(N, T, dtype=torch.int64)
    labels = torch.full((N, T), -100, dtype=torch.int64)
    rows = 3 if arch in M_ROPE else 1
    pos = torch.zeros(rows, N, T, dtype=torch.int64)
    for s in range(N):
        real = mask[s].nonzero().flatten().tolist()
        start = real[0]
        img = list(range(start + 2, start + 8))
        vision[s, img] = 1
        emb[s, img] = 2.0 * emb[s, img] + 0.5       # a modality gap
        for p in real[-5:]:
            labels[s, p] = int(torch.randint(0, VOCAB - 4, (1,), generator=gen))
        # Positions: text counts up; Qwen2-VL image tokens get (t, h, w) = (k, k+row, k+col).
        k = 0
        i = 0
        while i < len(real):
            p = real[i]
            if p == img[0] and rows == 3:
                for j, q in enumerate(img):
                    pos[0, s, q] = k
                    pos[1, s, q] = k + j // 3
                    pos[2, s, q] = k + j % 3
                k += 3
                i += len(img)
                continue
            pos[:, s, p] = k
            k += 1
            i += 1
        for p in range(T):
            if mask[s, p] == 0:
                pos[:, s, p] = 1           # transformers' convention for padding
    return emb, mask, vision, labels, pos


def reference(model, arch, emb, mask, vision, labels, pos):
    lm = decoder(model)
    head = model.lm_head
    out = {}
    per = {k: [] for k in ["output", "in_qkv", "in_o", "in_gate_up", "in_down", "attn_out", "mlp_out",
                           "grad_attn_out", "grad_mlp_out"]}
    grads_in, losses, counts = [], [], []
    for s in range(N):
        caps = {}
        hooks = []
        for l, layer in enumerate(lm.layers):
            def pre(name, l=l):
                def f(mod, args):
                    caps[(name, l)] = args[0].detach().clone()
                return f

            def post(name, l=l, keep=False):
                def f(mod, args, o):
                    t = o[0] if isinstance(o, tuple) else o
                    caps[(name, l)] = t
                    if keep:
                        t.retain_grad()
                return f
            m = modules(layer)
            hooks.append(m["qkv"].register_forward_pre_hook(pre("in_qkv")))
            hooks.append(m["o"].register_forward_pre_hook(pre("in_o")))
            hooks.append(m["gate_up"].register_forward_pre_hook(pre("in_gate_up")))
            hooks.append(m["down"].register_forward_pre_hook(pre("in_down")))
            hooks.append(m["o"].register_forward_hook(post("attn_out", keep=True)))
            hooks.append(m["down"].register_forward_hook(post("mlp_out", keep=True)))
            hooks.append(layer.register_forward_hook(post("output")))
        e = emb[s:s + 1].clone().requires_grad_(True)
        p = pos[:, s:s + 1] if pos.shape[0] == 3 else pos[0, s:s + 1]
        hs = lm(inputs_embeds=e, attention_mask=mask[s:s + 1], position_ids=p, use_cache=False).last_hidden_state
        logits = head(hs).float()
        shift_logits = logits[0, :-1]
        shift_labels = labels[s, 1:]
        count = int((shift_labels != -100).sum())
        loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="mean")
        loss.backward()
        for h in hooks:
            h.remove()
        losses.append(float(loss))
        counts.append(count)
        grads_in.append(e.grad[0].detach().clone())
        for l in range(LAYERS):
            for name in ["output", "in_qkv", "in_o", "in_gate_up", "in_down", "attn_out", "mlp_out"]:
                per[name].append((l, caps[(name, l)][0].detach().clone()))
            per["grad_attn_out"].append((l, caps[("attn_out", l)].grad[0].detach().clone()))
            per["grad_mlp_out"].append((l, caps[("mlp_out", l)].grad[0].detach().clone()))
        model.zero_grad(set_to_none=True)
    for name, items in per.items():
        for l in range(LAYERS):
            out[f"layers.{l}.{name}"] = torch.stack([t for (ll, t) in items if ll == l]).contiguous()
    out["grad_inputs_embeds"] = torch.stack(grads_in).contiguous()
    out["loss"] = torch.tensor(losses, dtype=torch.float32)
    out["loss_count"] = torch.tensor(counts, dtype=torch.int64)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="Tests/MBQModelTests/Fixtures")
    ap.add_argument("--arch", nargs="*", default=ALL_ARCHS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for arch in args.arch:
        i = ALL_ARCHS.index(arch)   # seeds follow the architecture, not the command line
        torch.manual_seed(1234 + i)
        gen = torch.Generator().manual_seed(4321 + i)
        model = build(arch)
        randomize(model, gen)
        d = os.path.join(args.out, arch)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        if isinstance(model, InternVL2Tiny):
            model.save(os.path.join(d, "model"))
        elif arch in M_ROPE:
            # Stored bf16 (the usual checkpoint dtype); the reference runs in fp32 on the
            # bf16-rounded weights, which is what the Swift loader computes with. Only
            # parameters are rounded: model.to(bf16) would also round the RoPE inv_freq
            # buffer, which transformers keeps in fp32 when it loads a bf16 checkpoint.
            with torch.no_grad():
                for prm in model.parameters():
                    prm.copy_(prm.to(torch.bfloat16).float())
            copy.deepcopy(model).to(torch.bfloat16).save_pretrained(os.path.join(d, "model"))
        else:
            model.save_pretrained(os.path.join(d, "model"))
        emb, mask, vision, labels, pos = make_inputs(arch, gen)
        save_file({"inputs_embeds": emb.contiguous(), "attention_mask": mask, "vision_mask": vision,
                   "labels": labels, "position_ids": (pos if pos.shape[0] == 3 else pos[0]).contiguous()},
                  os.path.join(d, "calib.safetensors"), metadata={"format": "mbq-calib", "version": "1"})
        ref = reference(model, arch, emb, mask, vision, labels, pos)
        save_file(ref, os.path.join(d, "expected.safetensors"),
                  metadata={"generator": "Scripts/reference/make_fixtures.py", "torch": torch.__version__,
                            "transformers": __import__("transformers").__version__})
        # Drop what the engine never reads but save_pretrained adds.
        for extra in ["generation_config.json"]:
            p = os.path.join(d, "model", extra)
            if os.path.exists(p):
                os.remove(p)
        print(f"{arch}: loss {[round(x, 5) for x in ref['loss'].tolist()]} -> {d}")


if __name__ == "__main__":
    main()
