#!/usr/bin/env python3
"""Builds an mbq-calib v1 calibration bundle (docs/DESIGN.md §4) from a Hugging Face VLM
directory and a ShareGPT4V-style caption file, with transformers.

Only the processor, the vision tower, the projector and the token embeddings are
loaded: the model is instantiated on the meta device and just those modules are
materialised from the safetensors files, so a 72B language model is never read.

  python Scripts/make_calibration.py --model DIR --captions sharegpt4v.json --images IMG_DIR \\
      --out calib.safetensors [--n-samples 128] [--seed 42] [--max-length 2048] [--dtype bf16]

Caption file: a JSON list of {"image": "relative/path.jpg", "conversations": [
  {"from": "human", "value": "<image>\\nDescribe the image."}, {"from": "gpt", "value": "A caption."}]}.
Samples are shuffled deterministically (--seed), rendered in the model's chat template
(user turn: image + question; assistant turn: the caption), and labelled so that only
the assistant's tokens count (labels = -100 elsewhere). Padding follows the tokenizer's
padding_side. Qwen2-VL and Qwen2.5-VL get their real M-RoPE position ids ([3, N, T]).

Families: llava (LLaVA-1.5), llava_onevision, qwen2_vl, qwen2_5_vl, internvl (the
transformers-native InternVL, -hf checkpoints). Calibration needs images only: a model
directory without a video processor config, or a Python without torchvision (which
transformers' video processors need), gets the family's processor built from its image
processor and tokenizer alone.
"""
import argparse
import json
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import save_file


M_ROPE = ("qwen2_vl", "qwen2_5_vl")
VISUAL = ("qwen2_vl", "qwen2_5_vl")   # families whose vision tower and merger are one `visual` module


def model_class(model_type):
    import transformers
    classes = {"llava": transformers.LlavaForConditionalGeneration,
               "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
               "internvl": transformers.InternVLForConditionalGeneration}
    if model_type not in classes:
        raise SystemExit(f"model_type '{model_type}' is not supported ({', '.join(classes)})"
                         + ("; InternVL2 as released (internvl_chat) is not supported by this exporter yet" if model_type == "internvl_chat" else ""))
    return classes[model_type]


def processor_class(model_type):
    import transformers
    return {"llava": transformers.LlavaProcessor, "llava_onevision": transformers.LlavaOnevisionProcessor,
            "qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
            "internvl": transformers.InternVLProcessor}[model_type]


