"""The demo task: turn a sentence about a person into JSON with fixed keys (name, age, job, city).

SmolLM2-135M-Instruct cannot do this reliably out of the box (it chats around the answer,
drops keys or invents values); a few minutes of LoRA on CPU teaches it. Examples are generated
from a seed, so train and eval splits are reproducible and disjoint.
"""

from __future__ import annotations

import json
import random

from ftjax.whole_file import write_whole

INSTRUCTION = "Extract the person's name, age, job and city from the sentence. Reply with JSON only."
KEYS = ("name", "age", "job", "city")

FIRST = ("Maria Ahmed Chen Olga Tomas Priya Kwame Sofia Lars Yuki Fatima Diego Anna Omar Elena Raj Ines Noah Leila "
         "Mateo Zoe Ivan Amara Lucas Hana Felix Nadia Pablo Mei Jonas Aisha Carlos Greta Kofi Lina Marco Sara Emil "
         "Rosa Tariq").split()
LAST = ("Gonzalez Khan Wang Petrova Novak Sharma Mensah Rossi Berg Tanaka Haddad Silva Kowalski Farouk Ionescu Patel "
        "Costa Fischer Nasser Herrera Dubois Volkov Okafor Martin Sato Weber Aziz Ruiz Lin Larsen Bello Moreno "
        "Lindqvist Asante Jovanovic Bianchi Cohen Nilsen Reyes Hassan").split()
JOBS = ("nurse teacher plumber architect chef pilot dentist farmer librarian engineer carpenter pharmacist "
        "journalist electrician baker photographer lawyer mechanic accountant painter firefighter veterinarian "
        "gardener tailor translator surgeon musician barber designer programmer").split()
CITIES = ("Lisbon Nairobi Osaka Toronto Lyon Krakow Lima Accra Oslo Porto Denver Hanoi Quito Seville Dublin Perth "
          "Tunis Bergen Cusco Adelaide Malmo Leeds Graz Bologna Austin Tbilisi Sapporo Durban Valencia Riga Geneva "
          "Mombasa Cordoba Halifax Split Tallinn Fresno Cebu Aarhus Salta").split()
TEMPLATES = (
    "{name} is {a_age} {job} from {city}.",
    "Meet {name}, {a_job} aged {age} who lives in {city}.",
    "In {city}, {age}-year-old {name} works as {a_job}.",
    "{name} ({age}) has been {a_job} in {city} for years.",
    "Our new neighbour {name} is {age}, works as {a_job} and moved here from {city}.",
    "At {age}, {name} is the best-known {job} in {city}.",
    "The {job} {name}, {age}, was born and raised in {city}.",
    "{city} is home to {name}, {a_job} who just turned {age}.",
    "Yesterday I met {name}: {age} years old, {job}, living in {city}.",
    "{name}, {age}, {job}, {city}.",
    "Everyone in {city} knows {name}, the {age}-year-old {job}.",
    "After years abroad, {name} ({age}) now works as {a_job} in {city}.",
)


def _article(word: str) -> str:
    """'a nurse', 'an engineer', 'an 80-year-old' (by sound of the first letter or number)."""
    vowel = word[0] in "aeiou" or word.startswith(("8", "11-", "18-"))
    return f"{'an' if vowel else 'a'} {word}"


def answer(person: dict) -> str:
    """The target reply: compact JSON with the keys in a fixed order."""
    return json.dumps({k: person[k] for k in KEYS})


def make_examples(n: int, seed: int) -> list[dict]:
    """n chat records {"messages": [...]} for distinct people drawn with `seed`."""
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        person = {"name": f"{rng.choice(FIRST)} {rng.choice(LAST)}", "age": rng.randint(19, 88),
                  "job": rng.choice(JOBS), "city": rng.choice(CITIES)}
        sentence = rng.choice(TEMPLATES).format(**person, a_job=_article(person["job"]),
                                                a_age=_article(f"{person['age']}-year-old"))
        if sentence in seen:
            continue
        seen.add(sentence)
        out.append({"messages": [{"role": "user", "content": f"{INSTRUCTION}\n{sentence}"},
                                 {"role": "assistant", "content": answer(person)}]})
    return out


def split(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint train and eval splits (no eval sentence appears in train)."""
    records = make_examples(n_train + n_eval, seed)
    return records[:n_train], records[n_train:]


def parse_reply(reply: str) -> dict | None:
    """The first JSON object in a reply, or None when there is none."""
    start = reply.find("{")
    while start != -1:
        try:
            value, _ = json.JSONDecoder().raw_decode(reply[start:])
            return value if isinstance(value, dict) else None
        except ValueError:
            start = reply.find("{", start + 1)
    return None


def score(reply: str, expected: str) -> dict[str, float]:
    """exact: the reply's JSON equals the expected object; json_valid: the reply holds a JSON object."""
    got = parse_reply(reply)
    return {"exact": float(got is not None and got == json.loads(expected)), "json_valid": float(got is not None)}


def files(n_train: int = 3000, n_eval: int = 200, seed: int = 0) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) paths of the generated split, written once into a cache folder.

    The cache is $FTJAX_CACHE (default ~/.cache/ftjax); writes are atomic, so concurrent
    processes of a multi-host run can all call this.
    """
    return cached_splits(f"person_json-{n_train}-{n_eval}-{seed}", lambda: split(n_train, n_eval, seed))


def cached_splits(name: str, make, parts: tuple[str, ...] = ("train", "eval")) -> tuple[str, ...]:
    """(train.jsonl, eval.jsonl) under $FTJAX_CACHE/name: `make()`'s (train, eval) records, written once (atomic);
    `parts` names the files of a task that makes more (the knowledge task's docs.jsonl)."""
    import os
    from pathlib import Path

    root = Path(os.environ.get("FTJAX_CACHE", Path.home() / ".cache" / "ftjax"))
    folder = root / name
    paths = tuple(folder / f"{part}.jsonl" for part in parts)
    if all(p.exists() for p in paths):
        return tuple(str(p) for p in paths)
    folder.mkdir(parents=True, exist_ok=True)
    for path, records in zip(paths, make()):
        write_whole(path, "".join(json.dumps(r) + "\n" for r in records))
    return tuple(str(p) for p in paths)
