"""The worked example's data: product-description pairs, and the curation lesson's noisy raw file.

The noisy file has duplicates, stray whitespace, empty fields, over-long rows and one malformed line.
"""

from __future__ import annotations

import json
import math
import os
import random
import unicodedata
from collections.abc import Sequence
from typing import Any

from lumorik_sft.course.synthetic.common import Record, check_size
from lumorik_sft.data import write_csv

# ------------------------------------------------------------------------------------------ products

# category -> (use phrase, materials, {feature name: (noun phrase, benefit clause)})
_CATEGORIES: dict[str, tuple[str, tuple[str, ...], dict[str, tuple[str, str]]]] = {
    "backpack": (
        "for commutes and weekend trips",
        ("recycled canvas", "ripstop nylon", "waxed cotton"),
        {
            "padded laptop sleeve": ("a padded laptop sleeve", "your laptop stays protected"),
            "water-resistant zip": ("a water-resistant zip", "your things stay dry in the rain"),
            "hidden back pocket": ("a hidden back pocket", "your passport stays out of sight"),
            "chest strap": ("an adjustable chest strap", "heavy loads feel lighter"),
        },
    ),
    "mug": (
        "for your morning coffee or evening tea",
        ("stoneware", "porcelain", "enamelled steel"),
        {
            "double-walled": ("double-walled insulation", "drinks stay hot for longer"),
            "dishwasher-safe": ("a dishwasher-safe glaze", "cleaning up takes seconds"),
            "wide handle": ("a wide handle", "it sits comfortably in your hand"),
            "spill-proof lid": ("a spill-proof lid", "you can carry it around without worry"),
        },
    ),
    "desk lamp": (
        "for late-night reading and focused work",
        ("brushed aluminium", "oak", "matte steel"),
        {
            "dimmable": ("a dimmable light", "you can set the perfect brightness"),
            "USB charging port": ("a built-in USB charging port", "your phone charges while you work"),
            "flexible arm": ("a flexible arm", "light goes exactly where you need it"),
            "warm LED": ("a warm LED bulb", "your eyes stay relaxed"),
        },
    ),
    "running shoes": (
        "for daily runs and race days",
        ("engineered mesh", "knit fabric", "recycled polyester"),
        {
            "cushioned sole": ("a cushioned sole", "every stride feels soft"),
            "reflective details": ("reflective details", "you stay visible after dark"),
            "breathable upper": ("a breathable upper", "your feet stay cool"),
            "grippy outsole": ("a grippy outsole", "wet roads feel safe"),
        },
    ),
    "water bottle": (
        "for the gym, the office and long hikes",
        ("stainless steel", "glass", "BPA-free plastic"),
        {
            "leak-proof cap": ("a leak-proof cap", "your bag stays dry"),
            "keeps drinks cold": ("vacuum insulation", "water stays cold all day"),
            "carry loop": ("a sturdy carry loop", "it clips onto any bag"),
            "measurement marks": ("measurement marks", "tracking what you drink is easy"),
        },
    ),
    "notebook": (
        "for sketches, lists and big ideas",
        ("recycled paper", "vegan leather", "linen"),
        {
            "dotted pages": ("dotted pages", "your notes stay neat"),
            "lay-flat binding": ("a lay-flat binding", "writing across both pages is easy"),
            "elastic closure": ("an elastic closure", "loose papers stay inside"),
            "numbered pages": ("numbered pages", "finding old notes is quick"),
        },
    ),
    "headphones": (
        "for music, calls and quiet focus",
        ("aluminium", "soft-touch plastic", "vegan leather"),
        {
            "noise cancelling": ("active noise cancelling", "busy trains fade away"),
            "long battery life": ("a long-lasting battery", "you can listen all week"),
            "foldable design": ("a foldable design", "they pack away easily"),
            "built-in microphone": ("a built-in microphone", "calls sound clear"),
        },
    ),
    "yoga mat": (
        "for yoga, stretching and home workouts",
        ("natural rubber", "cork", "TPE foam"),
        {
            "non-slip surface": ("a non-slip surface", "you stay steady in every pose"),
            "alignment lines": ("printed alignment lines", "your posture stays on track"),
            "extra thick": ("extra cushioning", "your knees stay comfortable"),
            "carry strap": ("a carry strap", "taking it to class is easy"),
        },
    ),
    "wallet": (
        "for cards, cash and everyday essentials",
        ("full-grain leather", "recycled nylon", "cork"),
        {
            "RFID blocking": ("RFID blocking", "your cards stay secure"),
            "coin pocket": ("a zipped coin pocket", "loose change stays put"),
            "slim profile": ("a slim profile", "it fits in any pocket"),
            "six card slots": ("six card slots", "your cards stay organised"),
        },
    ),
    "scarf": (
        "for chilly mornings and windy walks",
        ("merino wool", "cashmere blend", "organic cotton"),
        {
            "extra long": ("an extra-long cut", "you can wrap it twice"),
            "fringed edges": ("fringed edges", "it looks relaxed and stylish"),
            "machine-washable": ("machine-washable fibres", "care is simple"),
            "reversible": ("a reversible design", "you get two looks in one"),
        },
    ),
    "umbrella": (
        "for rainy commutes and sudden storms",
        ("fibreglass", "recycled polyester", "steel"),
        {
            "windproof frame": ("a windproof frame", "it survives strong gusts"),
            "auto-open button": ("an auto-open button", "it opens in a second"),
            "compact fold": ("a compact fold", "it slips into any bag"),
            "wooden handle": ("a curved wooden handle", "it feels good to hold"),
        },
    ),
    "frying pan": (
        "for quick breakfasts and weeknight dinners",
        ("cast iron", "carbon steel", "hard-anodised aluminium"),
        {
            "non-stick coating": ("a non-stick coating", "eggs slide right off"),
            "oven-safe": ("an oven-safe build", "dishes can finish in the oven"),
            "induction-ready": ("an induction-ready base", "it works on any hob"),
            "pouring spouts": ("two pouring spouts", "sauces pour without drips"),
        },
    ),
    "plant pot": (
        "for herbs, succulents and leafy houseplants",
        ("terracotta", "glazed ceramic", "concrete"),
        {
            "drainage hole": ("a drainage hole", "roots never sit in water"),
            "matching saucer": ("a matching saucer", "your shelves stay clean"),
            "self-watering": ("a self-watering reservoir", "plants drink when they need to"),
            "hanging cord": ("a hanging cord", "it can brighten any corner"),
        },
    ),
    "phone case": (
        "for everyday protection on the go",
        ("silicone", "recycled plastic", "leather"),
        {
            "raised edges": ("raised edges", "your screen is protected from drops"),
            "card holder": ("a built-in card holder", "you can leave your wallet at home"),
            "wireless charging": ("a wireless-charging-friendly back", "charging stays easy"),
            "grip texture": ("a textured grip", "it stays firmly in your hand"),
        },
    ),
    "blanket": (
        "for cosy evenings on the sofa",
        ("chunky knit wool", "fleece", "organic cotton"),
        {
            "oversized": ("an oversized cut", "there is room for two"),
            "machine-washable": ("machine-washable fabric", "care is simple"),
            "tasselled edges": ("tasselled edges", "it adds charm to any room"),
            "lightweight": ("a lightweight weave", "it works in every season"),
        },
    ),
    "sunglasses": (
        "for sunny days, road trips and beach walks",
        ("acetate", "titanium", "recycled plastic"),
        {
            "polarised lenses": ("polarised lenses", "glare disappears"),
            "UV protection": ("full UV protection", "your eyes stay safe"),
            "spring hinges": ("spring hinges", "they fit comfortably all day"),
            "hard case": ("a protective hard case", "they travel safely"),
        },
    ),
    "tote bag": (
        "for market runs, beach days and everything in between",
        ("heavy cotton", "jute", "recycled canvas"),
        {
            "inside pocket": ("an inside pocket", "your keys are easy to find"),
            "reinforced handles": ("reinforced handles", "heavy shopping is no problem"),
            "magnetic snap": ("a magnetic snap", "everything stays inside"),
            "foldable": ("a foldable design", "it tucks into any pocket"),
        },
    ),
}


