#!/usr/bin/env python3
"""A PyTorch port of the MBQ authors' algorithm (thu-nics/MBQ; docs/DESIGN.md §2), run on
the CPU, that writes the fixtures the Swift methods tests compare against.

What it computes, for a model directory + calibration bundle written by
make_fixtures.py, for each configuration (w3g128 / w4g128 / w4a8 x awq / mbq):
  grad.{attn_vis,attn_cap,mlp_vis,mlp_cap,attn_ratio,mlp_ratio}   [L]   (mbq only)
  search.{l}.{group}.loss  [20]   search.{l}.{group}.best_idx  [1]
  layers.{l}.{tensor}      the scaled, fake-quantized block (for --weights configs)

Faithful to the authors' search with the fixes ../shared/DESIGN.md §2 and
../shared/PYTHON-REFERENCE.md state: weights are backed
up with clone() (their `{k: v.cpu()}` aliases the live tensor on the CPU), padding is
excluded from the channel statistics and the loss, and Qwen2-VL runs with its real
M-RoPE positions. Modules are transformers' own (LlamaAttention, Qwen2MLP, ...).

  .venv/bin/python Scripts/reference/mbq_reference.py [--fixtures Tests/MBQModelTests/Fixtures]
      [--out Tests/MBQMethodsTests/Fixtures]
  .venv/bin/python Scripts/reference/mbq_reference.py --bench   # one Llama-7B block, timed
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

GRID = 20
CONFIGS = {  # name: (w_bit, group, a_bit)
    "w3g128": (3, 128, None),
    "w4g128": (4, 128, None),
    "w4a8": (4, -1, 8),
}


# ---- quantizers (the spec of docs/DESIGN.md §2) ---------------------------------------
def q_group_asym(w, bits, group):
    shape = w.shape
    w = w.reshape(-1, group) if group > 0 else w.reshape(-1, shape[-1])
    mx, mn = w.amax(dim=1, keepdim=True), w.amin(dim=1, keepdim=True)
    max_int = 2 ** bits - 1
    scales = (mx - mn).clamp(min=1e-5) / max_int
    zeros = (-torch.round(mn / scales)).clamp_(0, max_int)
    w = (torch.clamp(torch.round(w / scales) + zeros, 0, max_int) - zeros) * scales
    return w.reshape(shape)


def q_row_sym(x, bits):
    qmax = 2 ** (bits - 1) - 1
    scales = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5) / qmax
    return torch.clamp(torch.round(x / scales), -(2 ** (bits - 1)), qmax) * scales


# ---- model plumbing ------------------------------------------------------------------
class InternVL2:
    """An `internvl_chat` checkpoint's language model on the InternLM2 port
    (internlm2_port.py; transformers has no class), shaped as the code below reads a
    transformers VLM: .model.language_model (the decoder) and .lm_head."""

    def __init__(self, model_dir):
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from internlm2_port import InternLM2ForCausalLM
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)["llm_config"]
        lm = InternLM2ForCausalLM(cfg)
        state = load_file(os.path.join(model_dir, "model.safetensors"))
        prefix = "language_model."
        lm.load_state_dict({k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)})
        self.model = type("VLM", (), {"language_model": lm.model})()
        self.lm_head = lm.output
        self.lm = lm

    def eval(self):
        self.lm.eval()
        return self

    def zero_grad(self, set_to_none=True):
        self.lm.zero_grad(set_to_none=set_to_none)


def load(model_dir, calib_path):
    from transformers import AutoConfig
    import transformers
    with open(os.path.join(model_dir, "config.json")) as f:
        model_type = json.load(f)["model_type"]
    if model_type == "internvl_chat":
        return InternVL2(model_dir).eval(), load_file(calib_path)
    cfg = AutoConfig.from_pretrained(model_dir)
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "internvl": transformers.InternVLForConditionalGeneration}[cfg.model_type]
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    calib = load_file(calib_path)
    return model, calib


def parts(layer):
    """A decoder layer's modules by their role in the search, for transformers' Llama /
    Qwen2 layers and the InternLM2 port (one fused wqkv: scaling its input columns scales
    q, k and v alike; InternVL2's models are all GQA, so v -> o is never searched)."""
    if hasattr(layer, "attention"):
        a, f = layer.attention, layer.feed_forward
        return dict(norm1=layer.attention_norm, norm2=layer.ffn_norm, attn=a, mlp=f, qkv=[a.wqkv], o=a.wo, v=None,
                    gate_up=[f.w1, f.w3], up=f.w3, down=f.w2, linears=[a.wqkv, a.wo, f.w1, f.w3, f.w2],
                    attn_call=lambda x, amask, pe: a(x, amask, *pe),
                    layer_call=lambda x, amask, pe, pos: layer(x, amask, *pe))
    a, m = layer.self_attn, layer.mlp
    return dict(norm1=layer.input_layernorm, norm2=layer.post_attention_layernorm, attn=a, mlp=m,
                qkv=[a.q_proj, a.k_proj, a.v_proj], o=a.o_proj, v=a.v_proj, gate_up=[m.gate_proj, m.up_proj],
                up=m.up_proj, down=m.down_proj, linears=[a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj],
                attn_call=lambda x, amask, pe: a(hidden_states=x, attention_mask=amask, position_embeddings=pe)[0],
                layer_call=lambda x, amask, pe, pos: layer(x, attention_mask=amask, position_embeddings=pe, position_ids=pos))


def rotary(lm, x, pos):
    return lm.rotary(pos) if hasattr(lm, "rotary") else lm.rotary_emb(x, pos)


def hf_weights(layer):
    """The layer's parameters under the Hugging Face Llama names (InternLM2's wqkv split
    per KV head: [kv_heads, groups + 2, head_dim, hidden])."""
    if not hasattr(layer, "attention"):
        return dict(layer.named_parameters())
    a, f = layer.attention, layer.feed_forward
    w = a.wqkv.weight.detach().view(a.kv_heads, a.groups + 2, a.head_dim, -1)
    c = w.shape[-1]
    return {"self_attn.q_proj.weight": w[:, :a.groups].reshape(-1, c), "self_attn.k_proj.weight": w[:, -2].reshape(-1, c),
            "self_attn.v_proj.weight": w[:, -1].reshape(-1, c), "self_attn.o_proj.weight": a.wo.weight,
            "mlp.gate_proj.weight": f.w1.weight, "mlp.up_proj.weight": f.w3.weight, "mlp.down_proj.weight": f.w2.weight,
            "input_layernorm.weight": layer.attention_norm.weight, "post_attention_layernorm.weight": layer.ffn_norm.weight}


def sample_inputs(calib, s):
    emb = calib["inputs_embeds"][s:s + 1].float()
    mask = calib["attention_mask"][s]
    pos = calib["position_ids"]
    pos = pos[:, s:s + 1] if pos.dim() == 3 else pos[s:s + 1]
    return emb, mask, pos, calib["vision_mask"][s].bool() & mask.bool(), (calib["labels"][s] != -100) & mask.bool()


def eager_mask(mask):
    t = mask.shape[0]
    allowed = torch.tril(torch.ones(t, t, dtype=torch.bool, device=mask.device)) & mask.bool()[None, :]
    m = torch.zeros(t, t, device=mask.device)
    m[~allowed] = torch.finfo(torch.float32).min
    return m[None, None]


# ---- gradient statistics ---------------------------------------------------------------
def grad_stats(model, calib):
    lm, head = model.model.language_model, model.lm_head
    L = len(lm.layers)
    sums = torch.zeros(4, L, dtype=torch.float64)
    used = 0
    for s in range(calib["inputs_embeds"].shape[0]):
        emb, mask, pos, vis, cap = sample_inputs(calib, s)
        if not vis.any() or not cap.any():
            continue
        outs = {}
        hooks = []
        for l, layer in enumerate(lm.layers):
            def keep(name, l=l):
                def f(mod, args, o):
                    o.retain_grad()
                    outs[(name, l)] = o
                return f
            hooks.append(parts(layer)["o"].register_forward_hook(keep("attn")))
            hooks.append(parts(layer)["down"].register_forward_hook(keep("mlp")))
        hs = lm(inputs_embeds=emb, attention_mask=mask[None], position_ids=pos, use_cache=False).last_hidden_state
        logits = head(hs).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], calib["labels"][s, 1:], ignore_index=-100)
        loss.backward()
        for h in hooks:
            h.remove()
        used += 1
        for l in range(L):
            ga, gm = outs[("attn", l)].grad[0].abs(), outs[("mlp", l)].grad[0].abs()
            sums[0, l] += ga[vis].mean().double()
            sums[1, l] += ga[cap].mean().double()
            sums[2, l] += gm[vis].mean().double()
            sums[3, l] += gm[cap].mean().double()
        model.zero_grad(set_to_none=True)
    m = sums / used
    ra, rm = m[0] / m[1], m[2] / m[3]
    # Median over layers (the mean of the middle two for an even count), then clamp.
    ra_c = torch.maximum(ra, torch.tensor(float(ra.median() if L % 2 else ra.sort().values[L // 2 - 1:L // 2 + 1].mean())))
    rm_c = torch.maximum(rm, torch.tensor(float(rm.median() if L % 2 else rm.sort().values[L // 2 - 1:L // 2 + 1].mean())))
    return {"attn_vis": m[0], "attn_cap": m[1], "mlp_vis": m[2], "mlp_cap": m[3], "attn_ratio": ra_c, "mlp_ratio": rm_c}


# ---- the search --------------------------------------------------------------------------
@torch.no_grad()
def layer_captures(lm, layer, xs, calib):
    """Runs the fp layer on each sample's input; returns per-sample dicts of the linear
    inputs, module outputs, masks, and the layer outputs."""
    caps = []
    outs = []
    for s, x in enumerate(xs):
        _, mask, pos, vis, cap = sample_inputs(calib, s)
        c = {}
        p = parts(layer)
        hooks = [
            p["qkv"][0].register_forward_pre_hook(lambda m, a: c.__setitem__("qkv", a[0].detach().clone())),
            p["o"].register_forward_pre_hook(lambda m, a: c.__setitem__("o", a[0].detach().clone())),
            p["gate_up"][0].register_forward_pre_hook(lambda m, a: c.__setitem__("gate_up", a[0].detach().clone())),
            p["down"].register_forward_pre_hook(lambda m, a: c.__setitem__("down", a[0].detach().clone())),
            p["o"].register_forward_hook(lambda m, a, o: c.__setitem__("attn_out", o.detach().clone())),
            p["down"].register_forward_hook(lambda m, a, o: c.__setitem__("mlp_out", o.detach().clone())),
        ]
        pe = rotary(lm, x, pos)
        with torch.no_grad():
            out = p["layer_call"](x, eager_mask(mask), pe, pos)
        out = out[0] if isinstance(out, tuple) else out
        for h in hooks:
            h.remove()
        c.update(mask=mask.bool(), vis=vis, cap=cap, pe=pe, amask=eager_mask(mask))
        caps.append(c)
        outs.append(out.detach())
    return caps, outs


@torch.no_grad()
def search_group(layer, group, caps, ratio, bits, gsize, abits, loss_kind, reweight):
    p = parts(layer)
    mlp = p["mlp"]
    lin = {"qkv": p["qkv"], "o": [p["o"]], "gate_up": p["gate_up"], "down": [p["down"]]}[group]
    xcat = torch.cat([c[group][0][c["mask"]] for c in caps])
    x_max = xcat.abs().view(-1, xcat.shape[-1]).mean(0)
    wq = (lambda w: q_row_sym(w, bits)) if abits else (lambda w: q_group_asym(w, bits, gsize))
    losses, best, best_loss, best_s = [], -1, float("inf"), None
    backup = {id(fc): fc.weight.data.clone() for fc in lin}     # clone(): a real copy
    for k in range(GRID):
        ratio_k = k / GRID
        s = x_max.pow(ratio_k).clamp(min=1e-4).view(-1)
        s = s / (s.max() * s.min()).sqrt()
        for fc in lin:
            fc.weight.mul_(s.view(1, -1))
            fc.weight.data = wq(fc.weight.data) if abits else wq(fc.weight.data) / s.view(1, -1)
        cap_sum = vis_sum = all_sum = 0.0
        cap_n = vis_n = all_n = 0
        for c in caps:
            x = c[group]
            if abits:
                x = q_row_sym(x / s.view(1, -1), abits)
            with torch.no_grad():
                if group == "qkv":
                    out, ref = p["attn_call"](x, c["amask"], c["pe"]), c["attn_out"]
                elif group == "o":
                    out, ref = p["o"](x), c["attn_out"]
                elif group == "gate_up":
                    out, ref = mlp(x), c["mlp_out"]
                else:
                    out, ref = p["down"](x), c["mlp_out"]
            d = (out - ref)[0].float()
            d = d.pow(2) if loss_kind == "mse" else d.abs()
            per_row = d.sum(-1).double()
            width = d.shape[-1]
            all_sum += float(per_row[c["mask"]].sum()); all_n += int(c["mask"].sum()) * width
            cap_sum += float(per_row[c["cap"]].sum()); cap_n += int(c["cap"].sum()) * width
            vis_sum += float(per_row[c["vis"]].sum()); vis_n += int(c["vis"].sum()) * width
        if not reweight:
            loss = all_sum / all_n
        elif loss_kind == "mae":
            loss = (cap_sum + ratio * vis_sum) / (cap_n + vis_n)
        else:
            loss = cap_sum / cap_n + ratio * vis_sum / vis_n
        losses.append(loss)
        if loss < best_loss:
            best, best_loss, best_s = k, loss, s.clone()
        for fc in lin:
            fc.weight.data = backup[id(fc)].clone()
    return best, losses, best_s


def apply_scales(layer, group, s):
    p = parts(layer)
    with torch.no_grad():
        if group == "qkv":
            p["norm1"].weight.div_(s)
            for fc in p["qkv"]:
                fc.weight.mul_(s.view(1, -1))
        elif group == "o":
            p["v"].weight.div_(s.view(-1, 1))
            if p["v"].bias is not None:
                p["v"].bias.div_(s)
            p["o"].weight.mul_(s.view(1, -1))
        elif group == "gate_up":
            p["norm2"].weight.div_(s)
            for fc in p["gate_up"]:
                fc.weight.mul_(s.view(1, -1))
        else:
            p["up"].weight.div_(s.view(-1, 1))
            p["down"].weight.mul_(s.view(1, -1))


def run_config(model_dir, calib_path, method, bits, gsize, abits, keep_weights):
    model, calib = load(model_dir, calib_path)
    lm = model.model.language_model
    out = {}
    ratios = None
    if method == "mbq":
        g = grad_stats(model, calib)
        for k, v in g.items():
            out[f"grad.{k}"] = v.float()
        ratios = (g["attn_ratio"], g["mlp_ratio"])
    xs = [sample_inputs(calib, s)[0] for s in range(calib["inputs_embeds"].shape[0])]
    for l, layer in enumerate(lm.layers):
        caps, outs = layer_captures(lm, layer, xs, calib)
        groups = ["qkv", "gate_up", "down"]
        p = parts(layer)
        if p["v"] is not None and p["v"].weight.shape == p["o"].weight.shape:
            groups.insert(1, "o")
        found = []
        for g in groups:
            r = 1.0 if ratios is None else float((ratios[0] if g in ("qkv", "o") else ratios[1])[l])
            best, losses, s = search_group(layer, g, caps, r, bits, gsize, abits, "mae", method == "mbq")
            out[f"search.{l}.{g}.loss"] = torch.tensor(losses, dtype=torch.float64)
            out[f"search.{l}.{g}.best_idx"] = torch.tensor([best], dtype=torch.int64)
            found.append((g, s))
        for g, s in found:
            apply_scales(layer, g, s)
        with torch.no_grad():
            for fc in p["linears"]:
                fc.weight.data = q_row_sym(fc.weight.data, bits) if abits else q_group_asym(fc.weight.data, bits, gsize)
        if keep_weights:
            for name, w in hf_weights(layer).items():
                out[f"layers.{l}.{name}"] = w.detach().clone().contiguous()
        xs = outs
    return out


def bench(threads, tokens, hidden=4096, intermediate=11008, heads=32, device="cpu"):
    """The authors' search on one Llama-7B-shaped block (W4 g128, mbq loss), timed, on the
    CPU or a GPU (`device` "cuda": the layer, its inputs and every capture there; each
    phase timed after torch.cuda.synchronize())."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    torch.set_num_threads(threads)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads, num_key_value_heads=heads,
                      num_hidden_layers=1, max_position_embeddings=4096)
    cfg._attn_implementation = "eager"
    layer = LlamaDecoderLayer(cfg, 0).float().eval().to(device)
    for p in layer.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, hidden, generator=g).to(device)
    mask = torch.ones(tokens, dtype=torch.int64, device=device)
    vis = torch.zeros(tokens, dtype=torch.bool, device=device)
    vis[16:16 + tokens // 2] = True
    cap = torch.zeros(tokens, dtype=torch.bool, device=device)
    cap[-tokens // 8:] = True
    rope = LlamaRotaryEmbedding(cfg).to(device)
    pos = torch.arange(tokens, device=device)[None]

    def sync():
        if device != "cpu":
            torch.cuda.synchronize()
    # Captures of the fp block.
    lm_stub = type("LM", (), {"rotary_emb": rope})()
    calib = {"attention_mask": mask[None], "position_ids": pos, "vision_mask": vis[None].long(),
             "labels": torch.where(cap, 1, -100)[None], "inputs_embeds": x}
    sync()
    t0 = time.perf_counter()
    caps, _ = layer_captures(lm_stub, layer, [x], calib)
    sync()
    fwd = time.perf_counter() - t0
    times = {}
    for grp in ["qkv", "o", "gate_up", "down"]:
        sync()
        t0 = time.perf_counter()
        search_group(layer, grp, caps, 0.5, 4, 128, None, "mae", True)
        sync()
        times[grp] = time.perf_counter() - t0
    import json
    print(json.dumps({"torch": torch.__version__, "device": device, "threads": threads, "tokens": tokens, "forward_s": fwd,
                      "search_s": sum(times.values()), "groups_s": times}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="Tests/MBQModelTests/Fixtures")
    ap.add_argument("--out", default="Tests/MBQMethodsTests/Fixtures")
    ap.add_argument("--arch", nargs="*", default=["llava15", "onevision", "onevision_mha", "qwen2vl", "qwen2_5_vl", "internvl",
                                                  "internvl2"])
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cpu", help="--bench on cpu or cuda")
    a = ap.parse_args()
    if a.bench:
        return bench(a.threads, a.tokens, a.hidden, a.intermediate, a.heads, a.device)
    torch.set_num_threads(1)
    for arch in a.arch:
        d = os.path.join(a.fixtures, arch)
        os.makedirs(os.path.join(a.out, arch), exist_ok=True)
        for cname, (bits, gsize, abits) in CONFIGS.items():
            for method in ("awq", "mbq"):
                keep = method == "mbq" and cname in ("w4g128", "w4a8")
                res = run_config(os.path.join(d, "model"), os.path.join(d, "calib.safetensors"), method, bits, gsize, abits, keep)
                path = os.path.join(a.out, arch, f"{method}_{cname}.safetensors")
                save_file(res, path, metadata={"generator": "Scripts/reference/mbq_reference.py"})
                picks = [int(v) for k, v in res.items() if k.endswith("best_idx")]
                print(f"{arch} {method} {cname}: best_idx {picks} -> {path}")


if __name__ == "__main__":
    main()
