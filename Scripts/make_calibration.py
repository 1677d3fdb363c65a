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
transformers-native InternVL, -hf checkpoints) through transformers' processors, and
internvl_chat (InternVL2 as released) through the checkpoint's own remote code. Calibration
needs images only: a model directory without a video processor config, or a Python without
torchvision (which transformers' video processors need), gets the family's processor
built from its image processor and tokenizer alone.

internvl_chat: config.json's auto_map names the checkpoint's Python files, which must be
in the model directory (they are loaded with trust_remote_code; nothing is downloaded).
Each image is cut as InternVL's model cards do (`dynamic_preprocess`): the grid of
448-px tiles (config: force_image_size) closest to its aspect ratio with
min_dynamic_patch..max_dynamic_patch tiles, plus a thumbnail when there is more than one
tile (use_thumbnail), normalized with ImageNet's mean and std; the prompt is the model's
own chat template (`get_conv_template(model.template)` with its system message, the
question after "<image>\n"), where `<image>` becomes `<img>`, num_image_token (256 for
InternVL2) `<IMG_CONTEXT>` tokens per tile and `</img>`, as the released `chat()` builds it.
"""
import argparse
import copy
import json
import os
import random
import sys

import struct

# --help and the model record (model_record) work without these; the export needs them
# (Scripts/requirements.txt).
try:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    no_grad = torch.no_grad()
except ImportError as missing:
    torch = None
    MISSING = missing

    def no_grad(f):
        return f


M_ROPE = ("qwen2_vl", "qwen2_5_vl")
IMAGENET_MEAN = (0.485, 0.456, 0.406)     # InternVL's image normalization (its model cards' build_transform)
IMAGENET_STD = (0.229, 0.224, 0.225)
VISUAL = ("qwen2_vl", "qwen2_5_vl")   # families whose vision tower and merger are one `visual` module


def model_class(model_type):
    import transformers
    classes = {"llava": transformers.LlavaForConditionalGeneration,
               "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
               "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
               "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
               "internvl": transformers.InternVLForConditionalGeneration}
    if model_type not in classes:
        raise SystemExit(f"model_type '{model_type}' is not supported ({', '.join(classes)}, internvl_chat)")
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
    if not list(module.buffers()):
        # A module built from its children (mlp1: LayerNorm, Linear, GELU, Linear) with
        # no buffers: its structure is all it has besides the tensors loaded next.
        return copy.deepcopy(module).to_empty(device="cpu")
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


def model_type_of(model_dir):
    path = os.path.join(model_dir, "config.json")
    try:
        return json.load(open(path))["model_type"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: no model_type ({e})")


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


def remote_code_class(model_dir):
    """The class config.json's auto_map names for AutoModel, from the model directory's own
    Python files (trust_remote_code; the files are not fetched from anywhere)."""
    path = os.path.join(model_dir, "config.json")
    ref = json.load(open(path)).get("auto_map", {}).get("AutoModel")
    if not ref or "--" in ref:
        raise SystemExit(f"{path}: internvl_chat is computed by the checkpoint's own code, but auto_map names "
                         f"AutoModel = {ref!r}, not a file of the model directory")
    source = os.path.join(model_dir, ref.rsplit(".", 1)[0] + ".py")
    if not os.path.exists(source):
        raise SystemExit(f"{source} is missing: internvl_chat is computed by the checkpoint's own code; copy the "
                         "checkpoint's .py files (modeling_internvl_chat.py, conversation.py, ...) next to config.json")
    from transformers.dynamic_module_utils import get_class_from_dynamic_module
    return get_class_from_dynamic_module(ref, model_dir)


def load_internvl_chat(model_dir):
    """InternVL2 as released: the model built on the meta device by its own remote code, then
    vision_model, mlp1 and the language model's token embeddings materialised."""
    from transformers import AutoConfig, AutoTokenizer
    cls = remote_code_class(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    with torch.device("meta"):
        model = cls(cfg)
    keys = checkpoint_keys(model_dir)
    materialize(model, "vision_model", "vision_model", keys, cfg.vision_config)
    materialize(model, "mlp1", "mlp1", keys, cfg)
    embed = model.language_model.get_input_embeddings()
    name = next(n for n, m in model.named_modules() if m is embed)   # tok_embeddings (InternLM2) or embed_tokens
    parent, attr = name.rsplit(".", 1)
    materialize(model.get_submodule(parent), attr, name, keys, cfg)
    return cfg, model, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)


def internvl_tiles(image, size, min_num, max_num, thumbnail):
    """InternVL's dynamic tiling (its model cards' `dynamic_preprocess`): among the grids of
    i x j size-px tiles (i across, j down, min_num <= i*j <= max_num, fewest tiles first)
    the one whose aspect ratio i/j is closest to the image's; on a tie the later grid when
    the image has more than half as many pixels as that grid. The image is resized to the grid (PIL
    bicubic) and cut row by row; a thumbnail (the whole image at size x size) follows
    when there is more than one tile."""
    from PIL import Image
    w, h = image.size
    grids = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                    if min_num <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(w / h - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and w * h > 0.5 * size * size * g[0] * g[1]:
            best = g
    resized = image.resize((size * best[0], size * best[1]), Image.BICUBIC)
    tiles = [resized.crop((x * size, y * size, (x + 1) * size, (y + 1) * size)) for y in range(best[1]) for x in range(best[0])]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.BICUBIC))
    return tiles


