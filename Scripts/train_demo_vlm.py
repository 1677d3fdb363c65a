#!/usr/bin/env python3
"""Trains the demo VLM that `mbq demo` quantizes, on CPU, from a seed, and writes it with
its calibration and evaluation bundles (docs/DEMO.md).

The task: a 48x48 picture of one to three coloured shapes on a 3x3 grid, on a noisy
background; the caption names how many there are and, in reading order, each one's
colour, shape, row and column ("two red ring top left blue cross bottom center").
Nothing in a caption can be guessed without looking at the picture except its grammar.

The model is transformers' own LlavaForConditionalGeneration: a CLIP vision tower
(patch 8, 36 image tokens), LLaVA's two-layer projector and a Llama language model of a
few million parameters, saved in bf16 with a word-level tokenizer, a chat template and a
LlavaProcessor, like a hub checkpoint. The bundles are written by
Scripts/make_calibration.py from rendered PNGs and a ShareGPT4V-style caption file, as a
user would make them.

  .venv/bin/python Scripts/train_demo_vlm.py --out Demo     # ~20 min on 2 cores

writes Demo/model/ (checkpoint, tokenizer, processor), Demo/calib-seed{0,1,2}.safetensors
(32 samples each, drawn by seeds 0-2 from 256 pictures), Demo/heldout.safetensors (64 samples) and
Demo/training.json (seed, steps, the learning curve, held-out accuracy, RMSNorm gains,
activation outliers, and what naive RTN does to the held-out predictions in PyTorch).
Training is deterministic from --seed at a given --threads (PyTorch CPU).

After training, spread_channels() gives the language model's RMSNorm channels uneven
scales, the kind of activation outlier channels per-channel scaling (AWQ, MBQ) exists for,
without changing what the model computes (docs/DEMO.md, "The channel spread"): trained
from scratch in minutes, the model's gains stay near 1 and naive W3 costs it nothing;
with the spread (--channel-spread, lognormal sigma) naive W3 loses 36 points.
training.json reports the model both as trained and as shipped.
"""
import argparse
import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

COLORS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40),
          "purple": (160, 60, 200), "cyan": (40, 200, 210), "white": (235, 235, 235)}
