#!/usr/bin/env python3
"""A PyTorch port of the reference GPTQ (IST-DASLab/gptq: gptq.py `GPTQ.add_batch` and
`fasterquant`, quant.py `Quantizer` with sym=False) with token-weighted Hessians
(docs/DESIGN.md §2.7), and the fixtures the Swift GPTQ tests compare against.

The algorithm is the reference's line for line, with two stated changes:
  * the Hessian is summed in fp64, sample by sample: H = (2/n) sum_t w_t x_t x_t^T,
    the one line where token weights enter (rows x * sqrt(w) in fp32, as the reference
    scales its rows by sqrt(2/n)); n = the tokens with w > 0;
  * the inverse's Cholesky factor is computed in fp64 (cholesky, cholesky_inverse,
    cholesky upper, as the reference), then used in fp32 as the reference uses it.
Activation order sorts with a stable sort (torch.argsort's default is not stable, so
ties in diag(H) would make the order arbitrary). With act-order and groups, `g_idx`
is what GPTQModel stores (each column's group in the permuted order); with
static_groups (compressed-tensors' actorder "weight") groups keep the column order.

Fixtures written (Tests/MBQMethodsTests/Fixtures/gptq/):
  unit.safetensors     random linears + Hessians (dead columns, every option) and the
                       reference's codes, scales, zeros, g_idx, loss per case
  <arch>.safetensors   per family: sequential GPTQ over the fixture model's layers for
                       W3 g128, W4 g128, W4 per channel x act-order off/on x token weights
                       none/modality/gradient: per linear a 32-bit FNV-1a hash of each row's
                       codes (int32), the scales, the zero points, g_idx (uint8; act-order)

  .venv/bin/python Scripts/reference/gptq_reference.py            # all fixtures
  .venv/bin/python Scripts/reference/gptq_reference.py --bench    # one Llama-7B-shaped layer, timed
"""
import argparse
import json
import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mbq_reference as mr  # noqa: E402

ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
INPUT_OF = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o", "gate": "gate_up", "up": "gate_up", "down": "down"}
ATTENTION = {"q", "k", "v", "o"}
SCHEMES = {"w3g128": (3, 128), "w4g128": (4, 128), "w4pc": (4, -1)}


# ---- quant.py ----------------------------------------------------------------------------
def find_params(x, maxq):
    """Quantizer.find_params(x, weight=True), sym=False: per row over [min(.,0), max(.,0)]."""
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    tmp = (xmin == 0) & (xmax == 0)
    xmin[tmp] = -1
    xmax[tmp] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero


def quantize(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero), q


