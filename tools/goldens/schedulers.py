"""Writes scheduler trajectories for sdbooth's sampler parity tests.

Each sampler runs on a small latent with a fixed, analytic stand-in for the U-Net (so no model is
needed) and with the ancestral noise drawn from a recorded list instead of torch's RNG. The Rust
test replays the same stand-in and noise and compares every step.

Run: tools/.venv/bin/python tools/goldens/schedulers.py  (writes crates/sdbooth-sample/tests/fixtures/schedulers.json)
"""
import json
import math
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import diffusers
from diffusers.schedulers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

# kohya's get_my_scheduler: sampler name -> (class, extra init args)
SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    # diffusers 0.32 refuses algorithm_type "dpmsolver" with its default final_sigmas_type "zero"
    # (so kohya's `--sample_sampler dpmsolver` raises there); sdbooth uses "sigma_min", as the
    # error message advises.
    "dpmsolver": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": (DPMSolverSinglestepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_a": (KDPM2AncestralDiscreteScheduler, {}),
}

SHAPE = (1, 2, 2, 2)


def fake_model(x, t):
    """Stand-in for the U-Net: smooth, depends on the input and the timestep."""
    t = float(t)
    return 0.5 * torch.tanh(x) * math.cos(t / 1000.0) + 0.1 * x + 0.01 * (t / 1000.0)


class NoiseFeed:
    """Replaces randn_tensor: hands out pre-drawn noise and records it."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        n = torch.randn(shape, generator=self.gen, dtype=torch.float32)
        self.drawn.append(n.flatten().tolist())
        return n.to(dtype) if dtype is not None else n


def run(name, steps, prediction_type):
    cls, extra = SAMPLERS[name]
    args = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    args.update(extra)
    if prediction_type == "v_prediction":
        args["prediction_type"] = "v_prediction"
    sched = cls(**args)
    if hasattr(sched.config, "clip_sample") and sched.config.clip_sample is False:
        sched.config.clip_sample = True  # as kohya does
    feed = NoiseFeed(1234)
    module = sys.modules[cls.__module__]
    if hasattr(module, "randn_tensor"):
        module.randn_tensor = feed
    sched.set_timesteps(steps)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    x = x0 * sched.init_noise_sigma
    traj, inputs, timesteps = [], [], []
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = fake_model(inp, t)
        x = sched.step(out, t, x).prev_sample
        timesteps.append(float(t))
        inputs.append(inp.flatten().tolist())
        traj.append(x.flatten().tolist())
    return {
        "sampler": name,
        "steps": steps,
        "prediction_type": prediction_type,
        "init_noise_sigma": float(sched.init_noise_sigma),
        "initial_noise": x0.flatten().tolist(),
        "timesteps": timesteps,
        "model_inputs": inputs,
        "trajectory": traj,
        "noise": feed.drawn,
    }


def main():
    cases = []
    for name in SAMPLERS:
        for steps in (4, 7):
            cases.append(run(name, steps, "epsilon"))
        cases.append(run(name, 5, "v_prediction"))
    out = pathlib.Path(__file__).resolve().parents[2] / "crates/sdbooth-sample/tests/fixtures/schedulers.json"
    out.write_text(json.dumps({"diffusers": diffusers.__version__, "shape": SHAPE, "cases": cases}))
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
