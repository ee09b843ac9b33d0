"""Real-size text encoder and VAE check (not in CI): transformers' CLIPTextModel for SD1 (CLIP-L)
and SD2 (OpenCLIP-H as diffusers holds it, 23 layers), and diffusers' SD AutoencoderKL, with
sdbooth's seeded weights (init.rs's generator, InitStyle::AllRandom, seed 99; see unet.py).

Step 1 (Python, ~6 GB RAM, a minute or two):
    tools/.venv/bin/python tools/goldens/clip_vae_realsize.py /tmp/clip_vae_realsize
writes /tmp/clip_vae_realsize/{clip_sd1,clip_sd2,vae}.safetensors (inputs and reference outputs,
no weights).
Step 2 (Rust, regenerates the same weights bit for bit and compares, norm-relative <= 1e-5):
    cargo run --release -p sdbooth-models --example clip_vae_realsize -- check /tmp/clip_vae_realsize
"""

import pathlib
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from unet import param_values  # noqa: E402  (init.rs's generator)

SEED = 99
BOS, EOS = 49406, 49407


def set_weights(model):
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(torch.from_numpy(param_values(k, list(p.shape), SEED)))


def clip(name, v2, out_dir):
    cfg = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1024 if v2 else 768,
        intermediate_size=4096 if v2 else 3072,
        num_hidden_layers=23 if v2 else 12,
        num_attention_heads=16 if v2 else 12,
        max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        layer_norm_eps=1e-5,
    )
    model = CLIPTextModel(cfg).float().eval()
    set_weights(model)
    gen = torch.Generator().manual_seed(7)
    pad = 0 if v2 else EOS
    ids = torch.full((2, 77), pad, dtype=torch.long)
    for row, n in enumerate([12, 60]):
        ids[row, 0] = BOS
        ids[row, 1 : 1 + n] = torch.randint(0, 49406, (n,), generator=gen)
        ids[row, 1 + n] = EOS
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        last = out.last_hidden_state
        skip2 = model.text_model.final_layer_norm(out.hidden_states[-2])
    save_file(
        {"ids": ids, "out": last.contiguous(), "skip2": skip2.contiguous()},
        str(out_dir / f"{name}.safetensors"),
    )
    print(f"{name}: |out| = {last.norm():.4f}, |skip2| = {skip2.norm():.4f}")


def vae(out_dir):
    model = AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[128, 256, 512, 512],
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ).float().eval()
    set_weights(model)
    gen = torch.Generator().manual_seed(8)
    images = torch.rand((1, 3, 64, 64), generator=gen) * 2 - 1
    latents = torch.randn((1, 4, 8, 8), generator=gen)
    with torch.no_grad():
        dist = model.encode(images).latent_dist
        decoded = model.decode(latents).sample
    save_file(
        {"images": images, "mean": dist.mean.contiguous(), "std": dist.std.contiguous(),
         "latents": latents, "decoded": decoded.contiguous()},
        str(out_dir / "vae.safetensors"),
    )
    print(f"vae: |mean| = {dist.mean.norm():.4f}, |decoded| = {decoded.norm():.4f}")


if __name__ == "__main__":
    out_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/clip_vae_realsize")
    out_dir.mkdir(parents=True, exist_ok=True)
    clip("clip_sd1", False, out_dir)
    clip("clip_sd2", True, out_dir)
    vae(out_dir)