# ---- gptq.py -----------------------------------------------------------------------------
def fasterquant(weight, H, bits, groupsize=-1, percdamp=.01, blocksize=128, actorder=False, static_groups=False):
    """weight: [rows, cols] fp32; H: [cols, cols] fp64. -> codes [rows, cols] (original
    column order), scales [rows, groups], zeros [rows, groups], g_idx [cols] or None, loss."""
    W = weight.clone().float()
    rows, columns = W.shape
    maxq = 2 ** bits - 1
    H = H.clone()
    scale, zero = find_params(W, maxq)          # per channel: before the dead columns
    row_params = (scale, zero)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = []
    if static_groups and groupsize > 0:
        for i in range(0, columns, groupsize):
            groups.append(find_params(W[:, i:i + groupsize], maxq))
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    Losses = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H.float()
    ngroups = columns // groupsize if groupsize > 0 else 1
    scales = torch.zeros(rows, ngroups)
    zeros = torch.zeros(rows, ngroups)
    if groupsize <= 0:
        scales[:, 0], zeros[:, 0] = row_params
    for g, (s, z) in enumerate(groups):
        scales[:, g], zeros[:, g] = s, z
    scale, zero = row_params
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if groupsize > 0:
                if not static_groups:
                    if (i1 + i) % groupsize == 0:
                        scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)], maxq)
                        scales[:, (i1 + i) // groupsize], zeros[:, (i1 + i) // groupsize] = scale, zero
                else:
                    idx = i1 + i
                    if actorder:
                        idx = perm[idx]
                    scale, zero = groups[idx // groupsize]
            q, c = quantize(w.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), maxq)
            q, c = q.flatten(), c.flatten()
            Q1[:, i] = q
            C1[:, i] = c
            Losses1[:, i] = (w - q) ** 2 / d ** 2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        Losses[:, i1:i2] = Losses1 / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    g_idx = None
    if actorder:
        invperm = torch.argsort(perm)
        codes = codes[:, invperm]
        if groupsize > 0 and not static_groups:
            g_idx = (torch.arange(columns, dtype=torch.int32) // groupsize)[invperm]
    return codes.to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, float(Losses.double().sum())


def dequantize(codes, scales, zeros, g_idx, groupsize):
    cols = codes.shape[1]
    gi = g_idx.long() if g_idx is not None else torch.arange(cols) // (groupsize if groupsize > 0 else cols)
    return (codes.float() - zeros.float()[:, gi]) * scales[:, gi]


# ---- add_batch with token weights ----------------------------------------------------------
class Hessian:
    def __init__(self, cols):
        self.S = torch.zeros(cols, cols, dtype=torch.float64)
        self.n = 0

    def add(self, x, w):
        """x: [T, C] fp32 inputs, w: [T] token weights; rows with w > 0 enter."""
        keep = w > 0
        xs = x[keep] * torch.sqrt(w[keep]).unsqueeze(1)
        self.S += xs.double().t() @ xs.double()
        self.n += int(keep.sum())

    def value(self):
        return self.S * (2 / self.n)


def fnv1a_rows(codes):
    """32-bit FNV-1a of each row's codes (bytes in column order). -> int32 [rows] (the
    hash's bits)"""
    out = []
    for row in codes.tolist():
        h = 0x811C9DC5
        for b in row:
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
        out.append(h)
    return torch.tensor(out, dtype=torch.int64).to(torch.int32)


# ---- per family: sequential GPTQ over the layers -------------------------------------------
def token_grad_norms(model, calib):
    """Per used sample, layer and role: ||dL/dy_t||^2 of each linear's output (fp64 sums).
    -> {sample: {(layer, role): [T]}}"""
    lm, head = model.model.language_model, model.lm_head
    out = {}
    for s in range(calib["inputs_embeds"].shape[0]):
        emb, mask, pos, vis, cap = mr.sample_inputs(calib, s)
        if not vis.any() or not cap.any():
            continue
        grads = {}
        hooks = []
        for l, layer in enumerate(lm.layers):
            p = mr.parts(layer)
            if hasattr(layer, "attention"):   # InternLM2: one wqkv, split per KV head
                a = layer.attention

                def qkv_hook(mod, args, o, l=l, a=a):
                    def g(grad):
                        t = grad[0].view(grad.shape[1], a.kv_heads, a.groups + 2, a.head_dim).double()
                        grads[(l, "q")] = (t[:, :, :a.groups] ** 2).sum((1, 2, 3)).float()
                        grads[(l, "k")] = (t[:, :, -2] ** 2).sum((1, 2)).float()
                        grads[(l, "v")] = (t[:, :, -1] ** 2).sum((1, 2)).float()
                    o.register_hook(g)
                hooks.append(a.wqkv.register_forward_hook(qkv_hook))
                mods = {"o": p["o"], "gate": p["gate_up"][0], "up": p["gate_up"][1], "down": p["down"]}
            else:
                mods = dict(zip(ROLES, p["linears"]))
            for role, m in mods.items():
                def hook(mod, args, o, l=l, role=role):
                    o.register_hook(lambda g: grads.__setitem__((l, role), (g[0].double() ** 2).sum(-1).float()))
                hooks.append(m.register_forward_hook(hook))
        hs = lm(inputs_embeds=emb, attention_mask=mask[None], position_ids=pos, use_cache=False).last_hidden_state
        logits = head(hs).float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], calib["labels"][s, 1:], ignore_index=-100)
        loss.backward()
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        out[s] = grads
    return out


def token_weights(mode, calib, s, layer, role, ratios, norms):
    _, mask, _, vis, cap = mr.sample_inputs(calib, s)
    mask = mask.bool()
    if mode == "none":
        return mask.float()
    if mode == "modality":
        r = float((ratios["attn_ratio"] if role in ATTENTION else ratios["mlp_ratio"])[layer])
        w = torch.zeros(mask.shape[0])
        w[cap] = 1
        w[vis] = r
        return w
    if s not in norms:
        return torch.zeros(mask.shape[0])
    return torch.where(mask, norms[s][(layer, role)], torch.zeros(mask.shape[0]))


