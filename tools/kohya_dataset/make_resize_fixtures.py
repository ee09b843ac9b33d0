"""Writes resize goldens for sdbooth-data: a small noise image shrunk with OpenCV INTER_AREA
(kohya's default when both sides shrink) and enlarged with PIL LANCZOS (kohya's default
otherwise). Run: tools/.venv/bin/python tools/kohya_dataset/make_resize_fixtures.py
"""

import os

import cv2
import numpy as np
from PIL import Image

OUT = os.path.join(os.path.dirname(__file__), "..", "..", "crates", "sdbooth-data", "tests", "fixtures", "resize")


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = np.random.default_rng(0)
    # smooth-ish noise: random blocks, so the goldens are small but not trivial
    img = cv2.resize((rng.random((9, 12, 3)) * 255).astype(np.uint8), (47, 37), interpolation=cv2.INTER_NEAREST)
    img = np.clip(img.astype(np.int32) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(OUT, "src_47x37.png"))
    for w, h in [(23, 18), (30, 21), (40, 32)]:
        out = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        Image.fromarray(out).save(os.path.join(OUT, f"area_{w}x{h}.png"))
    up = Image.fromarray(img).resize((70, 55), Image.LANCZOS)
    up.save(os.path.join(OUT, "lanczos_70x55.png"))


if __name__ == "__main__":
    main()
