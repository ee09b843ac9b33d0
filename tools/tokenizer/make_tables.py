"""Writes the ftfy data tables that sdbooth's tokenizer embeds, read out of the installed ftfy (6.3.1,
the version kohya pins), so the Rust side decodes exactly the entities ftfy decodes.

Output: crates/sdbooth-data/assets/ftfy_html_entities.tsv, one `NAME<TAB>HEX HEX...` line per entity
`&NAME;` that ftfy.fixes.unescape_html replaces (HTML5 names plus ftfy's upper-cased variants).

Usage: python tools/tokenizer/make_tables.py
"""

import os

import ftfy
from ftfy.chardata import HTML_ENTITIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS = os.path.join(ROOT, "crates", "sdbooth-data", "assets")

assert ftfy.__version__ == "6.3.1", ftfy.__version__

with open(os.path.join(ASSETS, "ftfy_html_entities.tsv"), "w", encoding="ascii", newline="\n") as f:
    for key in sorted(HTML_ENTITIES):
        assert key.startswith("&") and key.endswith(";") and key[1:-1].isalnum(), key
        value = " ".join(f"{ord(c):X}" for c in HTML_ENTITIES[key])
        f.write(f"{key[1:-1]}\t{value}\n")
print(len(HTML_ENTITIES), "entities")


# --- mojibake detection (ftfy.badness.BADNESS_RE, ftfy.chardata.UTF8_DETECTOR_RE) ---------------
# The patterns are re-emitted in Rust `regex` syntax from Python's own parse tree, so no character
# class is transcribed by hand. Python's `\s` (str.isspace, which adds U+001C..U+001F to
# White_Space) and `\w` (str.isalnum or '_') are spelled out.
import re  # noqa: E402
import re._constants as C  # noqa: E402
import re._parser as P  # noqa: E402

from ftfy.badness import BADNESS_RE  # noqa: E402
from ftfy.chardata import CHARMAP_ENCODINGS, UTF8_CLUES, UTF8_DETECTOR_RE  # noqa: E402


def lit(c):
    return "\\x{%X}" % c


def category(cat, in_class):
    body = {C.CATEGORY_SPACE: r"\s\x{1C}-\x{1F}", C.CATEGORY_WORD: r"\p{L}\p{N}_", C.CATEGORY_DIGIT: r"\d"}[cat]
    return body if in_class else "[" + body + "]"


def emit(items):
    out = []
    for op, av in items:
        if op is C.LITERAL:
            out.append(lit(av))
        elif op is C.NOT_LITERAL:
            out.append("[^" + lit(av) + "]")
        elif op is C.ANY:
            out.append(".")
        elif op is C.AT:
            assert av is C.AT_BEGINNING, av
            out.append("^")
        elif op is C.IN:
            neg, parts = "", []
            for iop, iav in av:
                if iop is C.NEGATE:
                    neg = "^"
                elif iop is C.LITERAL:
                    parts.append(lit(iav))
                elif iop is C.RANGE:
                    parts.append(lit(iav[0]) + "-" + lit(iav[1]))
                elif iop is C.CATEGORY:
                    parts.append(category(iav, True))
                else:
                    raise ValueError(iop)
            out.append("[" + neg + "".join(parts) + "]")
        elif op is C.CATEGORY:
            out.append(category(av, False))
        elif op is C.BRANCH:
            out.append("(?:" + "|".join(emit(b) for b in av[1]) + ")")
        elif op is C.SUBPATTERN:
            out.append("(?:" + emit(av[3]) + ")")
        elif op in (C.MAX_REPEAT, C.MIN_REPEAT):
            lo, hi, sub = av
            hi_s = "" if hi is C.MAXREPEAT else str(hi)
            out.append("(?:" + emit(sub) + "){" + f"{lo},{hi_s}" + "}" + ("?" if op is C.MIN_REPEAT else ""))
        else:
            raise ValueError(f"unsupported regex op {op}")
    return "".join(out)


def to_rust(pattern):
    return emit(P.parse(pattern.pattern, pattern.flags))


def detector_parts():
    tree = list(P.parse(UTF8_DETECTOR_RE.pattern, UTF8_DETECTOR_RE.flags))
    assert tree[0][0] is C.ASSERT_NOT, tree[0]
    return emit(tree[1:])