def images_only(cls):
    """The family's processor class, accepting no video processor."""
    class ImagesOnly(cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    ImagesOnly.__name__ = cls.__name__
    return ImagesOnly


def checkpoint_keys(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        wm = json.load(open(index))["weight_map"]
        return {k: os.path.join(model_dir, f) for k, f in wm.items()}
    path = os.path.join(model_dir, "model.safetensors")
    with safe_open(path, "pt") as f:
        return {k: path for k in f.keys()}


def fresh_copy(module, model_config):
    """The same module built for real on the CPU (buffers such as position ids are
    computed by its constructor; the meta-device original has none)."""
    if isinstance(module, torch.nn.Embedding):
        return torch.nn.Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx)
    for cfg in (getattr(module, "config", None), model_config):
        if cfg is None:
            continue
        try:
            return type(module)(cfg)
        except Exception:
            continue
    raise SystemExit(f"cannot build a {type(module).__name__} outside the model")


def materialize(parent, attr, qualified, keys, model_config):
    """Replaces parent.attr (on the meta device) by a CPU copy holding the checkpoint's
    tensors, whichever naming they were saved with (transformers renamed
    `language_model.model.` to `model.language_model.` and so on)."""
    module = getattr(parent, attr)
    names = list(module.state_dict().keys())
    parts = qualified.split(".")
    candidates = {".".join(parts[i:]) + "." for i in range(len(parts))}
    candidates |= {c.replace("language_model.", "language_model.model.") for c in list(candidates)}
    candidates |= {c.replace("model.language_model.", "model.") for c in list(candidates)}
    candidates |= {c.replace("model.visual.", "visual.") for c in list(candidates)}
    for prefix in sorted(candidates, key=len, reverse=True):
        if all(prefix + n in keys for n in names):
            fresh = fresh_copy(module, model_config)
            sd = {}
            for n in names:
                with safe_open(keys[prefix + n], "pt") as f:
                    sd[n] = f.get_tensor(prefix + n).float()
            fresh.load_state_dict(sd, strict=True)
            setattr(parent, attr, fresh.float().eval())
            return prefix
    raise SystemExit(f"cannot find the tensors of {qualified} in the checkpoint (tried {sorted(candidates)})")


def load_parts(model_dir):
    from transformers import AutoConfig
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = model_class(cfg.model_type)(cfg)
    keys = checkpoint_keys(model_dir)
    inner = model.model
    if cfg.model_type in VISUAL:
        materialize(inner, "visual", "model.visual", keys, cfg.vision_config)
    else:
        materialize(inner, "vision_tower", "model.vision_tower", keys, cfg.vision_config)
        materialize(inner, "multi_modal_projector", "model.multi_modal_projector", keys, cfg)
    if getattr(inner, "image_newline", None) is not None:
        key = [k for k in keys if k.endswith("image_newline")][0]
        with safe_open(keys[key], "pt") as f:
            inner.image_newline = torch.nn.Parameter(f.get_tensor(key).float())
    materialize(inner.language_model, "embed_tokens", "model.language_model.embed_tokens", keys, cfg)
    return cfg, model


def load_processor(model_dir, model_type):
    """The model's processor; failing that (no video processor config, or no
    torchvision for the video processor), the family's processor from the image
    processor, the tokenizer, processor_config.json and the chat template alone."""
    import inspect
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    try:
        return AutoProcessor.from_pretrained(model_dir)
    except Exception as e:
        first = e
    cls = images_only(processor_class(model_type))
    kwargs = {}
    path = os.path.join(model_dir, "processor_config.json")
    if os.path.exists(path):
        params = inspect.signature(processor_class(model_type).__init__).parameters
        kwargs = {k: v for k, v in json.load(open(path)).items() if k in params and k not in ("image_processor", "tokenizer", "video_processor")}
    template = None
    for name in ("chat_template.jinja", "chat_template.json"):
        p = os.path.join(model_dir, name)
        if os.path.exists(p):
            text = open(p).read()
            template = json.loads(text)["chat_template"] if name.endswith(".json") else text
            break
    try:
        proc = cls(image_processor=AutoImageProcessor.from_pretrained(model_dir), tokenizer=AutoTokenizer.from_pretrained(model_dir),
                   video_processor=None, chat_template=template, **kwargs)
    except Exception as e:
        raise SystemExit(f"cannot build the processor of {model_dir}: {first}; without a video processor: {e}")
    print(f"processor: {type(proc).__name__} without a video processor ({str(first).splitlines()[0][:120]})")
    return proc


@torch.no_grad()
def encode(cfg, model, processor, image, question, caption):
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    bot = {"role": "assistant", "content": [{"type": "text", "text": caption}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True)
    full = processor.apply_chat_template([user, bot])
    batch = processor(images=image, text=full, return_tensors="pt")
    prompt_ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0]
    ids = batch["input_ids"][0]
    inner = model.model
    emb = inner.language_model.embed_tokens(ids[None])[0].clone()
    image_token = cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index
    vision = ids == image_token
    kwargs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "pixel_values", "mm_token_type_ids")}
    feats = model.get_image_features(pixel_values=batch["pixel_values"], **kwargs)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, emb.shape[-1]) for f in feats])
    elif hasattr(feats, "pooler_output"):
        feats = feats.pooler_output if not isinstance(feats.pooler_output, (list, tuple)) else torch.cat(feats.pooler_output)
    feats = feats.reshape(-1, emb.shape[-1])
    if int(vision.sum()) != feats.shape[0]:
        raise SystemExit(f"{int(vision.sum())} image tokens but {feats.shape[0]} image features")
    emb[vision] = feats.to(emb.dtype)
    # The answer starts where the prompt's tokens stop matching the full text's: the
    # prompt alone may end in a token that the full text merges with the answer's first
    # word (" " + "A" -> " A"), so its length would be off by one.
    start = 0
    while start < min(len(prompt_ids), len(ids)) and int(prompt_ids[start]) == int(ids[start]):
        start += 1
    labels = torch.full_like(ids, -100)
    labels[start:] = ids[start:]
    if cfg.model_type in M_ROPE:
        import inspect
        extra = {}
        if "mm_token_type_ids" in inspect.signature(inner.get_rope_index).parameters:   # transformers >= 5
            extra["mm_token_type_ids"] = batch["mm_token_type_ids"]
        pos, _ = inner.get_rope_index(ids[None], image_grid_thw=batch.get("image_grid_thw"), attention_mask=torch.ones_like(ids)[None],
                                      **extra)
        pos = pos[:, 0]
    else:
        pos = torch.arange(ids.shape[0])[None]
    return emb, vision, labels, pos


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--captions", required=True)
    ap.add_argument("--images", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    a = ap.parse_args()
    from PIL import Image
    records = json.load(open(a.captions))
    random.Random(a.seed).shuffle(records)
    cfg, model = load_parts(a.model)
    processor = load_processor(a.model, cfg.model_type)
    side = getattr(processor.tokenizer, "padding_side", "right")
    rows = []
    for r in records:
        if len(rows) == a.n_samples:
            break
        conv = r["conversations"]
        question = conv[0]["value"].replace("<image>", "").strip()
        caption = conv[1]["value"].strip()
        image = Image.open(os.path.join(a.images, r["image"])).convert("RGB")
        emb, vision, labels, pos = encode(cfg, model, processor, image, question, caption)
        if emb.shape[0] > a.max_length:
            print(f"skipping {r['image']}: {emb.shape[0]} tokens > --max-length {a.max_length}")
            continue
        rows.append((emb, vision, labels, pos))
    if not rows:
        raise SystemExit("no usable samples")
    t = max(e.shape[0] for e, *_ in rows)
    n, h = len(rows), rows[0][0].shape[-1]
    nrows = rows[0][3].shape[0]
    out = {"inputs_embeds": torch.zeros(n, t, h), "attention_mask": torch.zeros(n, t, dtype=torch.int64),
           "vision_mask": torch.zeros(n, t, dtype=torch.int64), "labels": torch.full((n, t), -100, dtype=torch.int64),
           "position_ids": torch.ones(nrows, n, t, dtype=torch.int64)}
    for i, (emb, vision, labels, pos) in enumerate(rows):
        L = emb.shape[0]
        sl = slice(t - L, t) if side == "left" else slice(0, L)
        out["inputs_embeds"][i, sl] = emb
        out["attention_mask"][i, sl] = 1
        out["vision_mask"][i, sl] = vision.long()
        out["labels"][i, sl] = labels
        out["position_ids"][:, i, sl] = pos
    if nrows == 1:
        out["position_ids"] = out["position_ids"][0]
    if a.dtype == "bf16":
        out["inputs_embeds"] = out["inputs_embeds"].to(torch.bfloat16)
    tmp = a.out + ".tmp"
    save_file({k: v.contiguous() for k, v in out.items()}, tmp, metadata={"format": "mbq-calib", "version": "1"})
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {n} samples x {t} tokens ({side} padding), hidden {h}, position rows {nrows}")


if __name__ == "__main__":
    main()
