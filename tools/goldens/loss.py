"""Writes loss and noise goldens for sdbooth-train (a transcription of kohya's functions from
library/train_util.py and library/custom_train_functions.py, run with torch autograd).

Loss cases store the scalar loss and its gradient with respect to the prediction. Noise cases run
kohya's get_noise_noisy_latents_and_timesteps with every random draw recorded (normal, uniform
and integer draws in separate lists), so the Rust test can replay them.

Run: tools/.venv/bin/python tools/goldens/loss.py
(writes crates/sdbooth-train/tests/fixtures/loss.safetensors)
"""
import math
import pathlib

import torch
from diffusers import DDPMScheduler
from safetensors.torch import save_file

OUT = pathlib.Path(__file__).resolve().parents[2] / "crates/sdbooth-train/tests/fixtures/loss.safetensors"


# ---- kohya, transcribed -------------------------------------------------------------------------
def all_snr(ac):
    alpha = torch.sqrt(ac)
    sigma = torch.sqrt(1.0 - ac)
    return (alpha / sigma) ** 2


def huber_c(a, timesteps, ac):
    if a["loss_type"] not in ("huber", "smooth_l1"):
        return None
    if a["huber_schedule"] == "exponential":
        alpha = -math.log(a["huber_c"]) / 1000
        return torch.exp(-alpha * timesteps) * a["huber_scale"]
    if a["huber_schedule"] == "snr":
        acs = torch.index_select(ac, 0, timesteps)
        sigmas = ((1.0 - acs) / acs) ** 0.5
        return (1 - a["huber_c"]) / (1 + sigmas) ** 2 + a["huber_c"]
    return torch.full((timesteps.shape[0],), a["huber_c"] * a["huber_scale"])


def conditional_loss(pred, target, loss_type, c):
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    c = c.view(-1, 1, 1, 1)
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


def snr_scale(timesteps, snr):
    s = torch.stack([snr[t] for t in timesteps])
    s = torch.minimum(s, torch.ones_like(s) * 1000)
    return s / (s + 1)


def kohya_loss(pred, target, timesteps, weights, mask, ac, a):
    snr = all_snr(ac)
    loss = conditional_loss(pred.float(), target.float(), a["loss_type"], huber_c(a, timesteps, ac))
    if mask is not None:
        m = torch.nn.functional.interpolate(mask.unsqueeze(1), size=loss.shape[2:], mode="area")
        loss = loss * m
    loss = loss.mean([1, 2, 3])
    loss = loss * weights
    if a.get("min_snr_gamma"):
        s = torch.stack([snr[t] for t in timesteps])
        mg = torch.minimum(s, torch.full_like(s, a["min_snr_gamma"]))
        loss = loss * (torch.div(mg, s + 1) if a.get("v_parameterization") else torch.div(mg, s))
    if a.get("scale_v_pred_loss_like_noise_pred"):
        loss = loss * snr_scale(timesteps, snr)
    if a.get("v_pred_like_loss"):
        loss = loss + loss / snr_scale(timesteps, snr) * a["v_pred_like_loss"]
    if a.get("debiased_estimation_loss"):
        s = torch.stack([snr[t] for t in timesteps])
        s = torch.minimum(s, torch.ones_like(s) * 1000)
        loss = (1 / (s + 1) if a.get("v_parameterization") else 1 / torch.sqrt(s)) * loss
    return loss.mean()


LOSS_CASES = {
    "l2": dict(loss_type="l2"),
    "l2_minsnr": dict(loss_type="l2", min_snr_gamma=5.0),
    "l2_minsnr_v": dict(loss_type="l2", min_snr_gamma=5.0, v_parameterization=True),
    "l2_scale_v": dict(loss_type="l2", v_parameterization=True, scale_v_pred_loss_like_noise_pred=True),
    "l2_v_like": dict(loss_type="l2", v_pred_like_loss=0.2),
    "l2_debiased": dict(loss_type="l2", debiased_estimation_loss=True),
    "l2_debiased_v": dict(loss_type="l2", debiased_estimation_loss=True, v_parameterization=True),
    "l1": dict(loss_type="l1"),
    "huber_snr": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=1.0),
    "huber_exp": dict(loss_type="huber", huber_schedule="exponential", huber_c=0.2, huber_scale=1.5),
    "smooth_l1_const": dict(loss_type="smooth_l1", huber_schedule="constant", huber_c=0.3, huber_scale=2.0),
    "l2_masked": dict(loss_type="l2", masked=True),
    "all": dict(loss_type="huber", huber_schedule="snr", huber_c=0.1, huber_scale=1.0, masked=True,
                min_snr_gamma=5.0, debiased_estimation_loss=True),
}