with open(os.path.join(ASSETS, "ftfy_mojibake.txt"), "w", encoding="ascii", newline="\n") as f:
    f.write(to_rust(BADNESS_RE) + "\n")
    f.write(detector_parts() + "\n")
    # The lookbehind's class (Rust's regex has no lookbehind; the Rust side checks the char before).
    f.write(to_rust(re.compile("[" + UTF8_CLUES["utf8_continuation_strict"] + "]")) + "\n")
    for enc in CHARMAP_ENCODINGS:
        chars = []
        for b in range(256):
            if b < 0x80 and b != 0x1A:
                chars.append(b)  # possible_encoding takes ASCII (but 0x1A) as itself in every charmap
            else:
                chars.append(ord(bytes([b]).decode(enc)))
        f.write(enc + "\t" + " ".join(f"{c:X}" for c in chars) + "\n")
print("wrote ftfy_mojibake.txt")


# --- CLIP's pre-tokenizer classes ---------------------------------------------------------------
# \p{L} and \p{N} as the Python `regex` module that transformers uses sees them (its Unicode
# tables are newer than Rust regex's: about 17,000 letters assigned since Unicode 16 differ).
import regex  # noqa: E402


def class_ranges(prop):
    pat = regex.compile(prop)
    ranges = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or not pat.match(chr(cp)):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return "".join(lit(a) if a == b else lit(a) + "-" + lit(b) for a, b in ranges)


with open(os.path.join(ASSETS, "clip_pretokenizer_classes.txt"), "w", encoding="ascii", newline="\n") as f:
    f.write(f"# Python regex {regex.__version__}: \\p{{L}}, then \\p{{N}}\n")
    f.write(class_ranges(r"\p{L}") + "\n")
    f.write(class_ranges(r"\p{N}") + "\n")
print("wrote clip_pretokenizer_classes.txt")


# --- Python's str.lower() ------------------------------------------------------------------------
# transformers lower-cases with Python's str.lower() (Python 3.11: Unicode 14), whose tables are
# older than Rust's: about 55 capitals assigned since would be lowered by Rust only. Written: every
# char that lower() changes, then the two properties of its Final_Sigma rule for capital sigma
# (case-ignorable chars are skipped; a cased char before and none after make it final). The
# properties are read off lower() itself, so they are exactly Python's.
import sys  # noqa: E402


def lower_tables():
    mapping, ignorable, cased = [], [], []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        if cp != 0x3A3 and c.lower() != c:
            mapping.append(f"{cp:X}\t" + " ".join(f"{ord(x):X}" for x in c.lower()))
        t1 = ("A" + c + "\u03a3").lower()[-1] == "\u03c2"  # ignorable or cased
        t2 = (c + "\u03a3").lower()[-1] == "\u03c2"  # cased and not ignorable
        if t2:
            cased.append(cp)
        elif t1:
            ignorable.append(cp)
    return mapping, ignorable, cased


def to_ranges(cps):
    ranges = []
    for cp in cps:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return " ".join(f"{a:X}-{b:X}" for a, b in ranges)


mapping, ignorable, cased = lower_tables()
with open(os.path.join(ASSETS, "python_lower.txt"), "w", encoding="ascii", newline="\n") as f:
    f.write(f"# Python {sys.version.split()[0]} str.lower(): case-ignorable ranges, cased ranges, then the mapping\n")
    f.write(to_ranges(ignorable) + "\n")
    f.write(to_ranges(cased) + "\n")
    f.write("\n".join(mapping) + "\n")
print("wrote python_lower.txt:", len(mapping), "mappings")


# --- decimal digits for --weighted_captions ------------------------------------------------------
# kohya's weight regex `[.\d]+` (Python `re`: \d is any char with a decimal value, Unicode 14 here)
# and float() accept every script's digits, e.g. full-width "１.５" typed with a Japanese IME. Each
# block of ten is written by its zero.
import unicodedata  # noqa: E402

zeros = [cp for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and re.match(r"\d", chr(cp))
         and unicodedata.decimal(chr(cp), -1) == 0]
for z in zeros:
    assert all(unicodedata.decimal(chr(z + i), -1) == i and re.match(r"\d", chr(z + i)) for i in range(10)), hex(z)
assert sum(1 for cp in range(0x110000) if not 0xD800 <= cp <= 0xDFFF and re.match(r"\d", chr(cp))) == 10 * len(zeros)
with open(os.path.join(ASSETS, "python_digits.txt"), "w", encoding="ascii", newline="\n") as f:
    f.write(f"# Python {sys.version.split()[0]} re \\d: the zero of each block of ten decimal digits\n")
    f.write(" ".join(f"{z:X}" for z in zeros) + "\n")
print("wrote python_digits.txt:", len(zeros), "digit blocks")