def split_weights(layer):
    w = mr.hf_weights(layer)
    names = {"q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
             "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
             "down": "mlp.down_proj.weight"}
    return {r: w[n].detach().clone().float() for r, n in names.items()}


def write_back(layer, q):
    with torch.no_grad():
        if hasattr(layer, "attention"):
            a, f = layer.attention, layer.feed_forward
            w = a.wqkv.weight.data.view(a.kv_heads, a.groups + 2, a.head_dim, -1)
            c = w.shape[-1]
            w[:, :a.groups] = q["q"].view(a.kv_heads, a.groups, a.head_dim, c)
            w[:, -2] = q["k"].view(a.kv_heads, a.head_dim, c)
            w[:, -1] = q["v"].view(a.kv_heads, a.head_dim, c)
            a.wo.weight.data = q["o"].clone()
            f.w1.weight.data, f.w3.weight.data, f.w2.weight.data = q["gate"].clone(), q["up"].clone(), q["down"].clone()
        else:
            for role, m in zip(ROLES, mr.parts(layer)["linears"]):
                m.weight.data = q[role].clone()


def run_family(model_dir, calib_path, bits, group, actorder, mode, ratios, norms):
    model, calib = mr.load(model_dir, calib_path)
    lm = model.model.language_model
    n = calib["inputs_embeds"].shape[0]
    xs = [mr.sample_inputs(calib, s)[0] for s in range(n)]
    out = {}
    for l, layer in enumerate(lm.layers):
        caps, _ = mr.layer_captures(lm, layer, xs, calib)
        W = split_weights(layer)
        deq = {}
        for role in ROLES:
            H = Hessian(W[role].shape[1])
            for s in range(n):
                H.add(caps[s][INPUT_OF[role]][0].float(), token_weights(mode, calib, s, l, role, ratios, norms))
            codes, scales, zeros, g_idx, _ = fasterquant(W[role], H.value(), bits, group, actorder=actorder)
            key = f"{l}.{role}"
            out[key + ".row_hash"] = fnv1a_rows(codes)
            out[key + ".scales"] = scales.contiguous()
            out[key + ".zeros"] = zeros.contiguous()
            if g_idx is not None:
                out[key + ".g_idx"] = g_idx.to(torch.uint8).contiguous()
            deq[role] = dequantize(codes, scales, zeros, g_idx, group)
        write_back(layer, deq)
        _, xs = mr.layer_captures(lm, layer, xs, calib)
    return out


def family_fixture(arch, fixtures):
    d = os.path.join(fixtures, arch)
    model_dir, calib_path = os.path.join(d, "model"), os.path.join(d, "calib.safetensors")
    model, calib = mr.load(model_dir, calib_path)
    ratios = mr.grad_stats(model, calib)
    model, calib = mr.load(model_dir, calib_path)
    norms = token_grad_norms(model, calib)
    out = {}
    for sname, (bits, group) in SCHEMES.items():
        for actorder in (False, True):
            for mode in ("none", "modality", "gradient"):
                tag = f"{sname}.{'act' if actorder else 'seq'}.{mode}"
                for k, v in run_family(model_dir, calib_path, bits, group, actorder, mode, ratios, norms).items():
                    out[f"{tag}.{k}"] = v
    return out


# ---- the unit fixture -------------------------------------------------------------------------
UNIT_CASES = [  # name, rows, cols, bits, group, blocksize, actorder, static_groups
    ("w4g128", 48, 256, 4, 128, 128, False, False),
    ("w3g128", 48, 256, 3, 128, 128, False, False),
    ("w4pc", 48, 256, 4, -1, 128, False, False),
    ("w2g64", 40, 256, 2, 64, 128, False, False),
    ("w8g32", 40, 256, 8, 32, 128, False, False),
    ("w4g32_block64", 40, 256, 4, 32, 64, False, False),
    ("w4g128_block32", 40, 256, 4, 128, 32, False, False),
    ("w4g128_act", 48, 256, 4, 128, 128, True, False),
    ("w3g64_act", 48, 256, 3, 64, 128, True, False),
    ("w4pc_act", 48, 256, 4, -1, 128, True, False),
    ("w4g128_act_static", 48, 256, 4, 128, 128, True, True),
    ("w3g32_act_static", 48, 256, 3, 32, 128, True, True),
]


