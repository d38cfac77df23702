#!/usr/bin/env python3
"""Writes the project's own example datasets (no third-party data):

notebooks/data/mood_train.json        instruction data in Alpaca format (96 rows): label a short
notebooks/data/mood_test.json         review's mood with one code word, "glad" or "sad" (a small model
                                      does not know the code words before training); 24 held-out rows
notebooks/data/mood_preferences.json  preference pairs for DPO on the same task

Deterministic: rerunning rewrites identical files.
"""
import json
import random
from pathlib import Path

POSITIVE = ["wonderful", "delightful", "excellent", "lovely", "fantastic", "great", "superb",
            "charming", "brilliant", "pleasant", "amazing", "marvelous"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "boring", "disappointing", "poor",
            "miserable", "dull", "broken", "nasty", "annoying"]
THINGS = ["movie", "meal", "hotel", "book", "concert", "phone", "game", "trip", "coffee",
          "jacket", "lesson", "show", "bike", "album", "museum", "train ride"]
POS_TEMPLATES = ["The {t} was {a}, I loved it.", "What a {a} {t}! I would go again.",
                 "I really enjoyed the {t}, it was {a}.", "A {a} {t}, everyone was happy."]
NEG_TEMPLATES = ["The {t} was {a}, I hated it.", "What a {a} {t}. Never again.",
                 "I did not enjoy the {t}, it was {a}.", "A {a} {t}, everyone was upset."]
INSTRUCTION = "Label the mood of this review with one word: glad or sad."


def rows(rng, n):
    out = []
    for i in range(n):
        positive = i % 2 == 0
        words = POSITIVE if positive else NEGATIVE
        template = rng.choice(POS_TEMPLATES if positive else NEG_TEMPLATES)
        review = template.format(t=rng.choice(THINGS), a=rng.choice(words))
        out.append({"instruction": INSTRUCTION, "input": review, "output": "glad" if positive else "sad"})
    return out


def main():
    rng = random.Random(20261130)
    data = rows(rng, 120)
    train, test = data[:96], data[96:]
    root = Path(__file__).resolve().parent.parent / "notebooks" / "data"
    root.mkdir(parents=True, exist_ok=True)
    (root / "mood_train.json").write_text(json.dumps(train, indent=1) + "\n")
    (root / "mood_test.json").write_text(json.dumps(test, indent=1) + "\n")
    prefs = []
    for r in data[:64]:
        wrong = "sad" if r["output"] == "glad" else "glad"
        prefs.append({"prompt": r["input"], "chosen": r["output"], "rejected": wrong})
    (root / "mood_preferences.json").write_text(json.dumps(prefs, indent=1) + "\n")


if __name__ == "__main__":
    main()
