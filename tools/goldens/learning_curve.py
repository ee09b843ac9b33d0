"""Learning-curve golden for sdbooth's trainer (crates/sdbooth-train/tests/learning_curve.rs).

One toy image (a fixed latent [1, 4, 8, 8]) with one caption, trained for 200 steps on tiny-sd1
(U-Net and text encoder, sdbooth's AllRandom seeded weights as in train_step.py) with kohya's
train_db.py step (train_step.kohya_loss), accelerate's clip_grad_norm_(1.0) and
torch.optim.AdamW(lr 1e-4, betas 0.9/0.999, eps 1e-8, weight_decay 0.01). Records the loss of
every step, for the run in float32 (what a real run computes) and in float64 (the exact answer).

Noise and timesteps of every step come from a seeded scheme the Rust test reproduces exactly,
so nothing but the losses is stored:

    key(s)         = fnv1a64(s) ^ mix(SEED)                      (sdbooth_models::init)
    r_j            = mix(key + (j + 1) * 0x9E3779B97F4A7C15)     j = 0, 1, ...
    gaussian(s, n) = Box-Muller in f64 on pairs (r_2i, r_2i+1), rounded to f32:
                     u1 = ((r_2i >> 11) + 1) / 2^53, u2 = (r_2i+1 >> 11) / 2^53,
                     z_i = sqrt(-2 ln u1) * cos(2 pi u2)
    latent         = 0.8 * gaussian("lc.latent", 256)            (in f32)
    noise of step i     = gaussian(f"lc.noise.{i}", 256)
    timestep of step i  = r_0 of key(f"lc.t.{i}") mod 1000

`math.log`/`math.cos` (the C library's, as Rust's f64::ln/cos) are used so both sides get the
same f64 values; per-step noise sums are stored to check that.

Run from the repository root:  tools/.venv/bin/python tools/goldens/learning_curve.py
Writes crates/sdbooth-train/tests/fixtures/learning_curve/learning_curve.json.
"""

import json
import math
import pathlib
import sys

import numpy as np
import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step as ts  # noqa: E402
from unet import fnv1a64, mix  # noqa: E402

OUT = ts.ROOT / "crates/sdbooth-train/tests/fixtures/learning_curve"
SEED = 2026
STEPS = 200
LR = 1e-4
CAPTION = "a photo of sks dog"
GOLDEN = 0x9E3779B97F4A7C15
M64 = (1 << 64) - 1


def key(s):
    return fnv1a64(s) ^ int(mix(np.uint64(SEED)))


def r(k, j):
    return int(mix(np.uint64((k + (j + 1) * GOLDEN) & M64)))


def gaussian(s, n):
    k = key(s)
    out = []
    for i in range(n):
        a, b = r(k, 2 * i), r(k, 2 * i + 1)
        u1 = ((a >> 11) + 1) / 2.0**53
        u2 = (b >> 11) / 2.0**53
        out.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return torch.tensor(out, dtype=torch.float32)


def inputs():
    latent = (gaussian("lc.latent", 256) * torch.tensor(0.8, dtype=torch.float32)).reshape(1, 4, 8, 8)
    noises = [gaussian(f"lc.noise.{i}", 256).reshape(1, 4, 8, 8) for i in range(STEPS)]
    timesteps = [r(key(f"lc.t.{i}"), 0) % 1000 for i in range(STEPS)]
    return latent, noises, timesteps


def run(dtype, latent, noises, timesteps, ids, sched):
    torch.set_default_dtype(dtype)
    unet, te = ts.build_models("tiny-sd1", dtype)
    params = ts.named_params(unet, te)
    opt = torch.optim.AdamW([p for _, _, p in params], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    weights = torch.tensor([1.0], dtype=torch.float32)
    losses = []
    for i in range(STEPS):
        t = torch.tensor([timesteps[i]], dtype=torch.long)
        loss = ts.kohya_loss(unet, te, ids, latent.to(dtype), noises[i].to(dtype), t, weights, False, None, sched)
        loss.backward()
        ts.clip_(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.set_default_dtype(torch.float32)
    return losses


def main():
    torch.set_num_threads(1)
    sched = ts.scheduler()
    latent, noises, timesteps = inputs()
    ids = ts.token_ids(ts.tokenizer(False), [CAPTION])
    f32 = run(torch.float32, latent, noises, timesteps, ids, sched)
    f64 = run(torch.float64, latent, noises, timesteps, ids, sched)
    rel = [abs(a - b) / abs(b) for a, b in zip(f32, f64)]
    print(f"f32 vs f64: mean rel diff {sum(rel) / len(rel):.2e}, max {max(rel):.2e}")
    print(f"loss: first 5 {[round(x, 4) for x in f32[:5]]}, last 5 {[round(x, 4) for x in f32[-5:]]}")
    w = 20
    print("moving mean of 20:", [round(sum(f32[i : i + w]) / w, 4) for i in range(0, STEPS, w)])
    meta = {
        "seed": SEED,
        "steps": STEPS,
        "learning_rate": LR,
        "caption": CAPTION,
        "model_seeds": ts.SEEDS["tiny-sd1"],
        "ids": ids[0].tolist(),
        "latent_sum": float(latent.double().sum()),
        "timesteps": timesteps,
        "noise_sums": [float(n.double().sum()) for n in noises],
        "losses_f32": f32,
        "losses_f64": f64,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "learning_curve.json"
    path.write_text(json.dumps(meta) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
