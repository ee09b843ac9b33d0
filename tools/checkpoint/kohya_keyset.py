"""Records the key names, shapes and dtypes kohya's model_util writes for an SD1.5 and an SD2.1
single file saved with no single-file source (save_stable_diffusion_checkpoint(ckpt_path=None)),
running kohya's own converter on meta-device models (no weights are allocated).

    KOHYA_SD_SCRIPTS=/tmp/sdscripts tools/.venv/bin/python tools/checkpoint/kohya_keyset.py \
        crates/sdbooth-checkpoint/tests/fixtures/kohya_keyset.json
"""
import json
import sys

import torch

import kohya_import

mu = kohya_import.load_model_util()
import diffusers  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

DT = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def text_config(v2):
    if v2:
        return CLIPTextConfig(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                              num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                              projection_dim=512)
    return CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          projection_dim=768)


def keyset(v2):
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**mu.create_unet_diffusers_config(v2, True))
        vae = diffusers.AutoencoderKL(**mu.create_vae_diffusers_config())
        text = CLIPTextModel(text_config(v2))
    # The body of save_stable_diffusion_checkpoint with ckpt_path=None, save_dtype=None.
    state_dict = {}

    def update_sd(prefix, sd):
        for k, v in sd.items():
            state_dict[prefix + k] = v

    update_sd("model.diffusion_model.", mu.convert_unet_state_dict_to_sd(v2, unet.state_dict()))
    if v2:
        update_sd("cond_stage_model.model.", mu.convert_text_encoder_state_dict_to_sd_v2(text.state_dict(), True))
    else:
        update_sd("cond_stage_model.transformer.", text.state_dict())
    update_sd("first_stage_model.", mu.convert_vae_state_dict(vae.state_dict()))
    return {k: {"shape": list(v.shape), "dtype": DT[v.dtype]} for k, v in sorted(state_dict.items())}


out = {"sd15": keyset(False), "sd21": keyset(True)}
with open(sys.argv[1], "w") as f:
    json.dump(out, f, indent=0, sort_keys=True)
print({k: len(v) for k, v in out.items()})