# ---- noise, with recorded draws -----------------------------------------------------------------
class Rec:
    def __init__(self, gen):
        self.g = gen
        self.normal, self.uniform, self.ints = [], [], []

    def randn(self, *shape):
        t = torch.randn(*shape, generator=self.g)
        self.normal.append(t.reshape(-1).clone())
        return t

    def rand(self):
        u = torch.rand(1, generator=self.g, dtype=torch.float64).item()
        self.uniform.append(u)
        return u

    def randint(self, lo, hi, n):
        t = torch.randint(lo, hi, (n,), generator=self.g)
        self.ints.extend(t.tolist())
        return t


def kohya_noise(a, latents, ac, rec):
    noise = rec.randn(*latents.shape)
    if a.get("noise_offset"):
        off = rec.rand() * a["noise_offset"] if a.get("noise_offset_random_strength") else a["noise_offset"]
        if a.get("adaptive_noise_scale") is not None:
            lm = torch.abs(latents.mean(dim=(2, 3), keepdim=True))
            off = torch.clamp(off + a["adaptive_noise_scale"] * lm, 0.0, None)
        noise = noise + off * rec.randn(latents.shape[0], latents.shape[1], 1, 1)
    if a.get("multires_noise_iterations"):
        b, c, w, h = noise.shape
        u = torch.nn.Upsample(size=(w, h), mode="bilinear")
        for i in range(a["multires_noise_iterations"]):
            r = rec.rand() * 2 + 2
            wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
            noise += u(rec.randn(b, c, wn, hn)) * a["multires_noise_discount"] ** i
            if wn == 1 or hn == 1:
                break
        noise = noise / noise.std()
    lo = a.get("min_timestep") or 0
    hi = a.get("max_timestep") or 1000
    t = rec.randint(lo, hi, latents.shape[0]) if lo < hi else torch.full((latents.shape[0],), hi)
    sa = ac[t].sqrt().view(-1, 1, 1, 1)
    so = (1 - ac[t]).sqrt().view(-1, 1, 1, 1)
    if a.get("ip_noise_gamma"):
        s = rec.rand() * a["ip_noise_gamma"] if a.get("ip_noise_gamma_random_strength") else a["ip_noise_gamma"]
        noisy = sa * latents + so * (noise + s * rec.randn(*latents.shape))
    else:
        noisy = sa * latents + so * noise
    return noise, noisy, t


NOISE_CASES = {
    "plain": dict(),
    "offset": dict(noise_offset=0.1),
    "offset_random_adaptive": dict(noise_offset=0.1, noise_offset_random_strength=True, adaptive_noise_scale=0.05),
    "multires": dict(multires_noise_iterations=6, multires_noise_discount=0.3),
    "ip_gamma": dict(ip_noise_gamma=0.1, ip_noise_gamma_random_strength=True, min_timestep=100, max_timestep=200),
    "everything": dict(noise_offset=0.05, multires_noise_iterations=3, multires_noise_discount=0.4,
                       ip_noise_gamma=0.05, min_timestep=10, max_timestep=900),
}


def main():
    g = torch.Generator().manual_seed(1234)
    ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       num_train_timesteps=1000).alphas_cumprod.float()
    out = {"alphas_cumprod": ac}
    B, C, H, W = 3, 4, 6, 5
    pred = torch.randn(B, C, H, W, generator=g)
    target = torch.randn(B, C, H, W, generator=g)
    timesteps = torch.tensor([10, 500, 999])
    weights = torch.tensor([1.0, 1.0, 0.7])
    mask = torch.rand(B, 2 * H, 2 * W, generator=g)
    out.update(pred=pred, target=target, timesteps=timesteps.float(), weights=weights, mask=mask)
    for name, a in LOSS_CASES.items():
        p = pred.clone().requires_grad_(True)
        loss = kohya_loss(p, target, timesteps, weights, mask if a.get("masked") else None, ac, a)
        loss.backward()
        out[f"loss/{name}"] = loss.detach().reshape(1)
        out[f"grad/{name}"] = p.grad.clone()

    latents = torch.randn(2, 4, 16, 12, generator=g)
    out["latents"] = latents
    for name, a in NOISE_CASES.items():
        rec = Rec(torch.Generator().manual_seed(99))
        noise, noisy, t = kohya_noise(a, latents, ac, rec)
        out[f"noise/{name}/noise"] = noise
        out[f"noise/{name}/noisy"] = noisy
        out[f"noise/{name}/timesteps"] = t.double()
        out[f"noise/{name}/draw_normal"] = torch.cat(rec.normal)
        out[f"noise/{name}/draw_uniform"] = torch.tensor(rec.uniform, dtype=torch.float64)
        out[f"noise/{name}/draw_int"] = torch.tensor(rec.ints, dtype=torch.float64)
    out = {k: v.contiguous() for k, v in out.items()}
    save_file(out, str(OUT))
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(out)} tensors)")


if __name__ == "__main__":
    main()
