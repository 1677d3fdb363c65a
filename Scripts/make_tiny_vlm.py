#!/usr/bin/env python3
"""A stand-in for a downloaded VLM and a folder of captioned pictures, to try the README's
quickstart offline in a minute: a tiny LLaVA-OneVision (random weights, 2 decoder layers of
hidden size 128, its tokenizer, image processor and chat template; built as
Scripts/reference/test_make_calibration.py builds its test models) and N pictures of
coloured shapes drawn here, with a ShareGPT4V-style caption file that describes each.

  .venv/bin/python Scripts/make_tiny_vlm.py --out tiny [--pictures 24]
  -> tiny/model/ (a Hugging Face model directory), tiny/images/*.png, tiny/captions.json

With a real model you skip this: your model directory, your images and your caption file
take their places (README, Quickstart).
"""
import argparse
import json
import os
import random
import sys

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference"))
import test_make_calibration as tm  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(rng, path):
    """One picture of one or two shapes -> its caption."""
    img = Image.new("RGB", (56, 56), (255, 255, 255))
    d = ImageDraw.Draw(img)
    parts = []
    for i in range(rng.choice((1, 2))):
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(SHAPES)
        x, y, s = rng.randint(2, 30), rng.randint(2, 30), rng.randint(14, 24)
        box = (x, y, x + s, y + s)
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    img.save(path)
    return "The picture shows " + " and ".join(parts) + " on a white background."


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pictures", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.path.exists(a.out):
        raise SystemExit(f"{a.out} exists")
    torch.manual_seed(a.seed)
    tm.TEXT.update(hidden_size=128, intermediate_size=256)  # group 128 needs input dims that are multiples of 128
    model, proc = tm.build("llava_onevision")
    model.eval().save_pretrained(os.path.join(a.out, "model"))
    tm.save_without_video(proc, os.path.join(a.out, "model"))
    os.makedirs(os.path.join(a.out, "images"))
    rng = random.Random(a.seed)
    records = []
    for i in range(a.pictures):
        caption = draw(rng, os.path.join(a.out, "images", f"{i:03d}.png"))
        records.append({"image": f"{i:03d}.png", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."}, {"from": "gpt", "value": caption}]})
    with open(os.path.join(a.out, "captions.json"), "w") as f:
        json.dump(records, f, indent=1)
    print(f"wrote {a.out}/model (tiny llava_onevision), {a.pictures} pictures in {a.out}/images, {a.out}/captions.json")


if __name__ == "__main__":
    main()
