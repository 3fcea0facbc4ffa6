"""The knowledge task: questions about fictional products whose facts only a handbook holds.

Every product, maker and town is an invented word, so no base model knows the answers. The handbook (one
document per product, `{"id", "text"}`) covers every product; the training questions ask about some products and
the held-out questions about others, so fine-tuning can teach the answer format but not the held-out facts, while
retrieval over the handbook can find them. The demo task (person_json: a format) favours fine-tuning; this one
(unseen facts) favours retrieval. Generated from a seed, so the splits are reproducible.
"""

from __future__ import annotations

import dataclasses
import random

from ftjax.tasks.person_json import cached_splits

INSTRUCTION = "Answer with the fact only."
CATEGORIES = ("kettle", "desk lamp", "e-bike", "drone", "blender", "speaker", "air purifier", "robot vacuum",
              "camera", "projector", "coffee grinder", "heat pump", "sewing machine", "telescope", "keyboard")
COLOURS = ("amber", "slate grey", "teal", "coral", "ivory", "moss green", "graphite", "saffron", "cobalt blue",
           "plum", "sand", "crimson")
MAKER_KINDS = ("Labs", "Works", "Instruments", "Systems", "Industries")
ONSETS = "b d f g k l m n p r s t v z br dr gr kr pl tr st sk".split()
VOWELS = "a e i o u ai oa".split()
CODAS = ("", "", "n", "r", "l", "s", "x", "th")

# (attribute, the questions asking for it, its sentence in the handbook): the answer occurs verbatim in the sentence
FACTS = (
    ("maker", ("Which company makes the {product}?", "Who manufactures the {product}?"),
     "The {product} is made by {maker}."),
    ("year", ("In which year did the {product} launch?", "When was the {product} first sold?"),
     "It launched in {year}."),
    ("warranty", ("How long is the warranty on the {product}?", "What warranty does the {product} carry?"),
     "Its warranty lasts {warranty}."),
    ("weight", ("How much does the {product} weigh?", "What is the weight of the {product}?"),
     "It weighs {weight}."),
    ("colour", ("What colour does the {product} ship in?", "In which colour is the {product} sold?"),
     "It ships in {colour}."),
    ("town", ("In which town is the {product} assembled?", "Where is the {product} built?"),
     "Every unit is assembled in {town}."),
)


@dataclasses.dataclass(frozen=True)
class Product:
    """One fictional product: its name and the facts its handbook page states."""

    product: str
    category: str
    maker: str
    year: str
    warranty: str
    weight: str
    colour: str
    town: str


def _word(rng: random.Random) -> str:
    """An invented, pronounceable word of two or three syllables."""
    syllables = rng.choice((2, 3))
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)).capitalize() + rng.choice(CODAS)


def _words(rng: random.Random, n: int, taken: set[str]) -> list[str]:
    """n invented words, distinct from each other and from `taken` (which they join)."""
    out = []
    while len(out) < n:
        w = _word(rng)
        if w.lower() not in taken:
            taken.add(w.lower())
            out.append(w)
    return out


def make_products(n: int, seed: int) -> list[Product]:
    """n products with distinct invented names; makers and towns are drawn from smaller invented pools."""
    rng = random.Random(seed)
    taken: set[str] = set()
    makers = [f"{w} {rng.choice(MAKER_KINDS)}" for w in _words(rng, 12, taken)]
    towns = _words(rng, 16, taken)
    out = []
    for name in _words(rng, n, taken):
        category = rng.choice(CATEGORIES)
        years = rng.randint(1, 7)
        out.append(Product(product=f"{name} {category}", category=category, maker=rng.choice(makers),
                           year=str(rng.randint(2006, 2024)), warranty=f"{years} year{'s' if years > 1 else ''}",
                           weight=f"{rng.randint(30, 480) * 10} grams", colour=rng.choice(COLOURS),
                           town=rng.choice(towns)))
    return out


def document(p: Product, rng: random.Random) -> dict:
    """The product's handbook page {"id", "text"}: every fact's sentence, the first one first, the rest shuffled."""
    sentences = [template.format(**dataclasses.asdict(p)) for _, _, template in FACTS]
    rest = sentences[1:]
    rng.shuffle(rest)
    return {"id": p.product.split()[0].lower(), "text": " ".join(sentences[:1] + rest)}


def questions(p: Product, rng: random.Random) -> list[dict]:
    """One chat record per fact of the product, each asked in one of its phrasings."""
    facts = dataclasses.asdict(p)
    return [{"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{rng.choice(asks).format(**facts)}"},
                          {"role": "assistant", "content": facts[attribute]}]}
            for attribute, asks, _ in FACTS]


def split(n_train: int, n_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train questions, held-out questions, handbook): the questions of `n_train` products and of `n_held_out`
    other products; the handbook holds a page for every product, held-out ones included."""
    products = make_products(n_train + n_held_out, seed)
    rng = random.Random(seed + 1)
    train = [q for p in products[:n_train] for q in questions(p, rng)]
    held_out = [q for p in products[n_train:] for q in questions(p, rng)]
    handbook = [document(p, rng) for p in products]
    rng.shuffle(train)
    rng.shuffle(handbook)  # a page's place says nothing of its split
    return train, held_out, handbook


def files(n_train: int = 200, n_held_out: int = 50, seed: int = 0) -> tuple[str, str, str]:
    """(train.jsonl, eval.jsonl, docs.jsonl) of the generated split, written once into $FTJAX_CACHE (atomic)."""
    return cached_splits(f"product_handbook-{n_train}-{n_held_out}-{seed}", lambda: split(n_train, n_held_out, seed),
                         parts=("train", "eval", "docs"))
