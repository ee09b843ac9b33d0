"""Golden fixtures for sdbooth's CLIP text encoders (crates/sdbooth-models/src/clip.rs).

Writes crates/sdbooth-models/tests/fixtures/clip_tiny_sd1.safetensors and clip_tiny_sd2.safetensors:
transformers' CLIPTextModel with the tiny-sd1 / tiny-sd2 text configs (config.rs), seeded random
weights, and for three cases

  plain   input ids [2, 77], clip_skip None  -> last_hidden_state
  skip2   input ids [2, 77], clip_skip 2     -> hidden_states[-2] then final_layer_norm
  long    input ids [2, 2, 77] (max_token_length 150), clip_skip None, windows joined as kohya's
          train_util.get_hidden_states / strategy_sd.SdTextEncodingStrategy.encode_tokens

the output and the gradient of every parameter for loss = (out * g).sum().

The compute runs in float64 on float32-representable weights and inputs, so the fixture is the
exact answer to within f32 rounding of the stored values; the Rust side computes in f32.

The token-embedding table (49408 x 32) would dominate the file, and only the rows of the ids used
matter to the output and get a gradient, so only those rows are stored
(`emb_rows` holds the ids, `param.<token embedding>` and `grad.*.<token embedding>` the rows);
the Rust test fills the other rows with zeros and checks that their gradient is zero.

Run from the repository root:  tools/.venv/bin/python tools/goldens/clip.py
"""

import os

import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

OUT = "crates/sdbooth-models/tests/fixtures"
TOK = "text_model.embeddings.token_embedding.weight"
BOS, EOS = 49406, 49407
MODEL_MAX = 77


def tiny_config(v2: bool) -> CLIPTextConfig:
    # Mirrors ModelConfig::tiny_sd1().text / tiny_sd2().text in config.rs.
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if v2 else "quick_gelu",
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=0 if v2 else EOS,
    )


def randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Every parameter random (norm gains near 1, biases non-zero) so a wrong name or a missing
    term shows up in the comparison."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


def prompt_ids(gen: torch.Generator, n_words: int, max_length: int, pad: int) -> torch.Tensor:
    """What CLIPTokenizer(padding="max_length", truncation=True) gives: BOS, words, EOS, pads."""
    words = torch.randint(0, 49406, (n_words,), generator=gen)
    ids = torch.full((max_length,), pad, dtype=torch.long)
    ids[0] = BOS
    ids[1 : 1 + n_words] = words
    ids[1 + n_words] = EOS
    return ids


def kohya_windows(input_ids: torch.Tensor, max_length: int, pad: int) -> torch.Tensor:
    """Transcribed from kohya's strategy_base.TokenizeStrategy._get_input_ids (max_length > 77)."""
    iids_list = []
    for i in range(1, max_length - MODEL_MAX + 2, MODEL_MAX - 2):
        ids_chunk = torch.cat(
            (input_ids[0].unsqueeze(0), input_ids[i : i + MODEL_MAX - 2], input_ids[-1].unsqueeze(0))
        )
        if pad != EOS:  # v2: pad_token_id != eos_token_id
            if ids_chunk[-2] != EOS and ids_chunk[-2] != pad:
                ids_chunk[-1] = EOS
            if ids_chunk[1] == pad:
                ids_chunk[1] = EOS
        iids_list.append(ids_chunk)
    return torch.stack(iids_list)


def kohya_join(hs: torch.Tensor, b_size: int, max_token_length: int) -> torch.Tensor:
    """Transcribed from kohya's train_util.get_hidden_states (the part after the encoder).

    The v2 branch there also has a loop comparing `input_ids[j, 1] == tokenizer.eos_token`, a
    tensor against the *string* "<|endoftext|>", which is always False: that branch never runs,
    so v1 and v2 join the windows the same way, which is what is written here."""
    hs = hs.reshape((b_size, -1, hs.shape[-1]))
    states = [hs[:, 0].unsqueeze(1)]
    for i in range(1, max_token_length, MODEL_MAX):
        states.append(hs[:, i : i + MODEL_MAX - 2])
    states.append(hs[:, -1].unsqueeze(1))
    return torch.cat(states, dim=1)


def encode(model, ids: torch.Tensor, clip_skip):
    """kohya's get_hidden_states on ids [B, 77] or [B, n, 77]."""
    b = ids.shape[0]
    flat = ids.reshape(-1, MODEL_MAX)
    if clip_skip is None:
        hs = model(flat)[0]
    else:
        out = model(flat, output_hidden_states=True, return_dict=True)
        hs = model.text_model.final_layer_norm(out["hidden_states"][-clip_skip])
    if ids.dim() == 3:
        hs = kohya_join(hs, b, ids.shape[1] * MODEL_MAX)
    return hs


def build(v2: bool, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    model = CLIPTextModel(tiny_config(v2)).eval()
    randomize(model, gen)
    # f32 weights, f64 compute: see the module docstring. transformers builds the causal mask with
    # the default dtype, so that has to be f64 too (finfo(f64).min does not fit an f32).
    model = model.double()
    torch.set_default_dtype(torch.float64)
    pad = 0 if v2 else EOS

    plain = torch.stack([prompt_ids(gen, 5, MODEL_MAX, pad), prompt_ids(gen, 30, MODEL_MAX, pad)])
    long_ids = torch.stack(
        [
            kohya_windows(prompt_ids(gen, 110, 152, pad), 152, pad),
            # Fits in the first window: the second window is BOS, pads..., as kohya builds it.
            kohya_windows(prompt_ids(gen, 20, 152, pad), 152, pad),
        ]
    )
    cases = {"plain": (plain, None), "skip2": (plain, 2), "long": (long_ids, None)}

    used = torch.unique(torch.cat([plain.flatten(), long_ids.flatten()]))
    tensors = {"emb_rows": used.to(torch.int64)}
    for name, p in model.named_parameters():
        value = p.detach().float()
        tensors[f"param.{name}"] = value[used] if name == TOK else value

    for case, (ids, skip) in cases.items():
        model.zero_grad()
        out = encode(model, ids, skip)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        (out * g).sum().backward()
        tensors[f"{case}.ids"] = ids.to(torch.int64)
        tensors[f"{case}.out"] = out.detach().float()
        tensors[f"{case}.g"] = g.float()
        for name, p in model.named_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grad = grad[used] if name == TOK else grad
            tensors[f"{case}.grad.{name}"] = grad.detach().float()
        # Tokens outside the used rows must get no gradient: checked here once, by construction.
        tok_grad = model.text_model.embeddings.token_embedding.weight.grad
        mask = torch.ones(tok_grad.shape[0], dtype=torch.bool)
        mask[used] = False
        assert tok_grad[mask].abs().max() == 0
    return {k: v.contiguous().clone() for k, v in tensors.items()}


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    for name, v2, seed in [("tiny_sd1", False, 1001), ("tiny_sd2", True, 1002)]:
        torch.set_default_dtype(torch.float32)
        path = f"{OUT}/clip_{name}.safetensors"
        save_file(build(v2, seed), path)
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
