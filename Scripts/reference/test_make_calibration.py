#!/usr/bin/env python3
"""End-to-end check of Scripts/make_calibration.py, offline, on every family it exports:
LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, transformers' InternVL and InternVL2 as
released (internvl_chat, with InternLM2 or Qwen2 text; below). For the others it
builds a tiny model (random weights), a byte-level BPE tokenizer trained on Debian's
license texts with the family's special tokens, the family's image processor and a chat
template, saved with no video processor (as a directory without video_preprocessor
config, read in a Python without torchvision, has none); four PNG images and a
ShareGPT4V-style caption file; runs make_calibration.py and checks the bundle against
transformers itself: the full model on (input_ids, pixel_values, ...) must give the same
logits as its language model on the bundle's inputs_embeds (and, for M-RoPE, the bundle's
position ids); labels must be exactly the assistant's tokens; vision_mask the image
tokens.

internvl_chat is computed by the checkpoint's own remote code; the model directory gets
our stand-in for it (internvl_chat_remote/, and internlm2_port.py as modeling_internlm2.py),
a tiny random model saved in InternVL2's tensor layout, and a tokenizer with `<img>`,
`</img>`, `<IMG_CONTEXT>` and ChatML's tokens. The check builds each sample's tiles and
prompt itself — the tile grid of each picture worked out by hand from InternVL's rule
(closest aspect ratio, ties to the larger grid when the picture covers more than half of
it, thumbnail after several tiles), the prompt written out literally — and requires the
model's own forward on them to give the logits of its language model on the bundle.

  .venv/bin/python Scripts/reference/test_make_calibration.py [--family NAME ...]
"""
import argparse
import glob
import json
import os
import random
import shutil
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


REMOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "internvl_chat_remote")
# (width, height) of each test picture -> the tile grid (across, down) InternVL's rule picks
# with 28-px tiles and at most 6 tiles, worked out by hand:
#   50x40 (aspect 1.25): 1x1 and 2x2 both differ by 0.25, 2000 px > half of 2x2's 3136 -> 2x2;
#     3x2 (1.5) ties too but 2000 < half of 4704 -> stays 2x2; + thumbnail = 5 tiles.
#   100x40 (2.5): 2x1 and 3x1 both differ by 0.5; 4000 > half of 2352 -> 3x1; + thumbnail = 4.
#   20x20 (1): 1x1 exact; 2x2 ties but 400 < half of 3136 -> 1x1, no thumbnail = 1.
#   30x90 (1/3): 1x3 exact; + thumbnail = 4.
PICTURES = [((50, 40), (2, 2)), ((100, 40), (3, 1)), ((20, 20), (1, 1)), ((30, 90), (1, 3))]
SYSTEM = "You are a helpful assistant that describes pictures."   # the stand-in model's system_message


