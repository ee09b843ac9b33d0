"""Builds the CLIP BPE asset embedded in sdbooth and, on request, the vocab.json/merges.txt pair
that transformers' CLIPTokenizer reads.

Source: open_clip_torch's `bpe_simple_vocab_16e6.txt.gz` (MIT license, see
crates/sdbooth-data/assets/LICENSE-open_clip). Only the first 48,894 merges are used by CLIP
(49,408-token vocabulary), so the asset keeps just those: the rest would be dead weight in the binary.

Usage:
    python tools/tokenizer/make_vocab.py [--bpe PATH_TO_bpe_simple_vocab_16e6.txt.gz]
Without --bpe it runs `pip download open_clip_torch --no-deps` into a temporary folder.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSET = os.path.join(ROOT, "crates", "sdbooth-data", "assets", "clip_bpe_merges.txt.gz")
N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary is 49,408 = 512 byte tokens + merges + 2 specials


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable-char table, in vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def load_open_clip_bpe(path=None):
    if path is not None:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "open_clip_torch", "--no-deps", "-d", tmp, "-q"], check=True
        )
        wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
        with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
            raw = z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(raw).decode("utf-8")


def merges_from_bpe(text):
    lines = text.split("\n")
    merges = lines[1 : N_MERGES + 1]
    assert len(merges) == N_MERGES, len(merges)
    return merges


def vocab_from_merges(merges):
    """The vocabulary exactly as CLIP builds it (and as HF's vocab.json lists it)."""
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    vocab += ["".join(m.split(" ")) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab


def write_hf_files(folder, merges):
    os.makedirs(folder, exist_ok=True)
    vocab = vocab_from_merges(merges)
    encoder = {}
    for i, tok in enumerate(vocab):
        encoder[tok] = i  # a repeated string would keep its last id, as a dict built from the list would
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(encoder, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab), len(encoder)


def write_asset(merges):
    body = ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8")
    buf = io.BytesIO()
    # mtime=0 and no file name: the same input always gives the same bytes.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as g:
        g.write(body)
    with open(ASSET, "wb") as f:
        f.write(buf.getvalue())
    print(f"wrote {ASSET}: {len(buf.getvalue())} bytes, sha256 of text {hashlib.sha256(body).hexdigest()}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpe", help="path to bpe_simple_vocab_16e6.txt.gz (default: pip download open_clip_torch)")
    ap.add_argument("--hf-dir", help="also write vocab.json + merges.txt here")
    args = ap.parse_args()
    merges = merges_from_bpe(load_open_clip_bpe(args.bpe))
    write_asset(merges)
    if args.hf_dir:
        n, unique = write_hf_files(args.hf_dir, merges)
        print(f"vocab: {n} entries, {unique} distinct strings")