def _without_article(phrase: str) -> str:
    return phrase.split(" ", 1)[1] if phrase.split(" ", 1)[0] in ("a", "an") else phrase


# feature name -> the phrase descriptions use for it, for fact checking
# (`lumorik_sft.fidelity`: "keeps drinks cold" is described as "vacuum insulation").
FEATURE_ALIASES: dict[str, tuple[str, ...]] = {
    name: (_without_article(noun),)
    for _, _, features in _CATEGORIES.values()
    for name, (noun, _) in features.items()
}

_COLOURS = (
    "navy",
    "charcoal",
    "forest green",
    "sand",
    "terracotta",
    "sky blue",
    "blush pink",
    "mustard yellow",
    "crème",
    "café au lait",
    "black",
    "ivory",
)
TONES = ("friendly", "professional", "playful", "luxurious")
LENGTHS = ("short", "long")

# Per tone, sentence templates. A list of 2 alternatives is the only seeded variation.
_TONE_TEMPLATES: dict[str, dict[str, Any]] = {
    "friendly": {
        "open": ["{Greet} your new favourite {category}: {colour} {material}, {ideal} {use}."],
        "greet": ["Meet", "Say hello to"],
        "ideal": ["perfect", "just right"],
        "feature": ["It has {noun}, so {benefit}.", "It comes with {noun}, so {benefit}."],
        "material": ["The {material} feels great and is easy to care for."],
        "close": ["We think you'll love it.", "We're sure you'll love it."],
        "extra": ["It also makes a thoughtful gift."],
    },
    "professional": {
        "open": ["This {colour} {category} is {made} from {material} and designed {use}."],
        "made": ["crafted", "built"],
        "feature": ["It features {noun}, ensuring {benefit}.", "It offers {noun}, ensuring {benefit}."],
        "material": ["The {material} construction provides durability for daily use."],
        "close": ["A reliable choice for everyday use.", "A dependable choice for everyday use."],
        "extra": ["Every unit is quality-checked before it ships."],
    },
    "playful": {
        "open": ["{Greet} the {category} of your dreams: {colour}, {material} and {ready} {use}!"],
        "greet": ["Behold", "Ta-da, here is"],
        "ready": ["ready", "totally ready"],
        "feature": ["Bonus: {noun}, so {benefit}!", "Plus: {noun}, so {benefit}!"],
        "material": ["The {material} is tough enough for all your adventures."],
        "close": ["Go on, treat yourself!", "Go on, you deserve it!"],
        "extra": ["Your friends will definitely ask where you got it."],
    },
    "luxurious": {
        "open": ["Indulge in an exquisite {colour} {category}, {shaped} from the finest {material} {use}."],
        "shaped": ["fashioned", "shaped"],
        "feature": ["It is refined with {noun}, so {benefit}.", "It is finished with {noun}, so {benefit}."],
        "material": ["The {material} brings a sense of quiet elegance to every detail."],
        "close": ["Pure, effortless luxury.", "Timeless, effortless luxury."],
        "extra": ["Each piece is finished by hand."],
    },
}


