"""Step-parity golden for sdbooth's trainer (crates/sdbooth-train/tests/step_parity.rs).

What kohya's train_db.py does in one step, transcribed onto diffusers' UNet2DConditionModel and
transformers' CLIPTextModel with the tiny-sd1 / tiny-sd2 architectures (config.rs):

    encoder_hidden_states = text_encoder(input_ids)[0]            (get_hidden_states, no clip_skip)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_parameterization else noise
    loss = conditional_loss(noise_pred, target, "l2", "none").mean([1, 2, 3]) * loss_weights
    loss = apply_snr_weight(loss, timesteps, noise_scheduler, min_snr_gamma, v_parameterization)
    loss = loss.mean(); loss.backward()
    accelerator.clip_grad_norm_(unet + text encoder parameters, max_grad_norm=1.0)
    optimizer.step()

Weights come from sdbooth's own seeded generator (sdbooth_models::init, InitStyle::AllRandom:
biases and norm gains random too), reimplemented bit-exactly in unet.py, so no weights are stored:
the Rust test generates the same f32 weights, writes them as a Diffusers folder and loads that
folder through sdbooth's loader (setup::load). Captions are tokenized here with transformers'
CLIPTokenizer built from sdbooth's embedded BPE asset (tools/tokenizer), and the ids are stored so
the test can check its own tokenizer gives the same.

Everything is computed in float64 on float32-representable weights and inputs (kohya's
`.float()` casts in the loss are left out for that reason; its f32 SNR weights are kept as it
computes them), so the fixture is the exact answer to within f32 rounding of the inputs; sdbooth
computes in f32. Cases:

  sd1_eps    tiny-sd1, epsilon, 2 instance images
  sd1_prior  tiny-sd1, epsilon, 1 instance + 1 regularisation image (prior_loss_weight 0.5)
  sd1_snr    tiny-sd1, epsilon, --min_snr_gamma 5
  sd2_v      tiny-sd2, v-prediction (--v2 --v_parameterization)
  sd1_clip_skip2  tiny-sd1, epsilon, --clip_skip 2 (hidden_states[-2] then final_layer_norm)

For each: the loss and every parameter gradient. For sd1_eps and sd2_v also the weights after
one step of kohya's SGDNesterov (torch.optim.SGD lr 0.1, momentum 0.9, nesterov) and after 5
AdamW steps (torch.optim.AdamW lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 0.01) on the same
batch (same noise and timesteps each step), both with max_grad_norm 1.0 clipping over U-Net +
text encoder as accelerate does.

Gradients and weight updates are stored as their norm (f64) plus K=16 random-sign projections
(f32) per tensor, with the signs of unet.py's `projections` (key fnv1a64("proj." + name) ^
mix(1000 + k)): projections are linear, so ||P(ours - torch)|| / sqrt(K) estimates
||ours - torch|| without storing megabytes. Weights after a step are compared through their
update (w_after - w_before), whose projections are stored; w_before is identical on both sides.

Run from the repository root:  tools/.venv/bin/python tools/goldens/train_step.py
Writes crates/sdbooth-train/tests/fixtures/step_parity/step_parity.{safetensors,json}.
"""

import gzip
import json
import os
import pathlib
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tools" / "tokenizer"))
import clip as clip_golden  # noqa: E402
import make_goldens  # noqa: E402
import make_vocab  # noqa: E402
from unet import TINY_SD1, TINY_SD2, fnv1a64, mix, param_values, stream  # noqa: E402

OUT = ROOT / "crates/sdbooth-train/tests/fixtures/step_parity"
K_PROJ = 16
# (U-Net seed, text encoder seed); the Rust test uses the same (tests/step_parity.rs).
SEEDS = {"tiny-sd1": (501, 502), "tiny-sd2": (601, 602)}
CAPTIONS = ["a photo of sks dog", "a photo of a dog, on the grass"]


def tokenizer(v2: bool):
    asset = ROOT / "crates/sdbooth-data/assets/clip_bpe_merges.txt.gz"
    with gzip.open(asset, "rt", encoding="utf-8") as f:
        merges = make_vocab.merges_from_bpe(f.read())
    folder = tempfile.mkdtemp()
    return make_goldens.make_tokenizer(folder, merges, "!" if v2 else "<|endoftext|>")


