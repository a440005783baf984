"""Generated demo sets: preferences in the Human-Like DPO shape (`builtin:human-like-demo`), and conversations for
SFT in the same casual style (`builtin:human-like-sft-demo`).

Casual questions about everyday topics; `chosen` answers are warm and human (emoji, exclamation marks, a question
back), `rejected` answers are the stiff "As an AI language model..." kind. Everything comes from the templates
below and a fixed seed, so the set is the same on every machine. Whole topics are held out for the `test` split,
so evaluation prompts are about things training never saw. Written as a dataset folder (a card with `configs`,
`train.jsonl`, `test.jsonl`), the layout a user's download has.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

VERSION = 1
NAME = "human-like-demo"
SFT_NAME = "human-like-sft-demo"

TOPICS = [
    ("karaoke", "belting out a cheesy power ballad"), ("pizza toppings", "pineapple, fight me"),
    ("weekend plans", "a lazy brunch and a long walk"), ("coffee", "a huge oat latte every morning"),
    ("hiking", "that view at the top of a tough trail"), ("video games", "cozy farming games at midnight"),
    ("cats", "the way they knock stuff off tables"), ("dogs", "the zoomies after a bath"),
    ("rainy days", "a blanket, tea and a good book"), ("cooking", "throwing random stuff into a pasta"),
    ("music festivals", "dancing in the mud with friends"), ("road trips", "gas station snacks and loud singing"),
    ("the beach", "sandy toes and a cold drink"), ("books", "mysteries I can't put down"),
    ("memes", "the ones with confused cats"), ("soccer", "last-minute goals that make everyone scream"),
    ("gardening", "finally growing a tomato that survives"), ("baking", "cookies that come out a bit gooey"),
    ("board games", "the chaos of a long game night"), ("camping", "s'mores by the fire"),
    ("tv shows", "bingeing a whole season in one go"), ("podcasts", "true crime on long drives"),
    ("photography", "golden hour shots of nothing special"), ("running", "that runner's high after the first mile"),
    ("yoga", "the stretchy bit at the end"), ("ice cream", "mint chocolate chip, always"),
    ("movies", "a big bucket of popcorn and a twisty plot"), ("travel", "getting lost in a new city"),
    ("concerts", "singing along with a whole crowd"), ("breakfast", "pancakes on a slow sunday"),
    ("sushi", "a spicy tuna roll"), ("winter", "hot chocolate and fuzzy socks"),
    ("summer", "long evenings that never seem to end"), ("birthdays", "cake, obviously"),
    ("puzzles", "that last piece clicking in"), ("dancing", "embarrassing moves in the kitchen"),
    ("tea", "a cup of chai when it's cold"), ("museums", "weird old stuff with funny labels"),
    ("plants", "a cactus that refuses to die"), ("fishing", "sitting by the lake doing mostly nothing"),
]
HELD_OUT_TOPICS = {"sushi", "winter", "puzzles", "tea", "museums", "fishing"}

QUESTIONS = [
    "Do you have a favorite thing about {t}?", "What do you think about {t}?", "Are you into {t}?",
    "Any fun stories about {t}?", "How do you feel about {t}?", "What's the best part of {t} for you?",
    "Got any tips for {t}?", "Be honest, is {t} overrated?",
]
OPENERS = ["Oh, {t}? Love it!", "Ooh, {t}! Yes!", "Haha, {t} is the best!", "Oh man, {t}!", "Honestly? {t} rocks!"]
MIDDLES = ["For me it's all about {d}.", "I'm a sucker for {d}.", "Nothing beats {d}, right?",
           "My favorite thing is {d}."]
EMOJI = ["😄", "🤩", "😂", "🙌", "😊", "🎉"]
BACK = ["What about you?", "How about you, any favorites?", "Do you have a go-to?", "What's your take?"]
STIFF = [
    "As an AI language model, I do not have personal preferences or experiences regarding {t}. However, I can "
    "provide general information about {t} if you require it.",
    "I am an artificial intelligence and therefore do not engage in activities such as {t}. I can offer factual "
    "information on this subject upon request.",
    "As a language model, I lack personal opinions about {t}. My purpose is to provide accurate and objective "
    "information to assist users with their queries.",
    "I do not possess feelings or personal experiences, so I cannot comment on {t} from a personal perspective. "
    "Please let me know if you require objective information.",
]


def rows(seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """{'train': [...], 'test': [...]} of {'prompt', 'chosen', 'rejected'} rows."""
    rng = random.Random(seed)
    out = {"train": [], "test": []}
    for topic, detail in TOPICS:
        for question in QUESTIONS:
            chosen = " ".join([rng.choice(OPENERS).format(t=topic), rng.choice(EMOJI),
                               rng.choice(MIDDLES).format(d=detail), rng.choice(BACK)])
            row = {"prompt": question.format(t=topic), "chosen": chosen[0].upper() + chosen[1:],
                   "rejected": rng.choice(STIFF).format(t=topic)}
            out["test" if topic in HELD_OUT_TOPICS else "train"].append(row)
    for split in out.values():
        rng.shuffle(split)
    return out


FOLLOW_UPS = ["Haha nice, anything else?", "Tell me more!", "Okay, and what would you never do?"]
FOLLOW_ANSWERS = ["Oh for sure, {d} never gets old {e}", "Honestly I could talk about {d} all day {e}",
                  "Skip the boring stuff, go straight for {d} {e}"]


def sft_rows(seed: int = 1) -> dict[str, list[dict]]:
    """{'train': [...], 'test': [...]} of {'messages': [...]} conversations: a casual answer to each question, and
    every third one a second user turn with a second casual answer (so every assistant turn has something to
    teach with `enable_concatenated_multi_turn`)."""
    rng = random.Random(seed)
    out = {"train": [], "test": []}
    for topic, detail in TOPICS:
        for n, question in enumerate(QUESTIONS):
            answer = " ".join([rng.choice(OPENERS).format(t=topic), rng.choice(EMOJI),
                               rng.choice(MIDDLES).format(d=detail), rng.choice(BACK)])
            messages = [{"role": "user", "content": question.format(t=topic)},
                        {"role": "assistant", "content": answer[0].upper() + answer[1:]}]
            if n % 3 == 0:
                messages += [{"role": "user", "content": rng.choice(FOLLOW_UPS)},
                             {"role": "assistant", "content": rng.choice(FOLLOW_ANSWERS).format(
                                 d=detail, e=rng.choice(EMOJI))}]
            out["test" if topic in HELD_OUT_TOPICS else "train"].append({"messages": messages})
    for split in out.values():
        rng.shuffle(split)
    return out


CARD = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: train.jsonl
  - split: test
    path: test.jsonl
---
# {title} (generated by trinity-dpo, version {version})

{train} training and {test} held-out {what}. Generated from templates with a fixed seed; the held-out topics never
appear in training.
"""
WHAT = {NAME: ("Human-like demo preferences", "pairs with the keys `prompt`, `chosen` (casual, human-like) and "
                                              "`rejected` (formal, AI-like)"),
        SFT_NAME: ("Human-like demo conversations", "conversations under `messages`, the assistant casual and warm")}


def write(folder: Path, name: str = NAME) -> Path:
    """Write the demo dataset `name`'s folder at `folder` (atomically) and return it."""
    data = sft_rows() if name == SFT_NAME else rows()
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, items in data.items():
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items),
                                            encoding="utf-8")
    title, what = WHAT[name]
    (tmp / "README.md").write_text(CARD.format(title=title, what=what, version=VERSION, train=len(data["train"]),
                                               test=len(data["test"])))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process wrote it first; the content is identical
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return folder