def sample_product_attributes(rng: random.Random) -> dict[str, Any]:
    """Draw one product: category, material, colour, 1-3 features, tone and length."""
    category = rng.choice(sorted(_CATEGORIES))
    _, materials, features = _CATEGORIES[category]
    n_features = rng.randint(1, 3)
    chosen = rng.sample(sorted(features), n_features)
    return {
        "category": category,
        "material": rng.choice(materials),
        "colour": rng.choice(_COLOURS),
        "features": chosen,
        "tone": rng.choice(TONES),
        "length": rng.choice(LENGTHS),
    }


def render_product_prompt(attrs: dict[str, Any]) -> str:
    """The instruction a model sees; every attribute the description depends on is listed."""
    return (
        "Write a product description.\n"
        f"Category: {attrs['category']}\n"
        f"Material: {attrs['material']}\n"
        f"Colour: {attrs['colour']}\n"
        f"Features: {', '.join(attrs['features'])}\n"
        f"Tone: {attrs['tone']}\n"
        f"Length: {attrs['length']}"
    )


def _fill(template: str, slots: dict[str, str]) -> str:
    text = template.format(**slots)
    return text[0].upper() + text[1:]


def sample_description(attrs: dict[str, Any], rng: random.Random) -> str:
    """Describe a product deterministically from its attributes, up to a few synonym choices.

    Tone picks the sentence templates, length the number of sentences (short: opening + one
    sentence per feature + closing; long adds a material sentence and an extra line), each feature
    has its own phrase and each category its own use phrase. Two calls with different ``rng``s
    differ only where a template offers two synonyms, so they agree strongly (BLEU well above 40).
    """
    use, _, feature_phrases = _CATEGORIES[attrs["category"]]
    templates = _TONE_TEMPLATES[attrs["tone"]]
    slots = {
        "category": attrs["category"],
        "material": attrs["material"],
        "colour": attrs["colour"],
        "use": use,
    }
    for slot in ("greet", "ideal", "made", "ready", "shaped"):
        if slot in templates:
            slots[slot.capitalize()] = slots[slot] = rng.choice(templates[slot])
    sentences = [_fill(rng.choice(templates["open"]), slots)]
    if attrs["length"] == "long":
        sentences.append(_fill(templates["material"][0], slots))
    for name in attrs["features"]:
        noun, benefit = feature_phrases[name]
        sentences.append(_fill(rng.choice(templates["feature"]), {"noun": noun, "benefit": benefit}))
    if attrs["length"] == "long":
        sentences.append(templates["extra"][0])
    sentences.append(rng.choice(templates["close"]))
    return " ".join(sentences)


