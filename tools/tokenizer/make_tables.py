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
