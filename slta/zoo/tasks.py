"""Seeded generators for the zoo's three tasks and its pre-training corpus.

The tasks mirror the paper's Math / Coding / Translate, in formats a small transformer can
compute left to right:

* ``math``: 2-4 step word problems with small operands; the response is a chain of thought
  ("7 + 5 = 12. 12 - 3 = 9. #### 9"), so every emitted number is a small table lookup on
  numbers already in the context. The answer is the number after ``####`` (GSM8K style).
* ``code``: predict what a short Python snippet on a short list of digits prints
  (sorted, reversed, min, max, len, indexing, and one composition).
* ``translate``: translate a sentence from Zorbish (subject-verb-object, adjective after
  its noun) to Velarian (subject-object-verb, adjective before its noun): a lexicon lookup
  plus a word-order change.

The pre-training corpus contains the same *language* (story sentences, questions, code
snippets, monolingual Zorbish and Velarian sentences) but never a solved example, so the
base model knows the vocabulary and syntax but none of the skills.

Everything is a pure function of a ``random.Random``: same seed, same data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

TASKS = ("math", "code", "translate")

# ---------------------------------------------------------------------------------------------
# math: step-by-step word problems

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned", "Omar", "Pia"]
THINGS = ["apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps", "marbles", "rocks", "cups", "keys"]
# (verb phrase template, sign). "{n}" is the operand, "{x}" the thing.
ADD_STEPS = ["buys {n} more {x}", "finds {n} {x}", "gets {n} {x} from a friend", "wins {n} {x}"]
SUB_STEPS = ["gives away {n} {x}", "loses {n} {x}", "sells {n} {x}", "eats {n} {x}"]
MAX_VALUE = 40  # the running total stays in [0, MAX_VALUE] so every step is a small lookup


def math_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3, quote: bool = True) -> tuple[str, str, str]:
    """Returns (question, chain of thought + answer, answer).

    With ``quote`` each thought starts by quoting the step it works on ("wins 5: 5 + 5 = 10."):
    finding the next operand is then copying what follows the last quoted step in the
    question (what induction heads do), not counting sentences.
    """
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    value = rng.randint(2, 20)
    sentences = [f"{name} has {value} {thing}."]
    thoughts = []
    used: set[tuple[str, int]] = set()

    def pick_step() -> tuple[str, int, bool]:
        # Operands are 1..9; the sign is flipped when needed to keep the total in range.
        n, add = rng.randint(1, 9), rng.random() < 0.5
        if add and value + n > MAX_VALUE:
            add = False
        if not add and value - n < 0:
            add = True
        return rng.choice(ADD_STEPS if add else SUB_STEPS), n, add

    for i in range(rng.randint(min_steps, max_steps)):
        template, n, add = pick_step()
        while (template.split()[0], n) in used:  # distinct steps keep a quoted step unambiguous
            template, n, add = pick_step()
        used.add((template.split()[0], n))
        lead = name if i == 0 else "Then " + name
        sentences.append(f"{lead} {template.format(n=n, x=thing)}.")
        new = value + n if add else value - n
        quoted = f"{template.split()[0]} {n}: " if quote else ""
        thoughts.append(f"{quoted}{value} {'+' if add else '-'} {n} = {new}.")
        value = new
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return question, " ".join(thoughts) + f" #### {value}", str(value)


def math_story(rng: random.Random) -> str:
    """Pre-training text: the same sentences and questions, never a computed answer."""
    question, _, _ = math_problem(rng, 1, 4)
    if rng.random() < 0.5:  # sometimes only the story, sometimes story + question
        question = question.rsplit(" How many", 1)[0]
    return question


# ---------------------------------------------------------------------------------------------
# code: output of a short snippet on a list of digits

# Content-based operations only (a transformer finds "the smallest digit left" or "every 3"
# easily, but "the 4th element" or "the list backwards" needs position arithmetic it learns
# slowly). Sorting, the hardest, is listed twice.
CODE_EXPRS = ["sorted(x)", "sorted(x)", "sorted(x, reverse=True)", "sorted(set(x))", "min(x)", "max(x)", "len(x)", "x[0]", "x[-1]", "x.count({v})"]


def _fmt_list(xs: list[int]) -> str:
    return "[" + ", ".join(str(v) for v in xs) + "]"


def code_snippet(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str]:
    """Returns (snippet, expression) with the list literal bound to x."""
    xs = [rng.randint(0, 9) for _ in range(rng.randint(min_len, max_len))]
    expr = rng.choice(CODE_EXPRS).format(v=rng.randint(0, 9))
    return f"x = {_fmt_list(xs)}\nprint({expr})", expr


def run_snippet(snippet: str) -> str:
    """The reference output: the snippet *is* Python, so run it (on our own generated text only)."""
    env: dict = {}
    lines = snippet.split("\n")
    exec(lines[0], {}, env)  # noqa: S102 - generated by code_snippet, never user input
    value = eval(lines[1][len("print(") : -1], {}, env)  # noqa: S307
    return _fmt_list(value) if isinstance(value, list) else str(value)


def code_problem(rng: random.Random, min_len: int = 3, max_len: int = 6) -> tuple[str, str, str]:
    snippet, _ = code_snippet(rng, min_len, max_len)
    out = run_snippet(snippet)
    return snippet, out, out


# ---------------------------------------------------------------------------------------------
# translate: Zorbish (SVO, noun-adjective) -> Velarian (SOV, adjective-noun)

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "vo", "nu", "pe", "zi", "da", "ro", "fu", "ne", "li", "ga", "to", "be", "shi", "ma", "ko", "wa", "re", "xu"]


@dataclass(frozen=True)
class Lexicon:
    """Parallel word lists: zorbish[i] translates to velarian[i] within each part of speech."""

    nouns: tuple[tuple[str, str], ...]
    verbs: tuple[tuple[str, str], ...]
    adjectives: tuple[tuple[str, str], ...]


def make_lexicon(rng: random.Random, n_nouns: int, n_verbs: int, n_adjs: int) -> Lexicon:
    # Zorbish words are 2 syllables, Velarian words 2-3 syllables ending in a vowel-ish
    # suffix per part of speech, so the two languages look different but are both learnable.
    seen: set[str] = set()

    def word(n_syll: int, suffix: str = "") -> str:
        while True:
            w = "".join(rng.choice(SYLLABLES) for _ in range(n_syll)) + suffix
            if w not in seen:
                seen.add(w)
                return w

    def pairs(n: int, v_suffix: str) -> tuple[tuple[str, str], ...]:
        return tuple((word(2), word(rng.randint(1, 2), v_suffix)) for _ in range(n))

    return Lexicon(nouns=pairs(n_nouns, "n"), verbs=pairs(n_verbs, "r"), adjectives=pairs(n_adjs, "l"))


def sentence_pair(rng: random.Random, lex: Lexicon, p_adj: float = 0.5) -> tuple[str, str]:
    """A random (Zorbish, Velarian) sentence pair with the same meaning."""
    subj, verb, obj = rng.choice(lex.nouns), rng.choice(lex.verbs), rng.choice(lex.nouns)
    s_adj = rng.choice(lex.adjectives) if rng.random() < p_adj else None
    o_adj = rng.choice(lex.adjectives) if rng.random() < p_adj else None
    z = [subj[0]] + ([s_adj[0]] if s_adj else []) + [verb[0]] + [obj[0]] + ([o_adj[0]] if o_adj else [])
    v = ([s_adj[1]] if s_adj else []) + [subj[1]] + ([o_adj[1]] if o_adj else []) + [obj[1]] + [verb[1]]
    return " ".join(z), " ".join(v)


# ---------------------------------------------------------------------------------------------
# prompts: each task has its own header so a merged model can tell the tasks apart


def format_prompt(task: str, question: str) -> str:
    if task == "math":
        return f"Question: {question}\nAnswer:"
    if task == "code":
        return f"Code:\n{question}\nOutput:"
    if task == "translate":
        return f"Zorbish: {question}\nVelarian:"
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def make_example(task: str, rng: random.Random, lex: Lexicon, hard: dict) -> dict:
    """One example: {"prompt", "response", "answer"}; the response starts with a space."""
    if task == "math":
        q, response, answer = math_problem(rng, hard["math_min_steps"], hard["math_max_steps"], hard.get("math_quote", True))
    elif task == "code":
        q, response, answer = code_problem(rng, hard["code_min_len"], hard["code_max_len"])
    elif task == "translate":
        q, response = sentence_pair(rng, lex)
        answer = response
    else:
        raise ValueError(f"unknown task {task!r}")
    return {"prompt": format_prompt(task, q), "response": " " + response, "answer": answer}


def make_split(task: str, rng: random.Random, lex: Lexicon, hard: dict, n: int, exclude: set[str]) -> list[dict]:
    """n distinct examples whose prompts are not in ``exclude`` (held-out sets never leak)."""
    out: list[dict] = []
    tries = 0
    while len(out) < n:
        ex = make_example(task, rng, lex, hard)
        tries += 1
        if ex["prompt"] in exclude:
            if tries > 100 * n:
                raise RuntimeError(f"cannot find {n} distinct {task} examples")
            continue
        exclude.add(ex["prompt"])
        out.append(ex)
    return out


def practice_sheet(rng: random.Random) -> str:
    """Solved one-step sums, like the arithmetic facts any LLM knows from pre-training. The
    task skill (reading a word problem, chaining steps, the answer format) is not in them."""
    facts = []
    for _ in range(rng.randint(2, 5)):
        a, b = rng.randint(0, MAX_VALUE), rng.randint(1, 9)
        op = "-" if a - b >= 0 and rng.random() < 0.5 else "+"
        facts.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}.")
    return "#### Practice\n" + " ".join(facts)


def dictionary_entries(rng: random.Random, lex: Lexicon) -> str:
    """Word glosses, like a bilingual dictionary in a pre-training corpus: vocabulary, not
    the skill of translating sentences (word order, the prompt format)."""
    words = lex.nouns + lex.verbs + lex.adjectives
    entries = [f"In Velarian, {z} is {v}." for z, v in rng.sample(words, rng.randint(2, 5))]
    return "#### Words\n" + " ".join(entries)


def pretrain_document(rng: random.Random, lex: Lexicon, hard: dict) -> str:
    """One unlabeled document of the base's language: no solved task ever appears."""
    # Half the documents carry the task's prompt header, so the base knows the prompt
    # formats too and a fine-tune only has to learn the skill.
    header = rng.random() < 0.5
    kind = rng.randrange(6)
    if kind == 4:
        return practice_sheet(rng)
    if kind == 5:
        return dictionary_entries(rng, lex)
    if kind == 0:
        story = math_story(rng)
        return f"Question: {story}" if header else story
    if kind == 1:
        snippet, _ = code_snippet(rng, hard["code_min_len"], hard["code_max_len"] + 2)
        return f"Code:\n{snippet}" if header else snippet
    z, v = sentence_pair(rng, lex)
    # Monolingual sentences only: the base must not learn the Zorbish->Velarian mapping.
    if kind == 2:
        return f"Zorbish: {z}" if header else z
    return f"Velarian: {v}" if header else v