def _attribute_key(attrs: dict[str, Any]) -> tuple:
    return (
        attrs["category"],
        attrs["material"],
        attrs["colour"],
        tuple(sorted(attrs["features"])),
        attrs["tone"],
        attrs["length"],
    )


def distinct_products() -> int:
    """How many different product prompts exist: more cannot be drawn without repeats."""
    per_look = len(_COLOURS) * len(TONES) * len(LENGTHS)
    return per_look * sum(
        len(materials) * sum(math.comb(len(features), k) for k in (1, 2, 3))
        for _, materials, features in _CATEGORIES.values()
    )


def _unique_attributes(n: int, rng: random.Random) -> list[dict[str, Any]]:
    """n product attribute sets with pairwise different prompts (feature order does not count)."""
    check_size("product_descriptions", n, distinct_products())
    seen, out = set(), []
    while len(out) < n:
        attrs = sample_product_attributes(rng)
        key = _attribute_key(attrs)
        if key not in seen:
            seen.add(key)
            out.append(attrs)
    return out


def product_descriptions(n: int = 1000, seed: int = 0) -> list[Record]:
    """The worked example's prompt/completion pairs; all prompts unique, same seed -> same data.

    >>> print(product_descriptions(1)[0]["prompt"].splitlines()[0])
    Write a product description.
    """
    rng = random.Random(seed)
    return [
        {"prompt": render_product_prompt(a), "completion": sample_description(a, rng)}
        for a in _unique_attributes(n, rng)
    ]


def product_agreement_bleu(n: int = 200, seed: int = 0) -> float:
    """Corpus BLEU between two independent descriptions of the same n products.

    This is the ceiling a perfect model can expect against a single reference: it shows how much of
    the score is lost to harmless wording variation (high but below 100).
    """
    import sacrebleu

    attrs = _unique_attributes(n, random.Random(seed))
    rng_a, rng_b = random.Random(f"{seed}-a"), random.Random(f"{seed}-b")
    hyps = [sample_description(a, rng_a) for a in attrs]
    refs = [sample_description(a, rng_b) for a in attrs]
    return float(sacrebleu.corpus_bleu(hyps, [refs]).score)


def write_product_csv(path: str | os.PathLike, records: Sequence[Record]) -> None:
    """Write prompt/completion pairs as CSV (multi-line prompts are quoted) for the JSONL-vs-CSV lesson."""
    write_csv(path, records)


# ------------------------------------------------------------------------------ noisy product file

NOISE_COUNTS = {
    "exact_duplicate": 50,
    "variant_duplicate": 50,
    "empty_prompt": 15,
    "empty_completion": 15,
    "too_long": 20,
    "malformed": 1,
}
MALFORMED_LINE = 17  # 1-based physical line of the single invalid-JSON line
_LONG_REPEAT = 12  # an over-long completion is the original repeated this many times