SHAPES = ["square", "ring", "cross", "bar"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]
COUNTS = ["one", "two", "three"]
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PROMPT = ["USER:", "<image>", "describe", "the", "picture", "ASSISTANT:"]
WORDS = SPECIAL + ["USER:", "ASSISTANT:", "describe", "the", "picture"] + COUNTS + list(COLORS) + SHAPES + ROWS + COLS
IMAGE, CELL, PATCH = 48, 16, 8
N_IMAGE_TOKENS = (IMAGE // PATCH) ** 2


# ---- the task ---------------------------------------------------------------------------

def draw_shape(img, shape, color, cy, cx, r, rng):
    """Draws one shape of half-size r centred at (cy, cx) into img [48, 48, 3] (uint8)."""
    yy, xx = np.mgrid[0:IMAGE, 0:IMAGE]
    dy, dx = yy - cy, xx - cx
    if shape == "square":     # filled
        m = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    elif shape == "ring":     # a square's outline
        m = (np.maximum(np.abs(dy), np.abs(dx)) == r)
    elif shape == "cross":    # +
        m = ((dy == 0) & (np.abs(dx) <= r)) | ((dx == 0) & (np.abs(dy) <= r))
    else:                     # a horizontal bar two pixels high
        m = (dy >= 0) & (dy <= 1) & (np.abs(dx) <= r)
    jitter = rng.integers(-20, 21, size=3)
    img[m] = np.clip(np.array(color) + jitter, 0, 255)


def scene(rng):
    """One picture and its caption words. Each object fills part of one 8x8 patch (one
    image token) somewhere inside its 16x16 cell, so most image tokens show background
    only, as in real pictures."""
    img = rng.integers(0, 60, size=(IMAGE, IMAGE, 3)).astype(np.uint8)   # noisy dark background
    n = int(rng.integers(1, 4))
    cells = sorted(rng.choice(9, size=n, replace=False).tolist())      # reading order
    words = [COUNTS[n - 1]]
    for c in cells:
        row, col = divmod(c, 3)
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        r = int(rng.integers(2, 4))
        py, px = row * CELL + PATCH * int(rng.integers(2)), col * CELL + PATCH * int(rng.integers(2))
        cy = py + 3 + int(rng.integers(0, 2 if r == 3 else 3))
        cx = px + 3 + int(rng.integers(0, 2 if r == 3 else 3))
        draw_shape(img, shape, COLORS[color], cy, cx, r, rng)
        words += [color, shape, ROWS[row], COLS[col]]
    return img, words


def pixels(imgs):
    """[B, 48, 48, 3] uint8 -> [B, 3, 48, 48], exactly as the saved CLIPImageProcessor does
    (rescale 1/255, normalize mean 0.5 std 0.5; no resize or crop at 48x48)."""
    x = torch.from_numpy(np.stack(imgs)).float().permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5


# ---- the model --------------------------------------------------------------------------

def build_model(vocab, init_std):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=128)
    text = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=init_std, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=WORDS.index("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=N_IMAGE_TOKENS)
    cfg.pad_token_id = 0
    return LlavaForConditionalGeneration(cfg)


def sequence(words):
    """Token ids and labels of one rendered conversation (what the chat template and the
    processor produce; checked against them in export())."""
    ids = [WORDS.index("<s>"), WORDS.index("USER:")] + [WORDS.index("<image>")] * N_IMAGE_TOKENS \
        + [WORDS.index(w) for w in ("describe", "the", "picture", "ASSISTANT:")]
    start = len(ids)
    ids += [WORDS.index(w) for w in words] + [WORDS.index("</s>")]
    labels = [-100] * start + ids[start:]
    return ids, labels


def batch(rng, n):
    imgs, ids, labels = [], [], []
    for _ in range(n):
        img, words = scene(rng)
        i, l = sequence(words)
        imgs.append(img); ids.append(i); labels.append(l)
    t = max(len(i) for i in ids)
    pad = lambda rows, v: torch.tensor([r + [v] * (t - len(r)) for r in rows])
    ids_t, lab_t = pad(ids, 0), pad(labels, -100)
    att = (torch.arange(t)[None] < torch.tensor([len(i) for i in ids])[:, None]).long()
    return pixels(imgs), ids_t, att, lab_t


@torch.no_grad()
def accuracy(model, data):
    """Teacher-forced greedy accuracy over caption tokens (what `mbq eval` reports)."""
    right = total = 0
    for px, ids, att, lab in data:
        logits = model(input_ids=ids, pixel_values=px, attention_mask=att).logits
        pred, tgt = logits[:, :-1].argmax(-1), lab[:, 1:]
        m = tgt != -100
        right += int((pred[m] == tgt[m]).sum()); total += int(m.sum())
    return right / total


def train(a):
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = build_model(len(WORDS), a.init_std)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in model.model.language_model.parameters()) / 1e6:.2f} M in the language model)")
    val_rng = np.random.default_rng(a.seed + 1000)
    val = [batch(val_rng, 64) for _ in range(4)]
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay, betas=(0.9, 0.98))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    t0 = time.time()
    log = []
    for step in range(1, a.steps + 1):
        model.train()
        px, ids, att, lab = batch(rng, a.batch)
        loss = model(input_ids=ids, pixel_values=px, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step()
        if step % a.eval_every == 0 or step == a.steps:
            model.eval()
            acc = accuracy(model, val)
            log.append({"step": step, "loss": float(loss.detach()), "val_accuracy": acc, "seconds": round(time.time() - t0, 1)})
            print(f"step {step:5d}  loss {float(loss.detach()):.4f}  held-out caption-token accuracy {acc:.4f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    return model, log, time.time() - t0


# ---- the channel spread --------------------------------------------------------------

def decoder_norm_groups(model):
    """Each RMSNorm of the language model with the linears that read its output."""
    for layer in model.model.language_model.layers:
        yield layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        yield layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)


@torch.no_grad()
def spread_channels(model, sigma, seed):
    """Multiplies channel c of every decoder RMSNorm gain by s_c and divides column c of the
    linears that read it by s_c, with s_c = exp(sigma * N(0, 1)) drawn from `seed`.

    RMSNorm(x) * g feeds W; (g * s) and (W / s) compute the same W (g * x_hat), so the fp
    model is unchanged (up to bf16 rounding of the stored factors). It is Outlier
    Suppression's gamma migration (Wei et al. 2022) run the other way, and the inverse of
    the scale AWQ searches (s = mean|x|^alpha with alpha = 1 undoes it). What changes is
    quantization: each group of 128 input channels of q/k/v/gate/up now holds columns
    whose magnitudes differ by factors of hundreds at sigma = 1; min-max rounding sets the
    group's step by its largest columns (small s_c), and the channels with large s_c
    multiply that step's error by their large activations. The fp32 model is spread
    before it is saved in bf16."""
    g = torch.Generator().manual_seed(seed)
    for norm, linears in decoder_norm_groups(model):
        s = torch.exp(sigma * torch.randn(norm.weight.numel(), generator=g, dtype=torch.float64)).to(norm.weight.dtype)
        norm.weight.mul_(s)
        for lin in linears:
            lin.weight.div_(s[None])


def bf16_copy(model):
    """What save_checkpoint() writes and from_pretrained() reads back, in fp32: parameters
    rounded to bf16, buffers not (RoPE's inv_freq is recomputed in fp32 on load; rounding
    it too moves one held-out token under RTN W3)."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return m


@torch.no_grad()
def spread_sweep(trained, seed, path, sigmas=(0.5, 1.0, 1.5, 2.0)):
    """Held-out accuracy of naive RTN W4 and W3 g128 with the trained model spread by each
    sigma (the sigma was chosen from this table by RTN alone: the smallest that costs naive
    W3 at least 10 points, before any awq or mbq run)."""
    from safetensors.torch import load_file
    b = load_file(path)
    rows = []
    for sigma in sigmas:
        m = copy.deepcopy(trained)
        spread_channels(m, sigma, seed)
        m = bf16_copy(m)
        row = {"sigma": sigma, "fp_accuracy": caption_accuracy(m, b)}
        for bits in (4, 3):
            q = copy.deepcopy(m)
            rtn_decoder(q, bits)
            row[f"rtn_w{bits}_g128_accuracy"] = caption_accuracy(q, b)
        rows.append(row)
    return rows


# ---- the checkpoint, as a hub model comes ----------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def save_checkpoint(model, out):
    """bf16 weights, a word-level tokenizer (adds <s>), CLIP image processor and a
    LlavaProcessor, like a hub LLaVA-1.5 directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", WORDS.index("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", additional_special_tokens=["<image>"], padding_side="right")
    image_processor = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                         do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
                                         size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                               patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.to(torch.bfloat16).save_pretrained(out)
    processor.save_pretrained(out)
    model.float()
    return processor


def render(rng, n, directory):
    """n pictures as PNGs and their captions as a ShareGPT4V-style file (what
    Scripts/make_calibration.py reads)."""
    from PIL import Image
    os.makedirs(directory, exist_ok=True)
    records = []
    for i in range(n):
        img, words = scene(rng)
        name = f"{i:05d}.png"
        Image.fromarray(img).save(os.path.join(directory, name))
        records.append({"image": name, "conversations": [{"from": "human", "value": "<image>\ndescribe the picture"},
                                                         {"from": "gpt", "value": " ".join(words)}]})
    path = os.path.join(directory, "captions.json")
    json.dump(records, open(path, "w"))
    return path, records


def bundle(model_dir, captions, images, out, n, seed):
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, os.path.join(here, "make_calibration.py"), "--model", model_dir, "--captions", captions,
                    "--images", images, "--out", out, "--n-samples", str(n), "--seed", str(seed)], check=True)