def unit_fixture():
    """One input set (two 'samples' of 150 tokens, a dead column, masked tokens) shared by
    every case; each case its own weight."""
    g = torch.Generator().manual_seed(7)
    cols = 256
    X = torch.randn(300, cols, generator=g)
    X[:, 5] = 0            # a dead column: diag(H) = 0
    X[:, 9] *= 5
    w = torch.rand(300, generator=g) * 2
    w[::7] = 0             # masked tokens
    H = Hessian(cols)
    H.add(X[:150], w[:150])
    H.add(X[150:], w[150:])
    out = {"x": X, "tw": w}
    for name, rows, _, bits, group, block, act, static in UNIT_CASES:
        W = torch.randn(rows, cols, generator=g) * 0.05
        W[:, 3] *= 8           # an outlier column
        codes, scales, zeros, g_idx, loss = fasterquant(W, H.value(), bits, group, blocksize=block, actorder=act, static_groups=static)
        p = f"{name}."
        out[p + "w"] = W
        out[p + "codes"], out[p + "scales"], out[p + "zeros"] = codes, scales, zeros
        out[p + "loss"] = torch.tensor([loss], dtype=torch.float64)
        if g_idx is not None:
            out[p + "g_idx"] = g_idx
    return out


# ---- speed: one Llama-7B-shaped layer ---------------------------------------------------------
def bench(threads, tokens, hidden=4096, intermediate=11008, reps=1):
    """GPTQ W4 g128 of one Llama-shaped layer: the Hessians of its four inputs from
    `tokens` random rows in samples of 512, then the 7 linears, each factorizing its own
    Hessian as the reference does. The best of `reps` runs."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (hidden, hidden), "k": (hidden, hidden), "v": (hidden, hidden), "o": (hidden, hidden),
              "gate": (intermediate, hidden), "up": (intermediate, hidden), "down": (hidden, intermediate)}
    xs = {"qkv": torch.randn(tokens, hidden, generator=g), "o": torch.randn(tokens, hidden, generator=g),
          "gate_up": torch.randn(tokens, hidden, generator=g), "down": torch.randn(tokens, intermediate, generator=g)}
    ws = {role: torch.randn(o, i, generator=g) * 0.02 for role, (o, i) in shapes.items()}
    best = None
    for _ in range(reps):
        t0 = time.time()
        hs = {}
        for k, x in xs.items():
            H = Hessian(x.shape[1])
            for s in range(0, tokens, 512):   # samples of 512 tokens
                H.add(x[s:s + 512], torch.ones(min(512, tokens - s)))
            hs[k] = H.value()
        t_h = time.time() - t0
        t1 = time.time()
        for role in shapes:
            fasterquant(ws[role], hs[INPUT_OF[role]], 4, 128)
        t_q = time.time() - t1
        if best is None or t_h + t_q < best[0] + best[1]:
            best = (t_h, t_q)
    t_h, t_q = best
    print(f"torch {torch.__version__}, {threads} threads, {tokens} tokens: hessians {t_h:.2f} s, "
          f"gptq of 7 linears {t_q:.2f} s, layer {t_h + t_q:.2f} s", file=sys.stderr)
    print(json.dumps({"hessians_s": t_h, "gptq_s": t_q, "layer_s": t_h + t_q, "threads": threads, "tokens": tokens}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", default="Tests/MBQModelTests/Fixtures")
    ap.add_argument("--out", default="Tests/MBQMethodsTests/Fixtures/gptq")
    ap.add_argument("--arch", nargs="*", default=["llava15", "onevision", "onevision_mha", "qwen2vl", "qwen2_5_vl", "internvl",
                                                  "internvl2"])
    ap.add_argument("--bench", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.bench:
        bench(a.threads, a.tokens, a.hidden, a.intermediate, a.reps)
        return
    torch.set_num_threads(1)
    os.makedirs(a.out, exist_ok=True)
    save_file(unit_fixture(), os.path.join(a.out, "unit.safetensors"))
    print("unit.safetensors")
    for arch in a.arch:
        t0 = time.time()
        save_file(family_fixture(arch, a.fixtures), os.path.join(a.out, f"{arch}.safetensors"))
        print(f"{arch}.safetensors ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
