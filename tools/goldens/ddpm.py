"""Writes the DDPM training-schedule fixture for sdbooth's ddpm tests.

diffusers' DDPMScheduler as kohya's train_db.py builds it (scaled_linear, 0.00085-0.012, 1000
steps), its add_noise / get_velocity on a small tensor, and the schedule after diffusers'
rescale_zero_terminal_snr (kohya's --zero_terminal_snr).

Run: tools/.venv/bin/python tools/goldens/ddpm.py  (writes crates/sdbooth-models/tests/fixtures/ddpm.json)
"""
import json
import pathlib

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/sdbooth-models/tests/fixtures/ddpm.json"


def main():
    s = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 2, 2, generator=gen)
    noise = torch.randn(3, 2, 2, 2, generator=gen)
    t = torch.tensor([0, 500, 999])
    zt_betas = rescale_zero_terminal_snr(s.betas.clone())
    zt_ac = torch.cumprod(1.0 - zt_betas, dim=0)
    fx = {
        "betas": s.betas.tolist(),
        "alphas_cumprod": s.alphas_cumprod.tolist(),
        "timesteps": t.tolist(),
        "x0": x0.flatten().tolist(),
        "noise": noise.flatten().tolist(),
        "shape": list(x0.shape),
        "add_noise": s.add_noise(x0, noise, t).flatten().tolist(),
        "velocity": s.get_velocity(x0, noise, t).flatten().tolist(),
        "zt_betas": zt_betas.tolist(),
        "zt_alphas_cumprod": zt_ac.tolist(),
    }
    OUT.write_text(json.dumps(fx))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
