"""Writes the tokenizer parity fixture: ids from transformers' slow CLIPTokenizer with ftfy (what kohya
uses), laid out by kohya's own window code (library/strategy_base.py, imported from a sd-scripts
checkout), for SD1 and SD2, max_token_length None/150/225, --no_token_padding and --weighted_captions.

Usage:
    python tools/tokenizer/make_goldens.py --kohya-src PATH/TO/sd-scripts [--bpe bpe_simple_vocab_16e6.txt.gz]

The SD1/SD2 tokenizer folders are built locally (no model hub): vocab.json/merges.txt from
open_clip's BPE file (make_vocab.py), and the tokenizer_config/special_tokens_map that
openai/clip-vit-large-patch14 and stabilityai/stable-diffusion-2 (subfolder tokenizer) ship: the
same, except SD2's pad token "!".
"""

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import types

import ftfy
import transformers
from transformers import CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import corpus  # noqa: E402
import make_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "crates", "sdbooth-data", "tests", "fixtures", "tokenizer", "parity.json.gz")


def added(content):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
            "__type": "AddedToken"}


def make_tokenizer(folder, merges, pad):
    make_vocab.write_hf_files(folder, merges)
    config = {"unk_token": added("<|endoftext|>"), "bos_token": added("<|startoftext|>"),
              "eos_token": added("<|endoftext|>"), "pad_token": "<|endoftext|>", "add_prefix_space": False,
              "errors": "replace", "do_lower_case": True, "model_max_length": 77,
              "special_tokens_map_file": "./special_tokens_map.json", "tokenizer_class": "CLIPTokenizer"}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "unk_token": added("<|endoftext|>"), "pad_token": pad}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(special, f)
    tok = CLIPTokenizer.from_pretrained(folder)
    assert tok.fix_text is not None, "ftfy must be installed: kohya's tokenizer cleans text with it"
    return tok


def import_kohya_strategy(kohya_src):
    # library/utils.py pulls in cv2/torchvision/diffusers for unrelated helpers; strategy_base only
    # needs its setup_logging, so a stand-in module is registered first.
    utils = types.ModuleType("library.utils")
    utils.setup_logging = lambda *a, **k: None
    sys.modules["library.utils"] = utils
    sys.path.insert(0, kohya_src)
    from library import strategy_base  # noqa: E402

    class Strategy(strategy_base.TokenizeStrategy):
        """SdTokenizeStrategy.tokenize/tokenize_with_weights for one caption, minus the model hub."""

        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def ids(self, text, max_token_length):
            max_length = self.tokenizer.model_max_length if max_token_length is None else max_token_length + 2
            return self._get_input_ids(self.tokenizer, text, max_length).tolist()

        def weighted(self, text, max_token_length):
            max_length = self.tokenizer.model_max_length if max_token_length is None else max_token_length + 2
            ids, weights = self._get_input_ids(self.tokenizer, text, max_length, weighted=True)
            return ids.tolist(), weights.tolist()

    return Strategy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kohya-src", required=True, help="a checkout of kohya-ss/sd-scripts")
    ap.add_argument("--kohya-commit", default="", help="recorded in the fixture")
    ap.add_argument("--bpe", help="bpe_simple_vocab_16e6.txt.gz (default: pip download open_clip_torch)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)  # "Token indices sequence length is longer than ..." per long caption
    transformers.logging.set_verbosity_error()

    merges = make_vocab.merges_from_bpe(make_vocab.load_open_clip_bpe(args.bpe))
    Strategy = import_kohya_strategy(args.kohya_src)
    tmp = tempfile.mkdtemp()
    toks = {"sd1": make_tokenizer(os.path.join(tmp, "sd1"), merges, "<|endoftext|>"),
            "sd2": make_tokenizer(os.path.join(tmp, "sd2"), merges, "!")}
    assert toks["sd1"].pad_token_id == 49407 and toks["sd2"].pad_token_id == 0

    captions = corpus.build_corpus()
    cases = []
    for i, text in enumerate(captions):
        case = {"text": text}
        for name, tok in toks.items():
            s = Strategy(tok)
            v = {"encode": tok(text).input_ids[1:-1], "nopad": tok(text, truncation=True).input_ids}
            for mtl in [None, 150, 225]:
                v[str(mtl)] = s.ids(text, mtl)
            # Weighted layout for a third of the corpus plus every caption with brackets.
            if i % 3 == 0 or any(c in text for c in "()[]\\"):
                for mtl in [None, 150, 225]:
                    try:
                        ids, weights = s.weighted(text, mtl)
                        v[f"w{mtl}"] = {"ids": ids, "weights": weights}
                    except ValueError:  # float() of a bad weight: kohya stops with this error
                        v[f"w{mtl}"] = None
            case[name] = v
        cases.append(case)

    mojibake = [{"text": t, "fixed": ftfy.fix_text(t), "sd1": toks["sd1"](t).input_ids[1:-1]}
                for t in corpus.MOJIBAKE]
    doc = {"transformers": transformers.__version__, "ftfy": ftfy.__version__,
           "kohya_commit": args.kohya_commit, "cases": cases, "mojibake": mojibake}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    raw = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    with open(OUT, "wb") as f:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as g:
            g.write(raw)
    print(f"{len(cases)} captions, {len(mojibake)} mojibake cases -> {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
