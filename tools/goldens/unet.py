"""Writes U-Net golden fixtures for sdbooth's parity tests (tiny-sd1 and tiny-sd2).

For each config: diffusers' UNet2DConditionModel with the same architecture as sdbooth's
`ModelConfig::tiny_sd1()` / `tiny_sd2()` (crates/sdbooth-models/src/config.rs), weights from
sdbooth's own seeded generator (crates/sdbooth-models/src/init.rs, reimplemented bit-exactly
below, InitStyle::AllRandom), fixed inputs, the output, and the gradients of every parameter and
input for loss = (out * g).sum().

Weights are not stored (the Rust test regenerates them). Gradients of small tensors (<= 4096
elements) are stored whole; for larger ones the fixture holds their norm and 16 random-sign
projections in f64 (`gproj.*`, `gnorm.*`): projections are linear, so ||P(ours - torch)|| / sqrt(16)
estimates ||ours - torch|| (Johnson-Lindenstrauss) and the norm-relative error can be checked
without megabytes of fixtures.

Run: tools/.venv/bin/python tools/goldens/unet.py
Writes crates/sdbooth-models/tests/fixtures/unet_tiny_sd{1,2}.safetensors and .json (names/shapes),
and unet_tiny_sd1_65x64.* (a latent size that is not a multiple of 8).
"""
import json
import pathlib

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "crates/sdbooth-models/tests/fixtures"
SEED = 1234
SMALL = 1024
K_PROJ = 16

M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(z):
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def fnv1a64(s):
    h = 0xCBF29CE484222325
    for b in s.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def stream(key, n):
    """mix(key + (i + 1) * GOLDEN) for i in 0..n."""
    i = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix(np.uint64(key) + i * GOLDEN)


def param_values(name, shape, seed, all_random=True):
    """sdbooth_models::init::param_values."""
    n = int(np.prod(shape)) if len(shape) else 1
    is_bias = name.endswith("bias")
    if len(shape) >= 2 and not is_bias:
        fan_in = int(np.prod(shape[1:]))
        centre, a = 0.0, (3.0 / max(fan_in, 1)) ** 0.5
    else:
        centre = 0.0 if is_bias else 1.0
        a = 0.1 if all_random else 0.0
    if a == 0.0:
        return np.full(shape, centre, dtype=np.float32)
    key = fnv1a64(name) ^ int(mix(np.uint64(seed)))
    u = (stream(key, n) >> np.uint64(40)).astype(np.float64) / float(1 << 24)
    return (centre + (2.0 * u - 1.0) * a).astype(np.float32).reshape(shape)


def projections(name, g):
    """K_PROJ random-sign projections of g (f64), as tests/unet_golden.rs computes them."""
    flat = g.detach().double().flatten().numpy()
    out = np.empty(K_PROJ, dtype=np.float64)
    for k in range(K_PROJ):
        key = fnv1a64("proj." + name) ^ int(mix(np.uint64(1000 + k)))
        signs = np.where((stream(key, flat.size) >> np.uint64(63)) == 1, -1.0, 1.0)
        out[k] = float(np.dot(signs, flat))
    return torch.from_numpy(out)


# sdbooth's ModelConfig::tiny_sd1().unet / tiny_sd2().unet in diffusers' terms.
TINY_SD1 = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=(2, 2, 2, 2),  # diffusers' name for the number of heads in SD configs
    use_linear_projection=False,
    norm_num_groups=8,
    norm_eps=1e-5,
    flip_sin_to_cos=True,
    freq_shift=0,
)
TINY_SD2 = dict(TINY_SD1, use_linear_projection=True, attention_head_dim=(2, 2, 4, 4))


def build(cfg, seed):
    torch.manual_seed(0)
    model = UNet2DConditionModel(**cfg).float()
    sd = model.state_dict()
    new = {k: torch.from_numpy(param_values(k, list(v.shape), seed)) for k, v in sd.items()}
    model.load_state_dict(new)
    return model


def write(name, cfg, tokens=77, batch=2, h=16, w=16):
    model = build(cfg, SEED)
    gen = torch.Generator().manual_seed(42)
    latents = torch.randn(batch, 4, h, w, generator=gen)
    timesteps = torch.tensor([999.0, 37.0][:batch])
    ctx = torch.randn(batch, tokens, cfg["cross_attention_dim"], generator=gen)
    g = torch.randn(batch, 4, h, w, generator=gen)
    latents.requires_grad_(True)
    ctx.requires_grad_(True)
    out = model(latents, timesteps, encoder_hidden_states=ctx).sample
    (out * g).sum().backward()

    t = {
        "latents": latents.detach(),
        "timesteps": timesteps,
        "ctx": ctx.detach(),
        "g": g,
        "out": out.detach(),
        "grad_input.latents": latents.grad,
        "grad_input.ctx": ctx.grad,
    }
    shapes = []
    for pname, p in model.named_parameters():
        shapes.append([pname, list(p.shape)])
        if p.numel() <= SMALL:
            t["grad." + pname] = p.grad.detach().clone()
        else:
            t["gproj." + pname] = projections(pname, p.grad)
            t["gnorm." + pname] = torch.tensor([p.grad.double().norm().item()], dtype=torch.float64)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(OUT / f"unet_{name}.safetensors"))
    meta = {"seed": SEED, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "params": shapes}
    (OUT / f"unet_{name}.json").write_text(json.dumps(meta, indent=0))
    n = sum(p.numel() for p in model.parameters())
    print(f"unet_{name}: {len(shapes)} tensors, {n} parameters, |out| = {out.norm():.4f}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    write("tiny_sd1", TINY_SD1)
    write("tiny_sd2", TINY_SD2)
    # A latent size that is not a multiple of 2^3 (three upsamplers): diffusers forwards each skip
    # connection's size to the upsampler (520x512 px images in SD terms).
    write("tiny_sd1_65x64", TINY_SD1, batch=1, h=65, w=64)
