"""Writes the demo instruction dataset: alpaca_demo.jsonl (300 rows) and alpaca_demo_eval.jsonl (40 rows).

Original, generated, deterministic (fixed seeds; run it again and the files are byte-identical).
Short tasks with a consistent answer style, so a 135M model learns the structure within a few
dozen LoRA steps on CPU: the worked step when there is one, then "Answer: ...".

    python examples/data/make_demo_data.py [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

TRAIN_ROWS, EVAL_ROWS = 300, 40
TRAIN_SEED, EVAL_SEED = 1234, 5678

FRUITS = ["apple", "pear", "fig", "plum", "grape", "mango", "kiwi", "lemon", "cherry", "peach", "melon", "lime"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey"]
ANIMALS = ["cat", "dog", "horse", "otter", "eagle", "whale", "tiger", "rabbit", "fox", "owl", "bear", "seal"]
NAMES = ["Ana", "Ben", "Chloe", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena", "Marta", "Nils"]
SURNAMES = ["Moreau", "Okafor", "Silva", "Novak", "Tanaka", "Berg", "Costa", "Haddad", "Kowalski", "Lind", "Reyes"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Tallinn", "Quito", "Porto", "Hanoi", "Accra"]
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
    "open": "closed", "full": "empty", "high": "low", "strong": "weak", "wet": "dry", "old": "new",
    "hard": "soft", "rich": "poor", "loud": "quiet", "thick": "thin", "clean": "dirty", "long": "short",
    "first": "last", "inside": "outside", "up": "down", "push": "pull", "win": "lose", "buy": "sell",
}
PLURALS = {
    "box": "boxes", "city": "cities", "knife": "knives", "child": "children", "mouse": "mice", "bus": "buses",
    "leaf": "leaves", "baby": "babies", "tooth": "teeth", "dish": "dishes", "party": "parties", "wolf": "wolves",
    "foot": "feet", "glass": "glasses", "story": "stories", "person": "people", "goose": "geese", "brush": "brushes",
}
SENTENCE_WORDS = ["the", "a", "small", "green", "boat", "sails", "past", "old", "harbour", "at", "dawn", "quietly",
                  "my", "friend", "reads", "books", "every", "evening", "near", "river"]

Row = tuple[str, str, str]  # instruction, input, output


def _num(x: float) -> str:
    """Two decimals at most, no trailing zeros: 3.10 -> 3.1, 4.00 -> 4."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def km_to_miles(rng: random.Random) -> Row:
    km = rng.randint(2, 120)
    return f"Convert {km} km to miles.", "", f"{km} km × 0.621 = {_num(km * 0.621)} mi. Answer: {_num(km * 0.621)} mi"


def celsius_to_fahrenheit(rng: random.Random) -> Row:
    c = rng.randint(-20, 45)
    f = c * 9 / 5 + 32
    return f"Convert {c} °C to Fahrenheit.", "", f"{c} × 9/5 + 32 = {_num(f)}. Answer: {_num(f)} °F"


def kg_to_pounds(rng: random.Random) -> Row:
    kg = rng.randint(1, 90)
    return f"Convert {kg} kg to pounds.", "", f"{kg} kg × 2.205 = {_num(kg * 2.205)} lb. Answer: {_num(kg * 2.205)} lb"


def hours_to_minutes(rng: random.Random) -> Row:
    h = rng.randint(2, 48)
    return f"How many minutes are in {h} hours?", "", f"{h} × 60 = {h * 60}. Answer: {h * 60} minutes"


def addition(rng: random.Random) -> Row:
    a, b = rng.randint(10, 499), rng.randint(10, 499)
    return f"What is {a} + {b}?", "", f"{a} + {b} = {a + b}. Answer: {a + b}"


def sort_words(rng: random.Random) -> Row:
    words = rng.sample(rng.choice([FRUITS, COLOURS, ANIMALS]), rng.randint(3, 5))
    return "Sort these words alphabetically.", ", ".join(words), f"Answer: {', '.join(sorted(words))}"


def reverse_list(rng: random.Random) -> Row:
    words = rng.sample(rng.choice([FRUITS, COLOURS, ANIMALS]), rng.randint(3, 5))
    return "Reverse the order of this list.", ", ".join(words), f"Answer: {', '.join(reversed(words))}"


def uppercase(rng: random.Random) -> Row:
    text = f"{rng.choice(COLOURS)} {rng.choice(ANIMALS)}"
    return "Write this in capital letters.", text, f"Answer: {text.upper()}"


def count_words(rng: random.Random) -> Row:
    words = rng.sample(SENTENCE_WORDS, rng.randint(3, 8))
    return "How many words are in this sentence?", " ".join(words), f"The sentence has {len(words)} words. Answer: {len(words)}"


def opposite(rng: random.Random) -> Row:
    word, other = rng.choice(sorted(OPPOSITES.items()))
    if rng.random() < 0.5:
        word, other = other, word
    return f"Give the opposite of the word '{word}'.", "", f"Answer: {other}"


def plural(rng: random.Random) -> Row:
    word = rng.choice(sorted(PLURALS))
    question = rng.choice(["What is the plural of '{}'?", "Give the plural form of '{}'."]).format(word)
    return question, "", f"Answer: {PLURALS[word]}"


def to_json(rng: random.Random) -> Row:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    record = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
    return "Turn this record into JSON.", f"name: {name}, age: {age}, city: {city}", f"Answer: {record}"


def initials(rng: random.Random) -> Row:
    first, last = rng.choice(NAMES), rng.choice(SURNAMES)
    return f"What are the initials of {first} {last}?", "", f"Answer: {first[0]}. {last[0]}."


TASKS: list[Callable[[random.Random], Row]] = [
    km_to_miles, celsius_to_fahrenheit, kg_to_pounds, hours_to_minutes, addition, sort_words, reverse_list,
    uppercase, count_words, opposite, plural, to_json, initials,
]


def generate(count: int, seed: int, exclude: set[tuple[str, str]] = frozenset()) -> list[dict[str, str]]:
    """`count` distinct rows, tasks in turn; rows whose (instruction, input) is in `exclude` are skipped,
    so the evaluation set never repeats a training prompt. A task whose prompts run out is passed over."""
    rng, rows, seen, turn, misses = random.Random(seed), [], set(exclude), 0, 0
    while len(rows) < count:
        instruction, extra, output = TASKS[turn % len(TASKS)](rng)
        if (instruction, extra) in seen:
            misses += 1
            if misses < 50:
                continue
            if misses > 50 * len(TASKS):
                raise RuntimeError(f"only {len(rows)} distinct rows could be generated, {count} asked for")
        else:
            misses = 0
            seen.add((instruction, extra))
            rows.append({"instruction": instruction, "input": extra, "output": output})
        turn += 1
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    out = parser.parse_args(argv).out_dir
    out.mkdir(parents=True, exist_ok=True)
    train = generate(TRAIN_ROWS, TRAIN_SEED)
    evaluation = generate(EVAL_ROWS, EVAL_SEED, exclude={(r["instruction"], r["input"]) for r in train})
    write_jsonl(out / "alpaca_demo.jsonl", train)
    write_jsonl(out / "alpaca_demo_eval.jsonl", evaluation)
    print(f"wrote {len(train)} training and {len(evaluation)} evaluation rows to {out}")


if __name__ == "__main__":
    main()