def _variant(record: Record, kind: str) -> Record:
    """A copy that looks different but cleans back to exactly the same text."""
    prompt, completion = record["prompt"], record["completion"]
    if kind == "nfd":
        return {"prompt": prompt, "completion": unicodedata.normalize("NFD", completion)}
    if kind == "spaces":
        return {"prompt": "  " + prompt, "completion": completion.replace(" ", "   ", 3) + " \t"}
    if kind == "crlf":
        return {"prompt": prompt.replace("\n", "\r\n"), "completion": completion}
    if kind == "zero_width":
        return {"prompt": prompt.replace(": ", ":\u200b ", 1), "completion": "\ufeff" + completion}
    # "nbsp_control": a no-break space and a stray BEL control character
    return {"prompt": prompt, "completion": completion.replace(" ", "\u00a0", 1) + "\x07"}


def _stray_whitespace(record: Record, rng: random.Random) -> Record:
    """Noise that cleaning removes; the record stays unique, so it is kept (cleaned)."""
    noisy = dict(record)
    field = rng.choice(["prompt", "completion"])
    before, after = rng.choice([(" ", " "), ("", "\n"), ("\t", ""), ("", "\u200b"), ("", "  ")])
    noisy[field] = before + noisy[field] + after
    return noisy


def noisy_product_descriptions_jsonl(seed: int = 0) -> str:
    """Raw JSONL text (about 1,150 lines) that needs curating before training.

    Built from ``product_descriptions(1000, seed)``: every original once (some with stray whitespace
    or zero-width characters), plus, per :data:`NOISE_COUNTS`, exact duplicates, variant duplicates
    that become exact after :func:`~lumorik_sft.data.clean_text` (NFD, extra spaces, CRLF, zero-width,
    NBSP), empty prompts/completions (possibly only whitespace), over-long rows (a completion repeated
    many times), a few blank lines, some CRLF line ends, a BOM, and exactly one invalid-JSON line at
    line :data:`MALFORMED_LINE`. Curating with skip_invalid and a token limit keeps exactly the
    1,000 originals.
    """
    rng = random.Random(f"noisy-{seed}")
    originals = product_descriptions(1000, seed)
    rows = [_stray_whitespace(r, rng) if rng.random() < 0.1 else r for r in originals]
    rows += [dict(r) for r in rng.sample(originals, NOISE_COUNTS["exact_duplicate"])]
    accented = [r for r in originals if not r["completion"].isascii()]
    kinds = ["nfd", "spaces", "crlf", "zero_width", "nbsp_control"]
    for i in range(NOISE_COUNTS["variant_duplicate"]):
        kind = kinds[i % len(kinds)]
        rows.append(_variant(rng.choice(accented if kind == "nfd" else originals), kind))
    for _ in range(NOISE_COUNTS["empty_prompt"]):
        rows.append(
            {
                "prompt": rng.choice(["", "  ", "\u200b", "\n"]),
                "completion": rng.choice(originals)["completion"],
            }
        )
    for _ in range(NOISE_COUNTS["empty_completion"]):
        rows.append({"prompt": rng.choice(originals)["prompt"], "completion": rng.choice(["", " "])})
    for r in rng.sample(originals, NOISE_COUNTS["too_long"]):
        rows.append({"prompt": r["prompt"], "completion": " ".join([r["completion"]] * _LONG_REPEAT)})
    rng.shuffle(rows)
    lines = [json.dumps(r, ensure_ascii=False) + rng.choice(["\n"] * 9 + ["\r\n"]) for r in rows]
    for _ in range(3):
        lines.insert(rng.randrange(MALFORMED_LINE, len(lines)), "\n")  # blank lines, after line 17
    truncated = json.dumps(rng.choice(originals), ensure_ascii=False)[:60]
    lines.insert(MALFORMED_LINE - 1, truncated + "\n")  # a record cut off mid-string: invalid JSON
    return "\ufeff" + "".join(lines)


def write_noisy_product_descriptions(path: str | os.PathLike, seed: int = 0) -> None:
    """Write :func:`noisy_product_descriptions_jsonl` byte for byte (CRLFs and BOM preserved)."""
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(noisy_product_descriptions_jsonl(seed))
