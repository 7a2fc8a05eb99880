"""The demo's own little shop: a catalogue and purchase histories written for the demo, so the
Recommend tab works on a fresh clone without the research data (never a copy of it).

Titles combine invented brands, product lines and sizes; each shopper favours a brand and a
line and mostly buys from them, sometimes something else — enough structure for a code target
to learn in a minute, and for its recommendations to be checkable by eye. Everything comes from
one seeded generator, so every machine builds the same shop (`write` puts it in two files in
the Beauty format: a JSON list of titles, and JSON lines of `history` / `valid` / `test`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from personalization.files import atomic_path

BRANDS = ("Moss & Fern", "Lumen", "Saltwater Co.", "Petal Lab", "Northwind", "Amberly")
LINES = {
    "shampoo": ("Shampoo", "Conditioner", "Hair Mask", "Scalp Serum"),
    "skin": ("Face Cream", "Night Serum", "Gel Cleanser", "Eye Cream"),
    "colour": ("Lipstick", "Mascara", "Eyeshadow Palette", "Blush"),
    "body": ("Body Lotion", "Shower Gel", "Hand Cream", "Body Scrub"),
}
VARIANTS = ("Rose", "Citrus", "Unscented", "Lavender")
SIZES = ("1 oz", "3.4 oz", "8 oz")
SHOPPERS = 240
SEED = 7


def titles() -> list[str]:
    """Every item: brand, variant, product and size (6 × 16 × 4 × 3 = 1,152 titles)."""
    return [
        f"{brand} {variant} {product}, {size}"
        for brand in BRANDS
        for products in LINES.values()
        for product in products
        for variant in VARIANTS
        for size in SIZES
    ]


def shoppers(n: int = SHOPPERS, seed: int = SEED) -> list[dict]:
    """Purchase histories in the Beauty format; each shopper keeps to a brand and a line."""
    rng = random.Random(seed)
    items = titles()
    out = []
    for i in range(n):
        brand, line = rng.choice(BRANDS), rng.choice(list(LINES))
        own = [t for t in items if t.startswith(brand) and any(p in t for p in LINES[line])]
        bought = [
            rng.choice(own) if rng.random() < 0.8 else rng.choice(items)
            for _ in range(rng.randint(6, 12))
        ]
        out.append(
            {
                "user_id": f"shopper-{i}",
                "history": bought[:-2],
                "valid": bought[-2:-1],
                "test": bought[-1:],
            }
        )
    return out


def write(folder: str | Path) -> tuple[Path, Path]:
    """The catalogue (`items.json`) and the histories (`shoppers.jsonl`) in `folder`."""
    folder = Path(folder)
    items, users = folder / "items.json", folder / "shoppers.jsonl"
    with atomic_path(items) as tmp:
        tmp.write_text(json.dumps(titles(), indent=0), encoding="utf-8")
    with atomic_path(users) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in shoppers()), encoding="utf-8")
    return items, users
