#!/usr/bin/env python3
"""End-to-end check of Scripts/make_calibration.py, offline, on every family it exports:
LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL and transformers' InternVL. For each it
builds a tiny model (random weights), a byte-level BPE tokenizer trained on Debian's
license texts with the family's special tokens, the family's image processor and a chat
template, saved with no video processor (as a directory without video_preprocessor
config, read in a Python without torchvision, has none); four PNG images and a
ShareGPT4V-style caption file; runs make_calibration.py and checks the bundle against
transformers itself: the full model on (input_ids, pixel_values, ...) must give the same
logits as its language model on the bundle's inputs_embeds (and, for M-RoPE, the bundle's
position ids); labels must be exactly the assistant's tokens; vision_mask the image
tokens.

  .venv/bin/python Scripts/reference/test_make_calibration.py [--family NAME ...]
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from make_calibration import images_only  # noqa: E402

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def tokenizer(extra):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast
    texts = sorted(glob.glob("/usr/share/common-licenses/*"))[:6]
    specials = ["<pad>", "<s>", "</s>"] + sorted(set(extra.values()))
    bpe = ByteLevelBPETokenizer()
    bpe.train(texts, vocab_size=700, special_tokens=specials)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   extra_special_tokens=extra, padding_side="right")


def template(image):
    return ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}" + image + "\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
            "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}ASSISTANT: {% endif %}")


def build(family):
    """-> (model, processor) of a tiny random `family` model."""
    import transformers as tf
    if family == "llava":
        tok = tokenizer({"image_token": "<image>"})
        proc = images_only(tf.LlavaProcessor)(
            image_processor=tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
            tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", chat_template=template("<image>"),
            num_additional_image_tokens=1)
        cfg = tf.LlavaConfig(text_config=dict(model_type="llama", vocab_size=len(tok), **TEXT),
                             vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=4)
        return tf.LlavaForConditionalGeneration(cfg), proc
    if family == "llava_onevision":
        tok = tokenizer({"image_token": "<image>", "video_token": "<video>"})
        ip = tf.LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, image_grid_pinpoints=[[28, 28], [28, 56]],
                                             do_pad=True)
        proc = images_only(tf.LlavaOnevisionProcessor)(image_processor=ip, tokenizer=tok, video_processor=None,
                                                       num_image_tokens=4, vision_feature_select_strategy="full",
                                                       chat_template=template("<image>"))
        cfg = tf.LlavaOnevisionConfig(
            text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT),
            vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, image_size=28, patch_size=14),
            image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=[[28, 28], [28, 56]], vision_feature_select_strategy="full", vision_feature_layer=-1)
        return tf.LlavaOnevisionForConditionalGeneration(cfg), proc
    if family in ("qwen2_vl", "qwen2_5_vl"):
        tok = tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
                         "vision_eos_token": "<|vision_end|>"})
        ip = tf.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        pcls = tf.Qwen2VLProcessor if family == "qwen2_vl" else tf.Qwen2_5_VLProcessor
        proc = images_only(pcls)(image_processor=ip, tokenizer=tok, video_processor=None,
                                 chat_template=template("<|vision_start|><|image_pad|><|vision_end|>"))
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in [("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                                                              ("vision_start_token_id", "<|vision_start|>"),
                                                              ("vision_end_token_id", "<|vision_end|>")]}
        text = dict(model_type=family + "_text", vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                    **TEXT)
        if family == "qwen2_vl":
            cfg = tf.Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2,
                                                                         mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                                                                         temporal_patch_size=2), **ids)
            return tf.Qwen2VLForConditionalGeneration(cfg), proc
        cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64,
                                                                       num_heads=2, patch_size=14, spatial_merge_size=2,
                                                                       temporal_patch_size=2, fullatt_block_indexes=[0],
                                                                       window_size=56), **ids)
        return tf.Qwen2_5_VLForConditionalGeneration(cfg), proc
    if family == "internvl":
        tok = tokenizer({"context_image_token": "<IMG_CONTEXT>", "start_image_token": "<img>", "end_image_token": "</img>",
                         "video_token": "<video>"})
        ip = tf.GotOcr2ImageProcessor(size={"height": 28, "width": 28}, crop_to_patches=False)
        proc = images_only(tf.InternVLProcessor)(image_processor=ip, tokenizer=tok, video_processor=None, image_seq_length=1,
                                                 chat_template=template("<IMG_CONTEXT>"))
        cfg = tf.InternVLConfig(text_config=dict(model_type="qwen2", vocab_size=len(tok), **TEXT),
                                vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                   image_size=[28, 28], patch_size=[14, 14]),
                                image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=1)
        return tf.InternVLForConditionalGeneration(cfg), proc
    raise SystemExit(f"unknown family {family}")


def save_without_video(proc, d):
    """What a model directory without a video processor holds: image processor,
    tokenizer, chat template, processor_config.json (ProcessorMixin.save_pretrained
    needs every sub-processor)."""
    import inspect
    proc.image_processor.save_pretrained(d)
    proc.tokenizer.save_pretrained(d)
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write(proc.chat_template)
    params = inspect.signature(type(proc).__mro__[1].__init__).parameters
    config = {k: getattr(proc, k) for k in params
              if k not in ("self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs") and hasattr(proc, k)}
    config["processor_class"] = type(proc).__name__
    with open(os.path.join(d, "processor_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def check(family, d):
    from PIL import Image
    torch.manual_seed(0)
    model, proc = build(family)
    model = model.eval()
    model.save_pretrained(d + "/model")
    save_without_video(proc, d + "/model")
    os.makedirs(d + "/images")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 50, 3), dtype=np.uint8)).save(f"{d}/images/{i}.png")
        recs.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A noisy picture number {i} with many colours."}]})
    json.dump(recs, open(d + "/captions.json", "w"))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "make_calibration.py")
    subprocess.run([sys.executable, script, "--model", d + "/model", "--captions", d + "/captions.json", "--images",
                    d + "/images", "--out", d + "/calib.safetensors", "--n-samples", "3"], check=True)
    b = load_file(d + "/calib.safetensors")
    n, t, _ = b["inputs_embeds"].shape
    assert n == 3, n
    order = list(range(4))
    random.Random(42).shuffle(order)
    image_token = getattr(model.config, "image_token_id", None)
    if image_token is None:
        image_token = model.config.image_token_index
    worst = 0.0
    for s in range(n):
        i = order[s]
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
        bot = {"role": "assistant", "content": [{"type": "text", "text": f"A noisy picture number {i} with many colours."}]}
        full = proc.apply_chat_template([user, bot])
        batch = proc(images=Image.open(f"{d}/images/{i}.png").convert("RGB"), text=full, return_tensors="pt")
        ids = batch["input_ids"][0]
        L = ids.shape[0]
        with torch.no_grad():
            ref = model(**batch).logits[0]
            emb = b["inputs_embeds"][s:s + 1, :L].float()
            pos = b["position_ids"][:, s:s + 1, :L] if b["position_ids"].dim() == 3 else b["position_ids"][s:s + 1, :L]
            h = model.model.language_model(inputs_embeds=emb, attention_mask=b["attention_mask"][s:s + 1, :L],
                                           position_ids=pos).last_hidden_state
            got = model.lm_head(h)[0]
        worst = max(worst, float((ref - got).abs().max()))
        assert torch.equal(b["vision_mask"][s, :L].bool(), ids == image_token), f"{family}: vision_mask is not the image tokens"
        assert int(b["attention_mask"][s].sum()) == L
        lab = b["labels"][s, :L]
        text = proc.tokenizer.decode(lab[lab != -100].tolist()).strip()
        assert text == f"A noisy picture number {i} with many colours.</s>", f"{family}: labels are the assistant's tokens: {text!r}"
    assert worst < 1e-4, f"{family}: logits differ by {worst}"
    print(f"make_calibration {family} OK: {n} samples x {t} tokens, {int(b['vision_mask'][0].sum())} image tokens in sample 0, "
          f"logits max abs diff {worst:.2e}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="*", default=["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl"])
    a = ap.parse_args()
    for family in a.family:
        check(family, tempfile.mkdtemp(prefix=f"mbq-calib-{family}-"))


if __name__ == "__main__":
    main()
