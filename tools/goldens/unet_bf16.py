"""Writes how far PyTorch's CPU autocast-bf16 lands from f32 for the tiny-sd1 U-Net, the bar for
sdbooth's `--mixed_precision bf16` (crates/sdbooth-models/tests/unet_golden.rs,
`unet_tiny_sd1_bf16_is_as_close_to_f32_as_autocast`).

Same model, weights and inputs as unet.py's `tiny_sd1` fixture (whose f32 output and gradients
are the reference on both sides). Under `torch.autocast("cpu", dtype=torch.bfloat16)` convs,
linears and attention products run in bf16 with f32 master weights, norms and softmax in f32.
The fixture holds the norm-relative errors against the f32 run: output, input gradients, and the
parameter gradients (all tensors together, and the median over tensors).

Run: /work/coord/venv/bin/python tools/goldens/unet_bf16.py (torch 2.6.0, diffusers 0.32.1)
Writes crates/sdbooth-models/tests/fixtures/unet_tiny_sd1_autocast_bf16.json.
"""
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from unet import OUT, SEED, TINY_SD1, build  # noqa: E402


def run(model, latents, timesteps, ctx, g, autocast):
    model.zero_grad()
    lat = latents.clone().requires_grad_(True)
    c = ctx.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(lat, timesteps, encoder_hidden_states=c).sample
    (out.float() * g).sum().backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    return out.detach().double(), lat.grad.double(), c.grad.double(), grads


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    torch.set_num_threads(1)
    model = build(TINY_SD1, SEED)
    # The inputs of unet.py's write("tiny_sd1"): same generator, same order.
    gen = torch.Generator().manual_seed(42)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([999.0, 37.0])
    ctx = torch.randn(2, 77, TINY_SD1["cross_attention_dim"], generator=gen)
    g = torch.randn(2, 4, 16, 16, generator=gen)
    out32, lat32, ctx32, p32 = run(model, latents, timesteps, ctx, g, autocast=False)
    # The f32 run is the checked-in fixture's (same weights and inputs), which the Rust test uses.
    from safetensors.torch import load_file
    fixture = load_file(str(OUT / "unet_tiny_sd1.safetensors"))
    assert torch.equal(fixture["latents"], latents) and torch.equal(fixture["ctx"], ctx)
    # (within f32 rounding: the fixture may have been written by another torch build/thread count)
    assert rel(out32, fixture["out"].double()) < 1e-5, "f32 run differs from unet_tiny_sd1's"
    out16, lat16, ctx16, p16 = run(model, latents, timesteps, ctx, g, autocast=True)
    per_param = sorted(rel(p16[n], p32[n]) for n in p32)
    num = sum(float((p16[n] - p32[n]).norm()) ** 2 for n in p32) ** 0.5
    den = sum(float(p32[n].norm()) ** 2 for n in p32) ** 0.5
    errs = {
        "out": rel(out16, out32),
        "grad_latents": rel(lat16, lat32),
        "grad_ctx": rel(ctx16, ctx32),
        "grad_params_all": num / den,
        "grad_params_median": per_param[len(per_param) // 2],
        "grad_params_worst": per_param[-1],
    }
    meta = {"torch": torch.__version__, "seed": SEED, "case": "tiny_sd1",
            "autocast_bf16_rel_err_vs_f32": errs}
    path = OUT / "unet_tiny_sd1_autocast_bf16.json"
    path.write_text(json.dumps(meta, indent=1) + "\n")
    print(path, json.dumps(errs, indent=1))


if __name__ == "__main__":
    main()