def caption_ce(model, b):
    """Mean cross-entropy per caption token of model's language model on bundle b (what
    `mbq eval` reports as caption_ce)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(b["inputs_embeds"].shape[0]):
            L = int(b["attention_mask"][s].sum())
            logits = model.language_model(inputs_embeds=b["inputs_embeds"][s:s + 1, :L].float(),
                                          attention_mask=b["attention_mask"][s:s + 1, :L],
                                          position_ids=b["position_ids"][s:s + 1, :L]).logits[0].double()
            labels = b["labels"][s, 1:L]
            keep = labels != -100
            total += float(torch.nn.functional.cross_entropy(logits[:-1][keep], labels[keep], reduction="sum"))
            count += int(keep.sum())
    return total / count


def check_quantized_loads(mbq, model_dir, bundle, d):
    """The fake-quantized output of `mbq quantize` loads through the checkpoint's own remote
    code (copied into the output with its config) and gives the caption loss `mbq eval`
    reports on it."""
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    out = d + "/quantized"
    subprocess.run([mbq, "quantize", "--model", model_dir, "--calib", bundle, "--method", "mbq", "--w-bit", "3", "--group", "32",
                    "--format", "fake", "--out", out], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = json.loads(subprocess.run([mbq, "eval", "--model", out, "--calib", bundle, "--json"], check=True,
                                     capture_output=True, text=True).stdout)["caption_ce"]
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    auto = json.load(open(out + "/config.json"))["auto_map"]["AutoModel"]
    model = get_class_from_dynamic_module(auto, out)(cfg).eval()
    state = {}
    for f in sorted(glob.glob(out + "/model*.safetensors")):
        state.update(load_file(f))
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    theirs = caption_ce(model, load_file(bundle))
    rel = abs(theirs - ours) / abs(theirs)
    assert rel < 1e-5, f"quantized internvl_chat: caption loss {theirs} through its remote code, {ours} by mbq eval"
    fp = json.loads(subprocess.run([mbq, "eval", "--model", model_dir, "--calib", bundle, "--json"], check=True,
                                   capture_output=True, text=True).stdout)["caption_ce"]
    assert abs(fp - ours) > 1e-4, f"the W3 output computes as the fp model ({fp})"
    return theirs, ours, fp


def check_internvl_chat(d, llm, mbq):
    from PIL import Image
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    model_dir = d + "/model"
    os.makedirs(model_dir)
    for f in os.listdir(REMOTE):
        if f.endswith(".py"):
            shutil.copy(os.path.join(REMOTE, f), model_dir)
    shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "internlm2_port.py"),
                os.path.join(model_dir, "modeling_internlm2.py"))
    tok = tokenizer({"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                     "im_start": "<|im_start|>", "im_end": "<|im_end|>"})
    tok.save_pretrained(model_dir)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=len(tok), max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0)
    if llm == "internlm2":
        text.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False, rope_scaling=None)
    else:
        text.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False)
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
              "template": "internlm2-chat" if llm == "internlm2" else "Hermes-2", "downsample_ratio": 0.5,
              "force_image_size": 28, "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
              "max_dynamic_patch": 6, "ps_version": "v2", "select_layer": -1, "llm_config": text,
              "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "image_size": 28, "patch_size": 7, "layer_norm_eps": 1e-6}}
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    torch.manual_seed(0)
    model = get_class_from_dynamic_module(config["auto_map"]["AutoModel"], model_dir)(cfg).eval()
    for p in model.parameters():          # away from the initializer's zeros and ones
        p.data.normal_(0, 0.2)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(model_dir, "model.safetensors"))
    model.img_context_token_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.num_image_token == 4       # (28 / 7)² patches, pixel-shuffled by 0.5

    os.makedirs(d + "/images")
    rng = np.random.default_rng(0)
    recs = []
    for i, ((w, h), _) in enumerate(PICTURES):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f"{d}/images/{i}.png")
        recs.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A noisy picture number {i} with many colours."}]})
    json.dump(recs, open(d + "/captions.json", "w"))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "make_calibration.py")
    subprocess.run([sys.executable, script, "--model", model_dir, "--captions", d + "/captions.json", "--images",
                    d + "/images", "--out", d + "/calib.safetensors", "--n-samples", "4"], check=True)
    b = load_file(d + "/calib.safetensors")
    order = list(range(4))
    random.Random(42).shuffle(order)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    worst = 0.0
    for s, i in enumerate(order):
        image = Image.open(f"{d}/images/{i}.png").convert("RGB")
        across, down = PICTURES[i][1]
        big = image.resize((28 * across, 28 * down), Image.BICUBIC)
        tiles = [big.crop((x * 28, y * 28, x * 28 + 28, y * 28 + 28)) for y in range(down) for x in range(across)]
        if len(tiles) > 1:
            tiles.append(image.resize((28, 28), Image.BICUBIC))
        pixels = torch.stack([(torch.tensor(np.asarray(t), dtype=torch.float32) / 255 - mean) / std for t in tiles]).permute(0, 3, 1, 2)
        caption = f"A noisy picture number {i} with many colours."
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n<img>{'<IMG_CONTEXT>' * (4 * len(tiles))}</img>\n"
                  f"Describe the image.<|im_end|><|im_start|>assistant\n{caption}<|im_end|>")
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        L = ids.shape[1]
        assert int(b["attention_mask"][s].sum()) == L, f"internvl_chat ({llm}) sample {s}: {int(b['attention_mask'][s].sum())} tokens, expected {L}"
        assert int(b["vision_mask"][s].sum()) == 4 * len(tiles), f"sample {s}: {int(b['vision_mask'][s].sum())} image tokens, expected {4 * len(tiles)}"
        assert torch.equal(b["vision_mask"][s, :L].bool(), ids[0] == model.img_context_token_id)
        with torch.no_grad():
            ref = model(pixels, ids)[0]
            lm = model.language_model(inputs_embeds=b["inputs_embeds"][s:s + 1, :L].float(), attention_mask=b["attention_mask"][s:s + 1, :L],
                                      position_ids=b["position_ids"][s:s + 1, :L])
            got = lm.logits[0]
        worst = max(worst, float((ref - got).abs().max()))
        lab = b["labels"][s, :L]
        text_ = tok.decode(lab[lab != -100].tolist())
        assert text_ == caption + "<|im_end|>", f"internvl_chat ({llm}): labels are the assistant's tokens: {text_!r}"
    assert worst < 1e-4, f"internvl_chat ({llm}): logits differ by {worst}"
    print(f"make_calibration internvl_chat ({llm}) OK: 4 samples, tiles {[int(b['vision_mask'][s].sum()) // 4 for s in range(4)]}, "
          f"image tokens {[int(b['vision_mask'][s].sum()) for s in range(4)]}, logits max abs diff {worst:.2e}")
    if mbq is None:
        print("  (no mbq binary: --mbq PATH also checks that the quantized output loads through the remote code)")
        return
    theirs, ours, fp = check_quantized_loads(mbq, model_dir, d + "/calib.safetensors", d)
    print(f"  mbq W3 g32 fake output loads through its remote code: caption loss {theirs:.6f}, mbq eval {ours:.6f} "
          f"(fp model {fp:.6f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="*", default=["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "internvl",
                                                     "internvl_chat", "internvl_chat_qwen2"])
    ap.add_argument("--mbq", help="a built mbq (default: .build/release/mbq or .build/debug/mbq when present)")
    a = ap.parse_args()
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    mbq = a.mbq or next((p for p in (os.path.join(root, ".build/release/mbq"), os.path.join(root, ".build/debug/mbq"))
                         if os.path.exists(p)), None)
    for family in a.family:
        d = tempfile.mkdtemp(prefix=f"mbq-calib-{family}-")
        if family.startswith("internvl_chat"):
            check_internvl_chat(d, "qwen2" if family.endswith("qwen2") else "internlm2", mbq)
        else:
            check(family, d)


if __name__ == "__main__":
    main()