@torch.no_grad()
def caption_logits(model, b):
    """[caption tokens, vocab] next-token logits of the language model at the caption
    positions of bundle b, and their labels."""
    h = model.model.language_model(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"]).last_hidden_state
    logits, tgt = model.lm_head(h)[:, :-1], b["labels"][:, 1:]
    m = tgt != -100
    return logits[m], tgt[m]


@torch.no_grad()
def caption_accuracy(model, b):
    logits, tgt = caption_logits(model, b)
    return float((logits.argmax(-1) == tgt).float().mean())


@torch.no_grad()
def bundle_accuracy(model, path):
    """Teacher-forced caption accuracy of the language model on a bundle's own inputs
    (what `mbq eval` must reproduce)."""
    from safetensors.torch import load_file
    logits, tgt = caption_logits(model, load_file(path))
    ce = torch.nn.functional.cross_entropy(logits.double(), tgt)
    return int((logits.argmax(-1) == tgt).sum()), int(tgt.numel()), float(ce)


def rtn(w, bits, group=128):
    """The authors' pseudo-quantizer (llm-awq's pseudo_quantize_tensor: asymmetric, min-max
    per group of `group` input channels), what `mbq quantize --method rtn` computes."""
    out, cin = w.shape
    x = w.reshape(-1, group)
    hi, lo, qmax = x.amax(1, keepdim=True), x.amin(1, keepdim=True), 2 ** bits - 1
    scale = (hi - lo).clamp(min=1e-5) / qmax
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    return ((torch.clamp(torch.round(x / scale) + zero, 0, qmax) - zero) * scale).reshape(out, cin)


@torch.no_grad()
def rtn_decoder(model, bits):
    """RTN g128 of every decoder linear, in place."""
    for layer in model.model.language_model.layers:
        for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin.weight.copy_(rtn(lin.weight, bits))


@torch.no_grad()
def rtn_sensitivity(model, path):
    """How far naive weight quantization (RTN g128 of every decoder linear) moves the
    held-out predictions: accuracy, and the change of each caption token's margin (label
    logit minus the best other logit) against the fp margins."""
    from safetensors.torch import load_file
    b = load_file(path)

    def margins(logits, tgt):
        other = logits.clone()
        other.scatter_(1, tgt[:, None], float("-inf"))
        return logits.gather(1, tgt[:, None])[:, 0] - other.amax(1)
    logits, tgt = caption_logits(model, b)
    fp = margins(logits, tgt)
    report = {"fp_margin_quantiles": {q: round(float(fp.quantile(float(q))), 3) for q in ("0.1", "0.25", "0.5")}}
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    for bits in (4, 3, 2):
        rtn_decoder(model, bits)
        q = margins(*caption_logits(model, b))
        report[f"rtn_w{bits}_g128"] = {"caption_correct": int((q > 0).sum()), "caption_accuracy": float((q > 0).float().mean()),
                                       "margin_change_std": round(float((q - fp).std()), 4)}
        model.load_state_dict(saved)
    return report


@torch.no_grad()
def quirks(model, path):
    """RMSNorm gains and activation outliers the training produced: per decoder layer, the
    largest |gain| of each norm and, over the bundle's attended tokens, how far the largest
    input channel of q_proj / o_proj / gate_proj / down_proj stands above the median channel
    (max over tokens of |x| per channel; ratio of the largest channel to the median)."""
    from safetensors.torch import load_file
    b = load_file(path)
    lm = model.model.language_model
    stats, hooks = {}, []
    att = b["attention_mask"].bool()
    vis = b["vision_mask"].bool()

    def hook(name):
        def f(mod, inp):
            x = inp[0].float()
            for part, mask in (("vision", vis & att), ("text", att & ~vis)):
                peak = x[mask].abs().amax(0)
                med = peak.median()
                stats.setdefault(name, {})[part] = {"max": round(float(peak.max()), 3), "max_over_median": round(float(peak.max() / med), 2),
                                                    "top_channel": int(peak.argmax())}
        return f
    for i, layer in enumerate(lm.layers):
        for n, mod in (("q_proj", layer.self_attn.q_proj), ("o_proj", layer.self_attn.o_proj),
                       ("gate_proj", layer.mlp.gate_proj), ("down_proj", layer.mlp.down_proj)):
            hooks.append(mod.register_forward_pre_hook(hook(f"layers.{i}.{n}")))
    lm(inputs_embeds=b["inputs_embeds"], attention_mask=b["attention_mask"])
    for h in hooks:
        h.remove()
    gains = {f"layers.{i}.{n}": {"max_abs": round(float(getattr(layer, n).weight.abs().max()), 3),
                                 "mean_abs": round(float(getattr(layer, n).weight.abs().mean()), 3),
                                 "min_abs": round(float(getattr(layer, n).weight.abs().min()), 4)}
             for i, layer in enumerate(lm.layers) for n in ("input_layernorm", "post_attention_layernorm")}
    gains["norm"] = {"max_abs": round(float(lm.norm.weight.abs().max()), 3), "mean_abs": round(float(lm.norm.weight.abs().mean()), 3),
                     "min_abs": round(float(lm.norm.weight.abs().min()), 4)}
    return gains, stats


def export(model, trained, log, secs, a):
    """Writes Demo/: `model` (spread) as the checkpoint; `trained` (before the spread,
    fp32) only for what training.json says about the model as trained."""
    out = a.out
    tmp = tempfile.mkdtemp(prefix="demo-vlm-")
    try:
        model_dir = os.path.join(tmp, "model")
        processor = save_checkpoint(model, model_dir)
        # The chat template and processor must give exactly the sequences trained on.
        rng = np.random.default_rng(a.seed + 3)
        for _ in range(8):
            img, words = scene(rng)
            user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}
            bot = {"role": "assistant", "content": [{"type": "text", "text": " ".join(words)}]}
            ids = processor(images=img, text=processor.apply_chat_template([user, bot]), return_tensors="pt")["input_ids"][0].tolist()
            if ids != sequence(words)[0]:
                raise SystemExit(f"the processor's ids differ from training's:\n{ids}\n{sequence(words)[0]}")
        calib_imgs, held_imgs = os.path.join(tmp, "calib-images"), os.path.join(tmp, "heldout-images")
        calib_caps, _ = render(np.random.default_rng(a.seed + 2000), a.calib_pool, calib_imgs)
        held_caps, _ = render(np.random.default_rng(a.seed + 3000), a.heldout, held_imgs)
        for s in range(3):
            bundle(model_dir, calib_caps, calib_imgs, os.path.join(tmp, f"calib-seed{s}.safetensors"), a.calib, s)
        bundle(model_dir, held_caps, held_imgs, os.path.join(tmp, "heldout.safetensors"), a.heldout, 0)
        # What the saved (bf16) model scores on the held-out bundle, in PyTorch.
        from transformers import LlavaForConditionalGeneration
        saved = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        held = os.path.join(tmp, "heldout.safetensors")
        right, total, ce = bundle_accuracy(saved, held)
        gains, outliers = quirks(saved, held)
        sensitivity = rtn_sensitivity(saved, held)
        as_trained = bf16_copy(trained)
        t_right, _, t_ce = bundle_accuracy(as_trained, held)
        t_gains, t_outliers = quirks(as_trained, held)
        info = {"seed": a.seed, "steps": a.steps, "batch": a.batch, "lr": a.lr, "train_seconds": round(secs),
                "threads": a.threads, "torch": torch.__version__, "parameters": sum(p.numel() for p in saved.parameters()),
                "heldout_caption_correct": right, "heldout_caption_tokens": total, "heldout_caption_accuracy": right / total,
                "heldout_caption_ce": ce,
                "rtn_sensitivity": sensitivity, "curve": log, "rmsnorm_gains": gains, "linear_input_outliers": outliers,
                "channel_spread": {"sigma": a.channel_spread, "seed": a.seed + 4000,
                                   "sweep": spread_sweep(trained, a.seed + 4000, held)},
                "as_trained": {"heldout_caption_correct": t_right, "heldout_caption_ce": t_ce,
                               "rtn_sensitivity": rtn_sensitivity(as_trained, held),
                               "rmsnorm_gains": t_gains, "linear_input_outliers": t_outliers}}
        json.dump(info, open(os.path.join(tmp, "training.json"), "w"), indent=1)
        print(f"held-out bundle: {right}/{total} caption tokens right ({100 * right / total:.2f}%) with the saved bf16 model")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
        for name in ["model", "training.json", "heldout.safetensors"] + [f"calib-seed{s}.safetensors" for s in range(3)]:
            shutil.move(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="Demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init-std", type=float, default=0.02, help="the language model's initializer_range")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--channel-spread", type=float, default=1.0,
                    help="sigma of the lognormal RMSNorm channel scales applied after training (0: none); see spread_channels()")
    ap.add_argument("--calib", type=int, default=32, help="samples per calibration bundle")
    ap.add_argument("--calib-pool", type=int, default=256, help="pictures the calibration bundles are drawn from")
    ap.add_argument("--heldout", type=int, default=64, help="held-out samples")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, log, secs = train(a)
    print(f"trained in {secs:.0f} s")
    trained = copy.deepcopy(model)
    spread_channels(model, a.channel_spread, a.seed + 4000)
    export(model, trained, log, secs, a)


if __name__ == "__main__":
    main()
