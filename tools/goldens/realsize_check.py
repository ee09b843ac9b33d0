"""Real-size U-Net check (not in CI): diffusers' SD1.5 and SD2.1 UNet2DConditionModel with
sdbooth's seeded weights (InitStyle::AllRandom, the generator in unet.py) on one forward.

Step 1 (Python, ~4 GB RAM, about a minute per model):
    tools/.venv/bin/python tools/goldens/realsize_check.py /tmp/unet_realsize
writes /tmp/unet_realsize/{sd15,sd21}.safetensors (inputs and diffusers' output, no weights).
Step 2 (Rust, regenerates the same weights bit for bit and compares, norm-relative <= 1e-5):
    cargo run --release -p sdbooth-models --example unet_realsize -- check /tmp/unet_realsize
"""
import pathlib
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from unet import param_values  # noqa: E402  (same generator as the fixtures)

SEED = 99
SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
    flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False,
)
SD21 = dict(SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True, upcast_attention=True)


def run(name, cfg, out_dir, hw=32):
    model = UNet2DConditionModel(**cfg).float().eval()
    with torch.no_grad():
        for k, p in model.state_dict().items():
            p.copy_(torch.from_numpy(param_values(k, list(p.shape), SEED)))
    gen = torch.Generator().manual_seed(7)
    lat = torch.randn(1, 4, hw, hw, generator=gen)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 77, cfg["cross_attention_dim"], generator=gen)
    with torch.no_grad():
        out = model(lat, t, encoder_hidden_states=ctx).sample
    save_file({"latents": lat, "timesteps": t, "ctx": ctx, "out": out.contiguous()},
              str(out_dir / f"{name}.safetensors"), metadata={"seed": str(SEED)})
    print(f"{name}: |out| = {out.norm():.4f}")
    del model


if __name__ == "__main__":
    out_dir = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/unet_realsize")
    out_dir.mkdir(parents=True, exist_ok=True)
    run("sd15", SD15, out_dir)
    run("sd21", SD21, out_dir)