def internvl_pixels(tiles):
    """tiles (PIL RGB, size x size) -> [tiles, 3, size, size]: /255, then ImageNet mean and std."""
    import numpy as np
    x = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles])).float().div(255)
    x = (x - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    return x.permute(0, 3, 1, 2).contiguous()


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


def answer_labels(prompt_ids, ids):
    """-> labels: ids from where the prompt's tokens stop matching the full text's, -100
    before. The prompt alone may end in a token that the full text merges with the
    answer's first word (" " + "A" -> " A"), so its length would be off by one."""
    start = 0
    while start < min(len(prompt_ids), len(ids)) and int(prompt_ids[start]) == int(ids[start]):
        start += 1
    labels = torch.full_like(ids, -100)
    labels[start:] = ids[start:]
    return labels


def place_features(emb, vision, feats):
    """emb: [T, C] with the image features [N, C] written at the N image-token rows."""
    if int(vision.sum()) != feats.shape[0]:
        raise SystemExit(f"{int(vision.sum())} image tokens but {feats.shape[0]} image features")
    emb[vision] = feats.to(emb.dtype)
    return emb


@no_grad
def encode_internvl_chat(cfg, model, tokenizer, image, question, caption):
    size = cfg.force_image_size or cfg.vision_config.image_size
    if getattr(cfg, "dynamic_image_size", False):
        tiles = internvl_tiles(image, size, cfg.min_dynamic_patch, cfg.max_dynamic_patch, cfg.use_thumbnail)
    else:
        from PIL import Image
        tiles = [image.resize((size, size), Image.BICUBIC)]
    get_conv_template = getattr(sys.modules[type(model).__module__], "get_conv_template", None)
    if get_conv_template is None:
        raise SystemExit(f"{type(model).__module__} has no get_conv_template: cannot build InternVL's chat prompt")
    image_tokens = "<img>" + "<IMG_CONTEXT>" * (model.num_image_token * len(tiles)) + "</img>"

    def render(answer):
        conv = get_conv_template(model.template)
        conv.system_message = getattr(model, "system_message", conv.system_message)
        conv.append_message(conv.roles[0], "<image>\n" + question)
        conv.append_message(conv.roles[1], answer)
        return conv.get_prompt().replace("<image>", image_tokens, 1)

    ids = tokenizer(render(caption), return_tensors="pt")["input_ids"][0]
    prompt_ids = tokenizer(render(None), return_tensors="pt")["input_ids"][0]
    context = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    if context is None or context == tokenizer.unk_token_id:
        raise SystemExit("the tokenizer has no <IMG_CONTEXT> token")
    emb = model.language_model.get_input_embeddings()(ids[None])[0].clone()
    vision = ids == context
    feats = model.extract_feature(internvl_pixels(tiles))
    place_features(emb, vision, feats.reshape(-1, emb.shape[-1]))
    return emb, vision, answer_labels(prompt_ids, ids), torch.arange(ids.shape[0])[None]


@no_grad
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
    place_features(emb, vision, feats.reshape(-1, emb.shape[-1]))
    labels = answer_labels(prompt_ids, ids)
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


def language_embedding(model_dir):
    """-> (file, name) of the language model's token embedding table in the checkpoint's
    safetensors files (found by its name: embed_tokens, or InternLM2's tok_embeddings)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        files = {n: os.path.join(model_dir, f) for n, f in json.load(open(index))["weight_map"].items()}
    else:
        files = {n: os.path.join(model_dir, "model.safetensors") for n in safetensors_header(os.path.join(model_dir, "model.safetensors"))[0]}
    names = [n for n in files if n.endswith(".embed_tokens.weight") or n.endswith(".tok_embeddings.weight")]
    if len(names) != 1:
        raise SystemExit(f"{model_dir}: expected one token embedding table (embed_tokens / tok_embeddings), found {names}")
    return files[names[0]], names[0]


def safetensors_header(path):
    """-> (header dict without __metadata__, data section offset)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


def model_record(model_dir):
    """What the bundle records of its model (docs/OPERATIONS.md, "Bundles record their model";
    Swift: ModelRecord): model_type, the embedding table's vocabulary and hidden sizes, and
    its fingerprint: SHA-256 over 16 evenly spaced rows (row i * (V - 1) // 15), each as
    fp32 little-endian, whatever the stored dtype. Reads those rows only, no torch."""
    import hashlib
    path, name = language_embedding(model_dir)
    header, data = safetensors_header(path)
    e = header[name]
    vocab, hidden = e["shape"]
    width = {"BF16": 2, "F16": 2, "F32": 4}[e["dtype"]]
    rows = [0] if vocab <= 1 else [i * (vocab - 1) // 15 for i in range(16)]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for r in rows:
            f.seek(data + e["data_offsets"][0] + r * hidden * width)
            raw = f.read(hidden * width)
            if e["dtype"] == "BF16":
                vals = struct.unpack(f"<{hidden}H", raw)
                digest.update(struct.pack(f"<{hidden}I", *[v << 16 for v in vals]))
            elif e["dtype"] == "F16":
                digest.update(struct.pack(f"<{hidden}f", *struct.unpack(f"<{hidden}e", raw)))
            else:
                digest.update(raw)
    return {"model_type": model_type_of(model_dir), "hidden_size": str(hidden), "vocab_size": str(vocab),
            "embed_fingerprint": digest.hexdigest()}


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
    if torch is None:
        raise SystemExit(f"make_calibration.py needs PyTorch, transformers and safetensors ({MISSING}): "
                         "pip install -r Scripts/requirements.txt")
    from PIL import Image
    records = json.load(open(a.captions))
    random.Random(a.seed).shuffle(records)
    if model_type_of(a.model) == "internvl_chat":
        cfg, model, tokenizer = load_internvl_chat(a.model)

        def encode_sample(image, question, caption):
            return encode_internvl_chat(cfg, model, tokenizer, image, question, caption)
    else:
        cfg, model = load_parts(a.model)
        processor = load_processor(a.model, cfg.model_type)
        tokenizer = processor.tokenizer

        def encode_sample(image, question, caption):
            return encode(cfg, model, processor, image, question, caption)
    side = getattr(tokenizer, "padding_side", "right")
    rows = []
    for r in records:
        if len(rows) == a.n_samples:
            break
        conv = r["conversations"]
        question = conv[0]["value"].replace("<image>", "").strip()
        caption = conv[1]["value"].strip()
        image = Image.open(os.path.join(a.images, r["image"])).convert("RGB")
        emb, vision, labels, pos = encode_sample(image, question, caption)
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
    save_file({k: v.contiguous() for k, v in out.items()}, tmp,
              metadata={"format": "mbq-calib", "version": "1", **model_record(a.model)})
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {n} samples x {t} tokens ({side} padding), hidden {h}, position rows {nrows}")


if __name__ == "__main__":
    main()