def token_ids(tok, captions):
    """kohya's SdTokenizeStrategy without max_token_length: padding="max_length", 77 ids."""
    return tok(captions, padding="max_length", truncation=True, max_length=77, return_tensors="pt").input_ids


def build_models(model: str, dtype=torch.float64):
    v2 = model == "tiny-sd2"
    unet_seed, te_seed = SEEDS[model]
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_SD2 if v2 else TINY_SD1))
    te = CLIPTextModel(clip_golden.tiny_config(v2))
    with torch.no_grad():
        for m, seed in ((unet, unet_seed), (te, te_seed)):
            for name, p in m.named_parameters():
                p.copy_(torch.from_numpy(param_values(name, list(p.shape), seed, all_random=True)))
    unet, te = unet.to(dtype), te.to(dtype)
    unet.train()
    te.train()  # dropout is 0 in CLIP's config: train() changes nothing but is what kohya does
    return unet, te


def scheduler():
    # train_db.py's DDPMScheduler.
    s = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False
    )
    # custom_train_functions.prepare_scheduler_for_custom_training: SNR in f32.
    ac = s.alphas_cumprod
    s.all_snr = (torch.sqrt(ac) / torch.sqrt(1.0 - ac)) ** 2
    return s


def apply_snr_weight(loss, timesteps, sched, gamma, v_prediction):
    """custom_train_functions.apply_snr_weight."""
    snr = torch.stack([sched.all_snr[t] for t in timesteps])
    min_snr_gamma = torch.minimum(snr, torch.full_like(snr, gamma))
    if v_prediction:
        snr_weight = torch.div(min_snr_gamma, snr + 1).float().to(loss.device)
    else:
        snr_weight = torch.div(min_snr_gamma, snr).float().to(loss.device)
    return loss * snr_weight


def kohya_loss(unet, te, ids, latents, noise, timesteps, weights, v_pred, min_snr_gamma, sched, clip_skip=None):
    """train_db.py's loss block (cached latents, l2 loss, no noise extras)."""
    if clip_skip is None:  # train_util.get_hidden_states / strategy_sd.encode_tokens
        encoder_hidden_states = te(ids)[0]
    else:
        enc_out = te(ids, output_hidden_states=True, return_dict=True)
        encoder_hidden_states = te.text_model.final_layer_norm(enc_out["hidden_states"][-clip_skip])
    noisy_latents = sched.add_noise(latents, noise, timesteps)
    noise_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
    target = sched.get_velocity(latents, noise, timesteps) if v_pred else noise
    loss = F.mse_loss(noise_pred, target, reduction="none")
    loss = loss.mean([1, 2, 3])
    loss = loss * weights
    if min_snr_gamma:
        loss = apply_snr_weight(loss, timesteps, sched, min_snr_gamma, v_pred)
    return loss.mean()


def named_params(unet, te):
    return [("unet", n, p) for n, p in unet.named_parameters()] + [
        ("text_encoder", n, p) for n, p in te.named_parameters()
    ]


_SIGNS = {}


def signs(name, n, k):
    key = (name, n, k)
    if key not in _SIGNS:
        s = fnv1a64("proj." + name) ^ int(mix(np.uint64(1000 + k)))
        _SIGNS[key] = np.where((stream(s, n) >> np.uint64(63)) == 1, -1, 1).astype(np.int8)
    return _SIGNS[key]


def compress(params, values):
    """Per tensor: norm (f64) and K_PROJ random-sign projections (f32)."""
    norms, projs = [], []
    for (_, name, _), v in zip(params, values):
        flat = v.detach().double().flatten().numpy()
        norms.append(float(np.linalg.norm(flat)))
        projs.append([float(np.dot(signs(name, flat.size, k), flat)) for k in range(K_PROJ)])
    return torch.tensor(norms, dtype=torch.float64), torch.tensor(projs, dtype=torch.float32)


def clip_(params, max_norm=1.0):
    """accelerate's clip_grad_norm_ -> torch.nn.utils.clip_grad_norm_ (foreach off on CPU)."""
    return float(torch.nn.utils.clip_grad_norm_([p for _, _, p in params], max_norm))


