"""The caption corpus for the tokenizer parity test: what people put in DreamBooth captions (booru tag
lists, sentences, instance tokens) and the text that trips tokenizers (curly quotes, full-width forms,
ligatures, HTML entities, emoji, odd whitespace, control characters, other scripts, very long
captions, the attention syntax of --weighted_captions). Deterministic: seeded.
"""

import random

TAGS = """1girl 1boy 2girls solo long_hair short_hair looking_at_viewer smile open_mouth blue_eyes blonde_hair
brown_hair black_hair red_eyes shirt skirt dress hat gloves jewelry earrings sitting standing outdoors
indoors sky cloud day night tree flower holding simple_background white_background upper_body full_body
closed_eyes blush bangs bow ribbon school_uniform thighhighs animal_ears cat_ears tail wings weapon sword
star_(sky) :d ;) ^_^ >_< o_o :3 x_x highres absurdres masterpiece best_quality score_9 score_8_up
depth_of_field bokeh film_grain 35mm f/1.8 8k uhd dslr rating:safe sks_dog ohwx_man zwx""".split()

SUBJECTS = ["sks dog", "ohwx man", "a photo of sks person", "zwx cat", "a woman", "an old man", "my dog Rex",
            "a red car", "the Eiffel Tower", "a bowl of ramen", "a knight in armor", "an astronaut"]
VERBS = ["sitting on", "standing next to", "running through", "looking at", "holding", "jumping over",
         "sleeping under", "painted on"]
PLACES = ["a wooden bench", "the beach at sunset", "a snowy forest", "Times Square", "a cyberpunk city",
          "the kitchen table", "a field of sunflowers", "Mt. Fuji", "a 1960's diner", "the rain"]
STYLES = ["photorealistic", "oil painting", "watercolor", "studio lighting", "by Greg Rutkowski",
          "trending on ArtStation", "cinematic, 4k", "anime style", "unreal engine 5", "high detail"]

UNICODE = ["café crème brûlée", "Straße", "STRASSE ẞ", "ΟΔΟΣ ΣΟΦΙΑΣ", "Ωμέγα", "кошка на крыше", "ПРИВЕТ",
           "東京タワー", "猫と犬", "고양이 사진", "قطة سوداء", "बिल्ली", "แมว", "İstanbul", "ıi", "Kelvin K",
           "it'ſ", "e\u0301te\u0301", "n\u0303", "Å", "x² y³", "½ cup", "Ⅻ", "①②", "٣ cats", "१२",
           "𝓗𝓮𝓵𝓵𝓸", "ℌ𝔢𝔩𝔩𝔬", "ǅemal", "ﬁne ﬂow ﬀ ﬃ ﬄ ﬅ ﬆ", "ĳsselmeer", "ŉ", "Œuvre œ", "æsir",
           "naïve façade", "Ångström", "Zürich", "São Paulo", "Ελληνικά", "ČŠŽ", "Łódź", "ğ", "ß"]
EMOJI = ["🐶", "🔥", "✨", "❤️", "👩‍💻", "🇯🇵", "👍🏽", "😀😃😄", "🤖", "☕", "⭐", "©", "®", "™", "→", "•",
         "…", "—", "–", "°", "±", "×", "÷", "€", "£", "¥", "§", "¶", "※", "♪", "☆", "★", "♡"]
QUOTES = ["“quoted”", "‘single’", "it’s", "don’t", "‚low‘", "„german“", "‹guillemet›", "«French»", "ʼn",
          "′prime″", "‛reversed‟", "`backtick`", '"straight"', "'apos'"]
FULLWIDTH = ["ＡＢＣ", "ｄｅｆ", "！？", "（ｔａｇ）", "１２３", "ｶﾀｶﾅ", "　", "＠＃＄％", "ｗｏｒｌｄ", "［ｘ］", "～"]
SPACES = ["\t", "\n", "\r\n", "\r", "\u00a0", "\u2003", "\u2009", "\u3000", "\u200b", "\u2028", "\u2029",
          "\x0b", "\x0c", "  ", "\u202f", "\u205f", "\u1680", "\x1c", "\x1f", "\u180e"]
ENTITIES = ["&amp;", "&quot;", "&#39;", "&lt;", "&gt;", "&nbsp;", "&hellip;", "&eacute;", "&EACUTE;",
            "&#x1F600;", "&#128512;", "&amp;amp;", "&#59;", "&copy;", "&mdash;", "&frac12;", "&bogus;",
            "&amp", "&#x41;", "&#0;", "&#150;", "&AMP;", "&szlig;", "&SZLIG;", "&NTILDE;", "&ThickSpace;"]
CONTROLS = ["\x00", "\x07", "\x1b[31m", "\x1b[0m", "\u200e", "\ufeff", "\u206a", "\x7f", "\x08", "\u00ad",
            "\u200d", "\ufffc", "\x1b", "\u2066"]
PUNCT = [",", ".", "!", "?", "!!", "!!!", "...", ";", ":", "-", "_", "/", "\\", "|", "@", "#", "$", "%",
         "^", "&", "*", "+", "=", "~", "<", ">", "{", "}", "'", '"', "(", ")", "[", "]", "?!", ":)", "<3"]
SPECIALS = ["<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|endoftext|>!", "a<|startoftext|>b"]
CONTRACTIONS = ["it's", "don't", "we're", "I've", "I'm", "we'll", "he'd", "IT'S", "rock'n'roll", "'s", "o'clock",
                "DON'T", "y'all", "'tis"]
