#!/usr/bin/env python3
"""End-to-end check of Scripts/make_calibration.py, offline: builds a tiny LLaVA-1.5
(random weights, a byte-level BPE tokenizer trained on Debian's license texts, a CLIP
image processor, a chat template), four PNG images and a ShareGPT4V-style caption
file, runs make_calibration.py, and checks the bundle against transformers itself:
the full model on (input_ids, pixel_values) must give the same logits as its language
model on the bundle's inputs_embeds; labels must cover exactly the assistant's tokens.

  .venv/bin/python Scripts/reference/test_make_calibration.py
"""
import glob
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import load_file


def main():
    from PIL import Image
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)
    d = tempfile.mkdtemp(prefix="mbq-calib-test-")
    texts = sorted(glob.glob("/usr/share/common-licenses/*"))[:6]
    bpe = ByteLevelBPETokenizer()
    bpe.train(texts, vocab_size=700, special_tokens=["<pad>", "<s>", "</s>", "<image>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  extra_special_tokens={"image_token": "<image>"}, padding_side="right")
    image_id = tok.convert_tokens_to_ids("<image>")
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
                "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT: {% endif %}")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default", chat_template=template,
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok)),
                      vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                      image_token_index=image_id, image_seq_length=4)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(d + "/model")
    proc.save_pretrained(d + "/model")
    os.makedirs(d + "/images")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(f"{d}/images/{i}.png")
        recs.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."},
            {"from": "gpt", "value": f"A noisy picture number {i} with many colours."}]})
    json.dump(recs, open(d + "/captions.json", "w"))
    script = os.path.join(os.path.dirname(__file__), "..", "make_calibration.py")
    subprocess.run([sys.executable, script, "--model", d + "/model", "--captions", d + "/captions.json", "--images",
                    d + "/images", "--out", d + "/calib.safetensors", "--n-samples", "3"], check=True)
    b = load_file(d + "/calib.safetensors")
    n, t, _ = b["inputs_embeds"].shape
    assert n == 3 and b["vision_mask"].sum() == 3 * 4, (n, b["vision_mask"].sum())
    order = list(range(4))
    import random
    random.Random(42).shuffle(order)
    worst = 0.0
    for s in range(n):
        i = order[s]
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
        bot = {"role": "assistant", "content": [{"type": "text", "text": f"A noisy picture number {i} with many colours."}]}
        full = proc.apply_chat_template([user, bot])
        batch = proc(images=Image.open(f"{d}/images/{i}.png").convert("RGB"), text=full, return_tensors="pt")
        L = batch["input_ids"].shape[1]
        with torch.no_grad():
            ref = model(**batch).logits[0]
            emb = b["inputs_embeds"][s:s + 1, :L]
            got = model.lm_head(model.model.language_model(inputs_embeds=emb, attention_mask=b["attention_mask"][s:s + 1, :L]).last_hidden_state)[0]
        worst = max(worst, float((ref - got).abs().max()))
        lab = b["labels"][s, :L]
        text = tok.decode(lab[lab != -100].tolist()).strip()
        assert text == f"A noisy picture number {i} with many colours.</s>", f"labels are the assistant's tokens: {text!r}"
    assert worst < 1e-5, worst
    print(f"make_calibration OK: {n} samples x {t} tokens, logits max abs diff {worst:.2e} -> {d}")


if __name__ == "__main__":
    main()
