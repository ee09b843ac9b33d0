"""Tiny SD1/SD2 fixtures for sdbooth-checkpoint's tests (a few hundred kB each):

- tiny-sd{1,2}-diffusers/: a Diffusers folder written by diffusers/transformers save_pretrained
  (SD1 fp32, SD2 fp16 with a v_prediction scheduler);
- kohya-sd{1,2}.safetensors: the same weights converted by kohya's model_util exactly as
  save_stable_diffusion_checkpoint does with no source file. For SD2, kohya's filler rule
  (make_dummy_weights) hard-codes resblocks.22 -> 23 and a 1024x1024 text_projection; here the same
  rule is applied at tiny size (last block copied as the next one, ones [H, H], int64 logit_scale 1),
  as every SD2 file holds one block more than the model uses (the full-size key set, kohya's own
  filler included, is in kohya_keyset.json);
- source-sd1.ckpt: torch.save({"state_dict", "epoch": 3, "global_step": 42}) of the SD1 state dict
  plus keys training never touches (EMA, schedule buffers, position_ids), to check they survive.

    KOHYA_SD_SCRIPTS=/tmp/sdscripts tools/.venv/bin/python tools/checkpoint/make_tiny_fixtures.py \
        crates/sdbooth-checkpoint/tests/fixtures
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file

import kohya_import

mu = kohya_import.load_model_util()
import diffusers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

out_dir = sys.argv[1]
CH = (8, 8, 16, 16)


def build(v2, seed):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=CH, layers_per_block=2, cross_attention_dim=16, attention_head_dim=2,
        norm_num_groups=4, use_linear_projection=v2)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=CH, layers_per_block=2,
        norm_num_groups=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu" if v2 else "quick_gelu"))
    # Every tensor random (norm scales and biases too) so a wrong mapping cannot pass by luck.
    for m in (unet, vae, text):
        for p in m.parameters():
            p.data.uniform_(-1, 1)
    if v2:
        unet, vae, text = unet.half(), vae.half(), text.half()
    return unet, vae, text


def kohya_state_dict(v2, unet, vae, text):
    sd = {}
    for k, v in mu.convert_unet_state_dict_to_sd(v2, unet.state_dict()).items():
        sd["model.diffusion_model." + k] = v
    if v2:
        te = mu.convert_text_encoder_state_dict_to_sd_v2(text.state_dict(), False)
        n = text.config.num_hidden_layers
        for k in list(te):
            if k.startswith(f"transformer.resblocks.{n - 1}."):
                te[k.replace(f".{n - 1}.", f".{n}.")] = te[k].clone()
        h = text.config.hidden_size
        te["text_projection"] = torch.ones((h, h), dtype=te["token_embedding.weight"].dtype)
        te["logit_scale"] = torch.tensor(1)
        for k, v in te.items():
            sd["cond_stage_model.model." + k] = v
    else:
        for k, v in text.state_dict().items():
            sd["cond_stage_model.transformer." + k] = v
    for k, v in mu.convert_vae_state_dict(vae.state_dict()).items():
        sd["first_stage_model." + k] = v
    return {k: v.contiguous().clone() for k, v in sd.items()}


for v2, seed in ((False, 1), (True, 2)):
    name = "sd2" if v2 else "sd1"
    unet, vae, text = build(v2, seed)
    d = os.path.join(out_dir, f"tiny-{name}-diffusers")
    unet.save_pretrained(os.path.join(d, "unet"))
    vae.save_pretrained(os.path.join(d, "vae"))
    text.save_pretrained(os.path.join(d, "text_encoder"))
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    clip_sample=False, set_alpha_to_one=False,
                                    prediction_type="v_prediction" if v2 else "epsilon")
    sched.save_pretrained(os.path.join(d, "scheduler"))
    # What StableDiffusionPipeline.save_pretrained writes last: sdbooth refuses a folder without it
    # (an interrupted save). The tokenizer is not saved: sdbooth ships its own.
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": None,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(d, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    sd = kohya_state_dict(v2, unet, vae, text)
    save_file(sd, os.path.join(out_dir, f"kohya-{name}.safetensors"))
    if not v2:
        src = dict(sd)
        src["model_ema.decay"] = torch.tensor(0.9999)
        src["model_ema.num_updates"] = torch.tensor(7, dtype=torch.int32)
        src["alphas_cumprod"] = torch.linspace(1, 0.1, 10)
        src["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
        torch.save({"state_dict": src, "epoch": 3, "global_step": 42}, os.path.join(out_dir, "source-sd1.ckpt"))
print("ok")