WEIGHTED = ["(masterpiece:1.2)", "(best quality)", "[blurry]", "((sks dog))", r"\(escaped\)", "(nested (deep:1.5))",
            "(", ")", "[", "]", ":", "(x:.5)", "(x:+1.5)", "(y:-1)", "[[low]]", "(a:0)", r"\\", "\\", r"\[x\]",
            "(big:2.)", "(tag:1.1):", "(unclosed", "closed)", "(a [b] c:1.3)", "(:1.2)", "((a):0.8)", "(x:1.2.3)",
            "(y:.)", "(z:5..)", "no (open:1.5", "(w:+-1)", "((double:1.2):1.5)", "[(mixed:1.4)]", "(e:1e2)", "(fw:１.５)",
            "(ar:٢)", "(mix:1٫5)", "（full:1.2）"]


def tag(rng):
    t = rng.choice(TAGS)
    if rng.random() < 0.5:
        t = t.replace("_", " ")
    if rng.random() < 0.1:
        t = t.upper()
    return t


def booru(rng, n):
    sep = rng.choice([", ", ",", " , ", ", ", ", "])
    return sep.join(tag(rng) for _ in range(n))


def sentence(rng):
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}"
    if rng.random() < 0.6:
        s += ", " + rng.choice(STYLES)
    if rng.random() < 0.3:
        s = s[0].upper() + s[1:] + "."
    return s


def sprinkle(rng, text, pools, k):
    words = text.split(" ")
    for _ in range(k):
        pool = rng.choice(pools)
        pos = rng.randrange(len(words) + 1)
        piece = rng.choice(pool)
        if rng.random() < 0.5:
            words.insert(pos, piece)
        else:
            pos = max(0, min(pos, len(words) - 1))
            words[pos] = words[pos] + piece if words else piece
    return " ".join(words)


def build_corpus(seed=20261125):
    rng = random.Random(seed)
    out = []
    # Every listed piece on its own and in a short sentence, so each is covered at least once.
    for pool in [UNICODE, EMOJI, QUOTES, FULLWIDTH, ENTITIES, CONTROLS, PUNCT, SPECIALS, CONTRACTIONS, WEIGHTED]:
        for p in pool:
            out.append(p)
            out.append(f"a photo of {p} sks dog")
    for s in SPACES:
        out.append(f"{s}a{s}b{s}")
        out.append(f"tag one,{s}tag two{s}{s}, tag three")
    out += ["", " ", "   ", "\n", ",", "a", "A", "!", "! ", " !", "1", "12345", "3.14", "1,000", "sks", "SKS"]
    # Tag lists and sentences of every length, from a few tokens to well past 225.
    for n in [1, 3, 5, 10, 20, 30, 40, 60, 80, 100, 120]:
        for _ in range(8):
            out.append(booru(rng, n))
    for _ in range(120):
        out.append(", ".join(sentence(rng) for _ in range(rng.randint(1, 12))))
    pools = [UNICODE, EMOJI, QUOTES, FULLWIDTH, ENTITIES, PUNCT, CONTRACTIONS, SPACES, WEIGHTED, CONTROLS, SPECIALS]
    while len(out) < 1100:
        base = booru(rng, rng.randint(2, 40)) if rng.random() < 0.5 else sentence(rng)
        out.append(sprinkle(rng, base, pools, rng.randint(1, 6)))
    # Weighted-caption style prompts.
    for _ in range(60):
        parts = [rng.choice(WEIGHTED) if rng.random() < 0.4 else tag(rng) for _ in range(rng.randint(2, 25))]
        out.append(", ".join(parts))
    out += stress(rng, 400)
    return out


def stress(rng, n):
    """Random short strings from the characters ftfy's mojibake heuristic looks at (Latin-1,
    Windows-125x specials, Cyrillic, Greek, box drawing, C1 controls) mixed with ASCII, spaces
    and "!": where a port of ftfy would diverge first."""
    pools = [
        [chr(c) for c in range(0xA0, 0x100)],
        list("€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ"),
        [chr(c) for c in range(0x400, 0x460)],
        [chr(c) for c in range(0x384, 0x3CF)],
        [chr(c) for c in range(0x2500, 0x2580)],
        [chr(c) for c in range(0x80, 0xA0)],
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"),
        list("  !.,;:'\"()[]&#"),
        list("√±∂≠®™´≤≥¥µøπ°¢"),
    ]
    out = []
    for _ in range(n):
        k = rng.randint(1, 12)
        chosen = [rng.choice(pools) for _ in range(rng.randint(1, 3))]
        out.append("".join(rng.choice(rng.choice(chosen)) for _ in range(k)))
    return out


# Text that ftfy repairs as mojibake. Kept apart: sdbooth's coverage of fix_encoding is reported
# separately from the main parity corpus.
MOJIBAKE = ["cafÃ©", "Ã¢â‚¬Å“quoteÃ¢â‚¬Â", "â€œhelloâ€\x9d", "don‚Äôt", "voilÃ le travail", "sÃ³", "Ã\xa0 la",
            "Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "ã‚¢ãƒ‹ãƒ¡", "â€™", "caf\x82", "\x80 price", "a\x92s", "\x85", "Ã©tÃ©",
            "The Mona Lisa doesnÃƒÂ¢Ã¢â€šÂ¬Ã¢â€žÂ¢t have eyebrows.", "ÃœnÃ¯cÃ¶dÃ©", "l’Ã©tÃ©", "Ã¼ber"]
