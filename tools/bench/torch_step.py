#!/usr/bin/env python3
"""The PyTorch anchor for `sdbooth bench`: the same DreamBooth step as kohya runs it.

diffusers' UNet2DConditionModel and transformers' CLIPTextModel with SD1.5's architecture and
random weights (nothing is downloaded), both trained, fp32 master weights with autocast
(--mixed_precision), torch.optim.AdamW, SDPA attention, gradient checkpointing, latents of the
given resolution (as with --cache_latents), batch 1. Prints one JSON line: s/step and its
forward / backward / optimizer parts (medians of the timed steps), peak memory (GPU allocator;
process peak RSS on the CPU), images/s. `sdbooth bench` reports the same fields
(tools/bench/sidebyside.sh runs the two in turn). On the CPU, fp32 (`--mixed_precision no`) and
autocast bf16 (`--mixed_precision bf16`) are the two modes to compare.

    python3 tools/bench/torch_step.py --resolution 512 --mixed_precision bf16 --steps 3 --warmup 1
    python3 tools/bench/torch_step.py --tiny --device cpu --resolution 64   # plumbing check
    python3 tools/bench/torch_step.py --device cpu --resolution 256 --mixed_precision no

Needs torch, diffusers and transformers (tools/gpu/accept.sh installs diffusers from the
bundle's wheels on the GPU machine).
"""

import argparse
import contextlib
import json
import platform
import resource
import statistics
import sys
import time


def build(tiny: bool):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0
    from transformers import CLIPTextConfig, CLIPTextModel

    if tiny:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text = CLIPTextConfig(
            vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        )
    else:  # runwayml/stable-diffusion-v1-5's unet/config.json and text_encoder/config.json
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text = CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
            projection_dim=768,
        )
    unet.set_attn_processor(AttnProcessor2_0())
    te = CLIPTextModel._from_config(text, attn_implementation="sdpa")
    return unet, te


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny architecture (plumbing checks)")
    p.add_argument("--no_gradient_checkpointing", action="store_true")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    unet, te = build(args.tiny)
    unet.to(dev).train()
    te.to(dev).train()
    if not args.no_gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        te.gradient_checkpointing_enable()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=1e-6)
    amp = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    scaler = torch.amp.GradScaler(dev.type, enabled=args.mixed_precision == "fp16")
    # SD's noise schedule (scaled_linear, 0.00085 to 0.012, 1000 steps).
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0).to(dev, torch.float32)
    hw = args.resolution // 8

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def autocast():
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(dev.type, dtype=amp)

    def step():
        """One step; returns the loss and the seconds of forward, backward and optimizer."""
        sync()
        t0 = time.perf_counter()
        latents = torch.randn(1, 4, hw, hw, device=dev)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (1,), device=dev)
        a = alphas_cumprod[t].view(1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ids = torch.randint(0, 49407, (1, 77), device=dev)
        with autocast():
            enc = te(ids)[0]
            pred = unet(noisy, t, enc).sample
        loss = F.mse_loss(pred.float(), noise.float())
        sync()
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        sync()
        t2 = time.perf_counter()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        return loss.item(), (t1 - t0, t2 - t1, t3 - t2)

    times, fwd, bwd, upd = [], [], [], []
    for i in range(args.warmup + args.steps):
        loss, (f, b, o) = step()
        if i >= args.warmup:
            times.append(f + b + o)
            fwd.append(f)
            bwd.append(b)
            upd.append(o)
    s = statistics.median(times)
    report = {
        "framework": f"torch {torch.__version__}",
        "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "model": "tiny" if args.tiny else "sd15",
        "resolution": args.resolution,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": not args.no_gradient_checkpointing,
        "optimizer": "torch.optim.AdamW",
        "threads": torch.get_num_threads(),
        "s_per_step": s,
        "forward_s": statistics.median(fwd),
        "backward_s": statistics.median(bwd),
        "optimizer_s": statistics.median(upd),
        "images_per_s": 1.0 / s,
        "step_seconds": times,
        "final_loss": loss,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(dev) if cuda else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(dev) if cuda else None,
        # ru_maxrss is in KiB on Linux, bytes on macOS.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        * (1 if platform.system() == "Darwin" else 1024),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
