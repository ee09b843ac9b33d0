"""Writes examples/toy: a tiny DreamBooth dataset (instance + reg folders, captions, dataset.toml).

Images are drawn (a brown "dog" blob on a coloured background), small and of varied aspect
ratios, so the dataset stays well under 300 KB. It also holds two odd cases on purpose:
a `.txt` caption that kohya does not read (caption_extension is `.caption`) and a JPEG file
named `.png` (read by content). Run: tools/.venv/bin/python tools/kohya_dataset/make_toy.py
"""

import os
import shutil
import sys

from PIL import Image, ImageDraw

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "examples", "toy"))


def draw(w, h, bg, body, seed):
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    cx, cy = w // 2 + (seed % 3 - 1) * w // 10, h // 2 + (seed % 2) * h // 12
    rx, ry = w // 4, h // 5
    d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=body)  # body
    d.ellipse([cx + rx - w // 10, cy - ry - h // 8, cx + rx + w // 10, cy - ry + h // 12], fill=body)  # head
    d.rectangle([cx - rx + 4, cy + ry - 4, cx - rx + 10, cy + ry + h // 8], fill=body)  # legs
    d.rectangle([cx + rx - 10, cy + ry - 4, cx + rx - 4, cy + ry + h // 8], fill=body)
    d.ellipse([cx + rx, cy - ry - h // 14, cx + rx + 4, cy - ry - h // 14 + 4], fill=(10, 10, 10))  # eye
    return img


def main():
    if os.path.isdir(ROOT):
        for sub in ("instance", "reg"):
            shutil.rmtree(os.path.join(ROOT, sub), ignore_errors=True)
    os.makedirs(os.path.join(ROOT, "instance"), exist_ok=True)
    os.makedirs(os.path.join(ROOT, "reg"), exist_ok=True)
    sks = (150, 90, 40)
    instance = [
        ("sks_01.png", 192, 128, (120, 170, 220), "a photo of sks dog on a beach, wide shot"),
        ("sks_02.png", 128, 192, (90, 160, 90), "a photo of sks dog in the grass, portrait"),
        ("sks_03.png", 160, 160, (200, 200, 210), "a photo of sks dog, studio background"),
        ("sks_04.png", 96, 144, (230, 190, 120), None),  # no .caption: class_tokens; has an unused .txt
        ("sks_05.png", 176, 112, (60, 60, 90), "a photo of sks dog at night"),  # JPEG content, .png name
    ]
    for i, (name, w, h, bg, cap) in enumerate(instance):
        img = draw(w, h, bg, sks, i)
        path = os.path.join(ROOT, "instance", name)
        if name == "sks_05.png":
            img.save(path, format="JPEG", quality=85)
        else:
            img.save(path, format="PNG", optimize=True)
        if cap is not None:
            with open(os.path.splitext(path)[0] + ".caption", "w", encoding="utf-8") as f:
                f.write(cap + "\n")
    with open(os.path.join(ROOT, "instance", "sks_04.txt"), "w", encoding="utf-8") as f:
        f.write("this .txt caption is not used, because caption_extension is .caption\n")
    reg_colors = [(140, 140, 140), (40, 40, 40), (230, 230, 220), (180, 120, 60), (90, 60, 30), (200, 170, 120)]
    reg_sizes = [(128, 128), (160, 128), (128, 160), (192, 128), (144, 96), (112, 176)]
    for i, ((w, h), body) in enumerate(zip(reg_sizes, reg_colors)):
        bg = (100 + 20 * i, 150, 200 - 15 * i)
        draw(w, h, bg, body, i + 7).save(os.path.join(ROOT, "reg", f"dog_{i + 1:02d}.png"), format="PNG", optimize=True)
    with open(os.path.join(ROOT, "dataset.toml"), "w", encoding="utf-8") as f:
        f.write(
            """# A tiny DreamBooth dataset for builtin:tiny-sd1 (kohya's dataset_config format).
# image_dir paths are relative to the working directory (run from examples/toy), as in kohya.

[general]
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 256
bucket_reso_steps = 64
shuffle_caption = false
caption_extension = ".caption"

[[datasets]]
resolution = 128
batch_size = 1

  [[datasets.subsets]]
  image_dir = "instance"
  class_tokens = "sks dog"
  num_repeats = 10

  [[datasets.subsets]]
  image_dir = "reg"
  class_tokens = "dog"
  is_reg = true
  num_repeats = 1
"""
        )
    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(ROOT) for fn in fns)
    print(f"wrote {ROOT} ({total} bytes)")
    if total > 300_000:
        sys.exit("examples/toy is over 300 KB")


if __name__ == "__main__":
    main()
