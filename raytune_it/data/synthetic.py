"""A deterministic generator of Alpaca-format instruction data, in task families.

Each family is a small template with random slots and a computed answer, tagged
with a domain (medicine, law, finance, general). The same seed gives the same
records on every machine, so the tiny presets, the tests and the demo train on
real instruction data with no download, and evaluation can hold out whole
families (task generalization) or whole domains (domain specialization).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from raytune_it.builtins import BUILTIN_FAMILIES

if TYPE_CHECKING:
    from raytune_it.storage import Location

Example = tuple[str, str, str]  # instruction, input, output

WORDS = ("river stone light garden paper window silver market winter planet signal harbor forest "
         "engine letter morning bridge circle number story").split()
SYMPTOMS = {"cough": "respiratory", "wheezing": "respiratory", "shortness of breath": "respiratory",
            "chest pain": "cardiovascular", "palpitations": "cardiovascular", "swollen ankles": "cardiovascular",
            "heartburn": "digestive", "nausea": "digestive", "abdominal cramps": "digestive",
            "headache": "nervous", "numbness": "nervous", "dizziness": "nervous"}
EXPENSES = {"monthly rent payment": "housing", "mortgage instalment": "housing", "electricity bill": "utilities",
            "water bill": "utilities", "bus ticket": "transport", "fuel for the car": "transport",
            "weekly groceries": "food", "dinner at a restaurant": "food", "doctor visit": "health",
            "pharmacy purchase": "health"}
PARTIES = ("The tenant", "The supplier", "The employee", "The buyer", "The licensee", "The contractor")
ACTIONS = ("pay the invoice within 30 days", "disclose confidential information", "sublet the premises",
           "deliver the goods to the warehouse", "assign this agreement", "inspect the records")
CLAUSE_FORMS = {"shall": "obligation", "must": "obligation", "shall not": "prohibition",
                "must not": "prohibition", "may": "permission", "is entitled to": "permission"}


def _arithmetic(rng: random.Random) -> Example:
    per, boxes = rng.randint(2, 24), rng.randint(2, 15)
    item = rng.choice(["apples", "pencils", "books", "cups", "tiles"])
    return (f"A box holds {per} {item}. How many {item} are in {boxes} boxes?", "",
            f"{boxes} boxes of {per} {item} hold {per * boxes} {item}.")


def _unit_conversion(rng: random.Random) -> Example:
    value = rng.randint(1, 90)
    unit, factor, target = rng.choice([("kilometers", 1000, "meters"), ("meters", 100, "centimeters"),
                                       ("kilograms", 1000, "grams"), ("hours", 60, "minutes")])
    return (f"Convert {value} {unit} to {target}.", "", f"{value} {unit} is {value * factor} {target}.")


def _reverse_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 6))
    return ("Reverse the order of the words in the input.", " ".join(words), " ".join(reversed(words)))


def _uppercase(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(2, 5))
    return ("Rewrite the input in upper case.", " ".join(words), " ".join(words).upper())


def _sort_numbers(rng: random.Random) -> Example:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    return ("Sort the numbers in ascending order.", ", ".join(map(str, numbers)),
            ", ".join(map(str, sorted(numbers))))


def _dosage(rng: random.Random) -> Example:
    weight, dose = rng.randint(8, 95), rng.choice([2, 5, 10, 15])
    return (f"A patient weighs {weight} kg and the prescribed dose is {dose} mg per kg. What is the total dose?",
            "", f"The total dose is {weight * dose} mg ({weight} kg x {dose} mg/kg).")


def _symptom_system(rng: random.Random) -> Example:
    symptom = rng.choice(sorted(SYMPTOMS))
    return ("Which body system does the symptom mainly relate to?", symptom,
            f"The symptom '{symptom}' mainly relates to the {SYMPTOMS[symptom]} system.")


def _bmi(rng: random.Random) -> Example:
    weight, height = rng.randint(45, 120), rng.randint(150, 200) / 100
    return (f"Compute the body mass index for a weight of {weight} kg and a height of {height:.2f} m.", "",
            f"The BMI is {weight / height ** 2:.1f} kg/m2.")


def _clause_type(rng: random.Random) -> Example:
    form = rng.choice(sorted(CLAUSE_FORMS))
    clause = f"{rng.choice(PARTIES)} {form} {rng.choice(ACTIONS)}."
    return ("Classify the contract clause as an obligation, a prohibition or a permission.", clause,
            f"This clause is a {CLAUSE_FORMS[form]}.")


def _deadline(rng: random.Random) -> Example:
    day, period = rng.randint(1, 200), rng.choice([7, 14, 21, 28, 30, 60])
    return (f"A notice was served on day {day} and the response period is {period} days. "
            "On which day does the period end?", "", f"The response period ends on day {day + period}.")


def _simple_interest(rng: random.Random) -> Example:
    principal, rate, years = rng.randrange(1000, 20000, 500), rng.randint(1, 9), rng.randint(1, 6)
    interest = principal * rate * years / 100
    return (f"What is the simple interest on {principal} dollars at {rate}% per year for {years} years?", "",
            f"The interest is {interest:.2f} dollars.")


def _percent_change(rng: random.Random) -> Example:
    before = rng.randrange(20, 400, 4)
    after = before + rng.randrange(-before // 2, before, 4)
    change = (after - before) / before * 100
    return (f"A price moved from {before} to {after}. What is the percentage change?", "",
            f"The percentage change is {change:+.1f}%.")


def _expense_category(rng: random.Random) -> Example:
    expense = rng.choice(sorted(EXPENSES))
    return ("Categorize the expense.", expense, f"The expense '{expense}' belongs to {EXPENSES[expense]}.")


@dataclass(frozen=True)
class TaskFamily:
    name: str
    domain: str
    make: Callable[[random.Random], Example]


#: The code that writes each family's examples; the families and their domains are ``BUILTIN_FAMILIES``.
MAKERS: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic, "unit_conversion": _unit_conversion, "reverse_words": _reverse_words,
    "uppercase": _uppercase, "sort_numbers": _sort_numbers, "dosage": _dosage, "symptom_system": _symptom_system,
    "bmi": _bmi, "clause_type": _clause_type, "deadline": _deadline, "simple_interest": _simple_interest,
    "percent_change": _percent_change, "expense_category": _expense_category,
}
if set(MAKERS) != set(BUILTIN_FAMILIES):
    raise RuntimeError(f"raytune_it.builtins and data.synthetic disagree: {set(MAKERS) ^ set(BUILTIN_FAMILIES)}")
FAMILIES: tuple[TaskFamily, ...] = tuple(TaskFamily(name, domain, MAKERS[name])
                                         for name, domain in BUILTIN_FAMILIES.items())
DOMAINS = tuple(sorted({f.domain for f in FAMILIES}))


def generate(num_records: int, seed: int = 0, families: Iterable[str] | None = None) -> Iterator[dict[str, str]]:
    """Yield ``num_records`` records, cycling through the chosen families in a seeded order."""
    chosen = [f for f in FAMILIES if families is None or f.name in set(families)]
    if not chosen:
        raise ValueError(f"no task family selected; families: {', '.join(f.name for f in FAMILIES)}")
    rng = random.Random(seed)
    for index in range(num_records):
        family = chosen[index % len(chosen)] if index % 2 == 0 else rng.choice(chosen)
        instruction, extra, output = family.make(rng)
        yield {"instruction": instruction, "input": extra, "output": output,
               "family": family.name, "domain": family.domain}


def write_jsonl(records: Iterable[dict[str, str]], target: "str | Path", key: str = "output") -> "Location":
    """Write records as JSON Lines to a local path or storage URI, whole or not at all."""
    from raytune_it.storage import write_named_file

    lines = ((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8") for record in records)
    return write_named_file(str(target), key, lines)