def f32_batch(batch):
    ids, latents, noise, timesteps, weights, v_pred, gamma, sched, skip = batch
    return (ids, latents.float(), noise.float(), timesteps, weights, v_pred, gamma, sched, skip)


def spread(params, ours, ref, zeros):
    """How far `ours` is from `ref`: overall norm-relative error, and the worst tensor's
    (tensors in `zeros`, whose exact gradient is zero, left out of the worst)."""
    err2 = norm2 = 0.0
    worst, worst_name = 0.0, ""
    for (part, name, _), a, b in zip(params, ours, ref):
        e = float((a.double() - b.double()).norm())
        n = float(b.double().norm())
        err2 += e * e
        norm2 += n * n
        if name not in zeros and n > 0 and e / n > worst:
            worst, worst_name = e / n, f"{part}/{name}"
    return {"overall": (err2 / norm2) ** 0.5, "worst": worst, "worst_tensor": worst_name}


def run_optimizer(model, batch, case, kind, steps, dtype=torch.float64):
    torch.set_default_dtype(dtype)
    if dtype == torch.float32:
        batch = f32_batch(batch)
    unet, te = build_models(model, dtype)
    params = named_params(unet, te)
    before = [p.detach().clone() for _, _, p in params]
    plist = [p for _, _, p in params]
    if kind == "sgd":
        opt = torch.optim.SGD(plist, lr=case["sgd_lr"], momentum=0.9, nesterov=True)
    else:
        opt = torch.optim.AdamW(plist, lr=case["adamw_lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses, norms = [], []
    for _ in range(steps):
        loss = kohya_loss(unet, te, *batch)
        loss.backward()
        norms.append(clip_(params))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch.set_default_dtype(torch.float64)
    if dtype == torch.float32:
        return [p.detach().clone() for _, _, p in params], losses
    deltas = [p.detach() - b for (_, _, p), b in zip(params, before)]
    dn, dp = compress(params, deltas)
    return dn, dp, losses, norms, [p.detach().clone() for _, _, p in params]


def write():
    torch.set_default_dtype(torch.float64)  # CLIP's causal mask must be f64 too (see clip.py)
    torch.set_num_threads(1)
    sched = scheduler()
    cases = {
        "sd1_eps": dict(model="tiny-sd1", v_pred=False, weights=[1.0, 1.0], gamma=None, optim=True),
        "sd1_prior": dict(model="tiny-sd1", v_pred=False, weights=[1.0, 0.5], gamma=None, optim=False),
        "sd1_snr": dict(model="tiny-sd1", v_pred=False, weights=[1.0, 1.0], gamma=5.0, optim=False),
        "sd2_v": dict(model="tiny-sd2", v_pred=True, weights=[1.0, 1.0], gamma=None, optim=True),
        "sd1_clip_skip2": dict(model="tiny-sd1", v_pred=False, weights=[1.0, 1.0], gamma=None, optim=False, skip=2),
    }
    gen = torch.Generator().manual_seed(20261125)
    tensors, meta = {}, {"k_proj": K_PROJ, "seeds": SEEDS, "params": {}, "cases": {}}
    for model in SEEDS:
        unet, te = build_models(model)
        meta["params"][model] = [[part, name, list(p.shape)] for part, name, p in named_params(unet, te)]
    toks = {m: tokenizer(m == "tiny-sd2") for m in SEEDS}
    for cname, c in cases.items():
        b = 2
        # Cached latents are scaled by 0.18215 already; N(0, 0.8²) is about what the SD VAE gives.
        # 16x16: the mid block sees 2x2, so its self-attention has more than one key (with one key
        # the key/query gradients are exactly zero and only rounding noise is left to compare).
        latents = (torch.randn(b, 4, 16, 16, generator=gen, dtype=torch.float32) * 0.8).double()
        noise = torch.randn(b, 4, 16, 16, generator=gen, dtype=torch.float32).double()
        timesteps = torch.tensor([int(torch.randint(0, 1000, (1,), generator=gen)), 37], dtype=torch.long)
        ids = token_ids(toks[c["model"]], CAPTIONS)
        weights = torch.tensor(c["weights"], dtype=torch.float32)
        batch = (ids, latents, noise, timesteps, weights, c["v_pred"], c["gamma"], sched, c.get("skip"))

        unet, te = build_models(c["model"])
        params = named_params(unet, te)
        loss = kohya_loss(unet, te, *batch)
        loss.backward()
        # With clip_skip the last encoder layer gets no gradient (p.grad None: torch's optimizers
        # skip it, weight decay included); stored as zeros and listed.
        no_grad = [f"{part}/{name}" for part, name, p in params if p.grad is None]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, _, p in params]
        gn, gp = compress(params, grads)
        total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
        # Exactly-zero gradients (CLIP's k_proj.bias): rounding noise only; see step_parity.rs.
        zeros = {name for (_, name, _), n in zip(params, gn.tolist()) if n <= 1e-9 * total}
        # The same step in PyTorch f32, for scale: how far f32 arithmetic is from the f64 answer.
        torch.set_default_dtype(torch.float32)
        u32, t32 = build_models(c["model"], torch.float32)
        p32 = named_params(u32, t32)
        loss32 = kohya_loss(u32, t32, *f32_batch(batch))
        loss32.backward()
        torch.set_default_dtype(torch.float64)
        g32 = [p.grad if p.grad is not None else torch.zeros_like(p) for _, _, p in p32]
        torch_f32 = spread(params, g32, grads, zeros)
        torch_f32["loss"] = abs(loss32.item() - loss.item()) / abs(loss.item())
        tensors.update(
            {
                f"{cname}.latents": latents.float(),
                f"{cname}.noise": noise.float(),
                f"{cname}.timesteps": timesteps,
                f"{cname}.ids": ids.to(torch.int64),
                f"{cname}.loss": torch.tensor([loss.item()], dtype=torch.float64),
                f"{cname}.grad_norm": gn,
                f"{cname}.grad_proj": gp,
            }
        )
        info = dict(
            model=c["model"],
            v_parameterization=c["v_pred"],
            captions=CAPTIONS,
            loss_weights=c["weights"],
            min_snr_gamma=c["gamma"],
            clip_skip=c.get("skip"),
            loss=loss.item(),
            total_grad_norm=total,
            torch_f32_vs_f64=torch_f32,
            no_grad=no_grad,
        )
        print(f"{cname}: loss {loss.item():.6f}, grad norm {total:.4f}, {len(params)} tensors; torch f32: {torch_f32}")
        if c["optim"]:
            info["sgd_lr"], info["adamw_lr"] = 0.1, 1e-3
            cc = dict(sgd_lr=0.1, adamw_lr=1e-3)
            for kind, steps in (("sgd", 1), ("adamw", 5)):
                dn, dp, losses, norms, w64 = run_optimizer(c["model"], batch, cc, kind, steps)
                w32, losses32 = run_optimizer(c["model"], batch, cc, kind, steps, torch.float32)
                tag = f"{kind}{steps}"
                sp = spread(params, w32, w64, zeros)
                sp["losses"] = max(abs(a - b) / abs(b) for a, b in zip(losses32, losses))
                info[f"{tag}_torch_f32_vs_f64"] = sp
                tensors[f"{cname}.{tag}.delta_norm"] = dn
                tensors[f"{cname}.{tag}.delta_proj"] = dp
                tensors[f"{cname}.{tag}.losses"] = torch.tensor(losses, dtype=torch.float64)
                info[f"{tag}_losses"] = losses
                info[f"{tag}_grad_norms"] = norms
                print(f"  {tag}: torch f32 weights vs f64: {sp}")
                print(f"  {tag}: losses {['%.6f' % x for x in losses]}, pre-clip norms {['%.3f' % x for x in norms]}")
        meta["cases"][cname] = info
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(OUT / "step_parity.safetensors"))
    # One line per case and per parameter list: readable diffs, small file.
    text = json.dumps({k: v for k, v in meta.items() if k not in ("params", "cases")})[:-1]
    for key in ("cases", "params"):
        text += f', "{key}": {{\n' + ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in meta[key].items()) + "}"
    (OUT / "step_parity.json").write_text(text + "}\n")
    for f in ("step_parity.safetensors", "step_parity.json"):
        print(f"wrote {OUT / f} ({os.path.getsize(OUT / f)} bytes)")


if __name__ == "__main__":
    write()
