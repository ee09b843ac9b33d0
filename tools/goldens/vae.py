"""Golden fixture for sdbooth's VAE (crates/sdbooth-models/src/vae.rs).

Writes crates/sdbooth-models/tests/fixtures/vae_tiny.safetensors: diffusers' AutoencoderKL with the
tiny config of config.rs (block_out_channels [16, 16, 32, 32], layers_per_block 1, norm_num_groups 8,
latent_channels 4), seeded random weights, and

  encoder: images [2, 3, 32, 32] in [-1, 1] -> posterior mean and std [2, 4, 4, 4];
           gradient of every encoder parameter (and quant_conv) and of the images for
           loss = (mean * g_mean).sum() + (std * g_std).sum()
  decoder: latents [2, 4, 4, 4] -> images [2, 3, 32, 32];
           gradient of every decoder parameter (and post_quant_conv) and of the latents for
           loss = (out * g_out).sum()

Compute runs in float64 on float32-representable weights and inputs (the Rust side runs f32).
Run from the repository root:  tools/.venv/bin/python tools/goldens/vae.py
"""

import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

OUT = "crates/sdbooth-models/tests/fixtures"


def main() -> None:
    gen = torch.Generator().manual_seed(2001)
    # Mirrors ModelConfig::tiny_sd1().vae in config.rs.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 16, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.18215,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
    tensors = {f"param.{n}": p.detach().clone() for n, p in vae.named_parameters()}
    vae = vae.double()

    images = (torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1).double().requires_grad_()
    posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean, posterior.std
    g_mean = torch.randn(mean.shape, generator=gen).double()
    g_std = torch.randn(std.shape, generator=gen).double()
    ((mean * g_mean).sum() + (std * g_std).sum()).backward()
    # The posterior's logvar clamp (-30, 20) would zero gradients: keep the test away from it.
    assert posterior.logvar.abs().max() < 20
    tensors.update(
        {
            "enc.images": images.detach(),
            "enc.mean": mean.detach(),
            "enc.std": std.detach(),
            "enc.g_mean": g_mean,
            "enc.g_std": g_std,
            "enc.grad.images": images.grad,
        }
    )
    for n, p in vae.named_parameters():
        if p.grad is not None:
            tensors[f"enc.grad.{n}"] = p.grad.clone()
    vae.zero_grad(set_to_none=True)

    latents = torch.randn((2, 4, 4, 4), generator=gen).double().requires_grad_()
    out = vae.decode(latents).sample
    g_out = torch.randn(out.shape, generator=gen).double()
    (out * g_out).sum().backward()
    tensors.update(
        {"dec.latents": latents.detach(), "dec.out": out.detach(), "dec.g_out": g_out, "dec.grad.latents": latents.grad}
    )
    for n, p in vae.named_parameters():
        if p.grad is not None:
            tensors[f"dec.grad.{n}"] = p.grad.clone()

    tensors = {k: v.detach().float().contiguous().clone() for k, v in tensors.items()}
    os.makedirs(OUT, exist_ok=True)
    path = f"{OUT}/vae_tiny.safetensors"
    save_file(tensors, path)
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {n_params} parameters)")


if __name__ == "__main__":
    main()
