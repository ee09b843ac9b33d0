"""One-off sweep (not a checked-in fixture): the ids of every Unicode code point on its own, between
two letters, through transformers' slow CLIPTokenizer + ftfy, for the ignored Rust test
`every_code_point_matches` (crates/sdbooth-data/tests/tokenizer_codepoints.rs). It finds where
Python's Unicode tables (unicodedata 14 for NFC/NFKC/lower, the `regex` module for \\p{L}/\\p{N})
and Rust's disagree.

Usage: python tools/tokenizer/all_codepoints.py OUT.tsv   (about two minutes)
then:  SDBOOTH_ALL_CODEPOINTS=OUT.tsv cargo test -p sdbooth-data --test tokenizer_codepoints -- --ignored
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_goldens  # noqa: E402
import make_vocab  # noqa: E402


def main():
    out = sys.argv[1]
    bpe = sys.argv[2] if len(sys.argv) > 2 else None
    merges = make_vocab.merges_from_bpe(make_vocab.load_open_clip_bpe(bpe))
    tok = make_goldens.make_tokenizer(os.path.join(tempfile.mkdtemp(), "sd1"), merges, "<|endoftext|>")
    with open(out, "w", encoding="utf-8") as f:
        for cp in range(0x110000):
            if 0xD800 <= cp <= 0xDFFF:
                continue
            ids = tok("x" + chr(cp) + "y").input_ids[1:-1]
            f.write(f"{cp:X}\t{' '.join(map(str, ids))}\n")


if __name__ == "__main__":
    main()
