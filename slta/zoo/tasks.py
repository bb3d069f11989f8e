"""Seeded generators for the zoo's three tasks and its pre-training corpus.

The tasks mirror the paper's Math / Coding / Translate, in formats a small transformer can
compute left to right:

* ``math``: 2-3 step word problems with operands 1..9 and totals up to 40; the response is
  a chain of thought that quotes the step it works on ("wins 5: 7 + 5 = 12. sells 3:
  12 - 3 = 9. #### 9"), so every emitted token is a copy or a small table lookup on what
  is already in the context. The answer is the number after ``####`` (GSM8K style).
* ``code``: what a two-line Python snippet on a list of 3-6 digits prints (sorted, sorted
  descending, sorted(set()), min, max, len, first/last element, count).
* ``translate``: translate a sentence from Zorbish (subject-verb-object, adjective after
  its noun) to Velarian (subject-object-verb, adjective before its noun): a lexicon lookup
  plus a word-order change.

The pre-training corpus holds the tasks' *language* (the story sentences and questions, code
snippets, monolingual Zorbish and Velarian) and, as a base LLM would, the tasks' *skills* in
other surface forms: problems solved as "Problem: ... Work: ..., so the answer is 9.",
interactive sessions (">>> x = [3, 1]", ">>> min(x)", "1"), a bilingual dictionary with whole
sentences ("In Velarian, ... is ..."), plus loose facts (running counts in stories, solved
sums). It never holds a task's prompt format followed by an answer, so the base solves none of
the tasks (measured: 0%); a fine-tune only has to tie the skill to the task's format.

Why: a first design whose base lacked the skills needed fine-tunes that rewrote the model
(|τ|/|θ| ≈ 0.5 at lr 1e-3); their task vectors did not add up (task arithmetic on the triple
kept 10% of the fine-tunes' accuracy). With the skills pre-trained, fine-tunes are short
(|τ|/|θ| ≈ 0.03-0.07 at lr 3e-4) and merging is hard but not hopeless, as for real LLMs.

Everything is a pure function of a ``random.Random``: same seed, same data.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

TASKS = ("math", "code", "translate")
# Two more tasks of the same kind, only for the chat kind's five-task extension (slta.zoo.extend,
# the paper's Table 10): bare arithmetic chains, and translation the other way round. The base
# has their skills in other forms (practice sums, the bilingual dictionary), not their formats.
EXTRA_TASKS = ("arith", "back_translate")

# ---------------------------------------------------------------------------------------------
# math: step-by-step word problems

NAMES = ["Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned", "Omar", "Pia"]
THINGS = ["apples", "pens", "coins", "books", "cards", "eggs", "shells", "stamps", "marbles", "rocks", "cups", "keys"]
# (verb phrase template, sign). "{n}" is the operand, "{x}" the thing.
ADD_STEPS = ["buys {n} more {x}", "finds {n} {x}", "gets {n} {x} from a friend", "wins {n} {x}"]
SUB_STEPS = ["gives away {n} {x}", "loses {n} {x}", "sells {n} {x}", "eats {n} {x}"]
MAX_VALUE = 40  # the running total stays in [0, MAX_VALUE] so every step is a small lookup


def math_steps(rng: random.Random, min_steps: int, max_steps: int) -> tuple[str, str, int, list[tuple[str, int, bool]]]:
    """A random problem: (name, thing, start value, [(step template, operand, is_add)])."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start = value = rng.randint(2, 20)
    steps: list[tuple[str, int, bool]] = []
    used: set[tuple[str, int]] = set()

    def pick_step() -> tuple[str, int, bool]:
        # Operands are 1..9; the sign is flipped when needed to keep the total in range.
        n, add = rng.randint(1, 9), rng.random() < 0.5
        if add and value + n > MAX_VALUE:
            add = False
        if not add and value - n < 0:
            add = True
        return rng.choice(ADD_STEPS if add else SUB_STEPS), n, add

    for _ in range(rng.randint(min_steps, max_steps)):
        template, n, add = pick_step()
        while (template.split()[0], n) in used:  # distinct steps keep a quoted step unambiguous
            template, n, add = pick_step()
        used.add((template.split()[0], n))
        steps.append((template, n, add))
        value = value + n if add else value - n
    return name, thing, start, steps


def math_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3, quote: bool = True) -> tuple[str, str, str]:
    """Returns (question, chain of thought + answer, answer).

    With ``quote`` each thought starts by quoting the step it works on ("wins 5: 5 + 5 = 10."):
    finding the next operand is then copying what follows the last quoted step in the
    question (what induction heads do), not counting sentences.
    """
    name, thing, value, steps = math_steps(rng, min_steps, max_steps)
    sentences = [f"{name} has {value} {thing}."]
    thoughts = []
    for i, (template, n, add) in enumerate(steps):
        lead = name if i == 0 else "Then " + name
        sentences.append(f"{lead} {template.format(n=n, x=thing)}.")
        new = value + n if add else value - n
        quoted = f"{template.split()[0]} {n}: " if quote else ""
        thoughts.append(f"{quoted}{value} {'+' if add else '-'} {n} = {new}.")
        value = new
    question = " ".join(sentences) + f" How many {thing} does {name} have now?"
    return question, " ".join(thoughts) + f" #### {value}", str(value)


def math_worked(rng: random.Random, min_steps: int, max_steps: int) -> str:
    """A solved problem in the pre-training corpus's own format ("Problem: ... Work: wins 5:
    7 + 5 = 12, sells 3: 12 - 3 = 9, so the answer is 9."): the skill a base LLM has, not
    the task's format (no "Question:"/"Answer:", no "####")."""
    question, response, answer = math_problem(rng, min_steps, max_steps)
    work = response.rsplit(" ####", 1)[0].rstrip(".").split(". ")
    return f"Problem: {question}\nWork: {', '.join(work)}, so the answer is {answer}."


def math_story(rng: random.Random, worked: bool) -> str:
    """Pre-training text about the same situations. Unworked: the story alone, or with its
    question, never an answer. Worked: a narrative that keeps the count as it goes ("..., so
    Gus has 5 rocks."), the knowledge a base LLM has without the task's format."""
    name, thing, value, steps = math_steps(rng, 1, 4)
    sentences = [f"{name} has {value} {thing}."]
    for i, (template, n, add) in enumerate(steps):
        lead = name if i == 0 else "Then " + name
        value = value + n if add else value - n
        keep = f", so {name} has {value} {thing}" if worked else ""
        sentences.append(f"{lead} {template.format(n=n, x=thing)}{keep}.")
    if not worked and rng.random() < 0.5:
        sentences.append(f"How many {thing} does {name} have now?")
    return " ".join(sentences)


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


def repl_facts(rng: random.Random, min_len: int, max_len: int) -> str:
    """Interpreter transcripts on list literals (">>> min([3, 1])" then "1"): what the list
    functions do, without the task's format (a variable, print, "Output:")."""
    lines = []
    for _ in range(rng.randint(1, 3)):
        snippet, expr = code_snippet(rng, min_len, max_len)
        literal = snippet.split("\n")[0][len("x = ") :]
        call = re.sub(r"\bx\b", literal, expr)
        lines += [f">>> {call}", run_snippet(snippet)]
    return "\n".join(lines)


def repl_session(rng: random.Random, min_len: int, max_len: int) -> str:
    """A solved snippet as an interactive session (">>> x = [3, 1]", ">>> min(x)", "1"): the
    skill, in another format than the task's ("Code:", print, "Output:")."""
    snippet, expr = code_snippet(rng, min_len, max_len)
    return f">>> {snippet.split(chr(10))[0]}\n>>> {expr}\n{run_snippet(snippet)}"


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


def arith_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 3) -> tuple[str, str, str]:
    """A math problem's steps without the story: ("7 + 5 - 3", "7 + 5 = 12. 12 - 3 = 9. #### 9", "9")."""
    _, _, value, steps = math_steps(rng, min_steps, max_steps)
    terms, thoughts = [str(value)], []
    for _, n, add in steps:
        new = value + n if add else value - n
        terms.append(f"{'+' if add else '-'} {n}")
        thoughts.append(f"{value} {'+' if add else '-'} {n} = {new}.")
        value = new
    return " ".join(terms), " ".join(thoughts) + f" #### {value}", str(value)


def format_prompt(task: str, question: str) -> str:
    if task == "math":
        return f"Question: {question}\nAnswer:"
    if task == "code":
        return f"Code:\n{question}\nOutput:"
    if task == "translate":
        return f"Zorbish: {question}\nVelarian:"
    if task == "arith":
        return f"Sum: {question}\nResult:"
    if task == "back_translate":
        return f"Velarian: {question}\nZorbish:"
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS + EXTRA_TASKS)}")


def make_example(task: str, rng: random.Random, lex: Lexicon, hard: dict) -> dict:
    """One example: {"prompt", "response", "answer"}; the response starts with a space."""
    if task == "math":
        q, response, answer = math_problem(rng, hard["math_min_steps"], hard["math_max_steps"], hard.get("math_quote", True))
    elif task == "code":
        q, response, answer = code_problem(rng, hard["code_min_len"], hard["code_max_len"])
    elif task == "translate":
        q, response = sentence_pair(rng, lex)
        answer = response
    elif task == "arith":
        q, response, answer = arith_problem(rng, hard["math_min_steps"], hard["math_max_steps"])
    elif task == "back_translate":
        response, q = sentence_pair(rng, lex)
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


def dictionary_entries(rng: random.Random, lex: Lexicon, sentence_frac: float = 0.0) -> str:
    """Word glosses, like a bilingual dictionary in a pre-training corpus: vocabulary, not
    the skill of translating sentences (word order, the prompt format)."""
    words = lex.nouns + lex.verbs + lex.adjectives
    entries = []
    for _ in range(rng.randint(2, 5)):
        r = rng.random()
        if r < sentence_frac:
            z, v = sentence_pair(rng, lex)
        elif r < 0.5 + sentence_frac / 2:
            z, v = rng.choice(words)
        else:  # a noun phrase: the adjective moves before its noun
            (zn, vn), (za, va) = rng.choice(lex.nouns), rng.choice(lex.adjectives)
            z, v = f"{zn} {za}", f"{va} {vn}"
        entries.append(f"In Velarian, {z} is {v}.")
    return "#### Words\n" + " ".join(entries)


def pretrain_document(rng: random.Random, lex: Lexicon, hard: dict) -> str:
    """One unlabeled document of the base's language.

    The base learns the vocabulary, both invented languages, digits and the program syntax,
    plus (in ``worked_frac`` of the task-related documents) the skills in other surface
    forms: solved problems, interactive sessions, a dictionary with sentences (a
    ``solved_frac`` of the worked documents), or loose facts (running counts, solved sums,
    interpreter transcripts on literals, word glosses). It never sees a task's prompt format
    followed by an answer, so it solves none of them.
    """
    # Half the unworked documents carry the task's prompt header, so the base knows the
    # prompt formats too.
    header = rng.random() < 0.5
    worked = rng.random() < hard["worked_frac"]
    # Of the worked documents, ``solved_frac`` are whole solved tasks in the corpus's own
    # formats (the skill, as a base LLM has it); the rest are loose facts.
    solved = worked and rng.random() < hard.get("solved_frac", 0.0)
    kind = rng.randrange(4)
    if kind == 0:
        if solved:
            return math_worked(rng, hard["math_min_steps"], hard["math_max_steps"])
        if worked:
            return practice_sheet(rng) if rng.random() < 0.3 else math_story(rng, worked=True)
        story = math_story(rng, worked=False)
        return f"Question: {story}" if header else story
    if kind == 1:
        if solved:
            return repl_session(rng, hard["code_min_len"], hard["code_max_len"])
        if worked:
            return repl_facts(rng, hard["code_min_len"], hard["code_max_len"])
        snippet, _ = code_snippet(rng, hard["code_min_len"], hard["code_max_len"] + 2)
        return f"Code:\n{snippet}" if header else snippet
    if worked:
        return dictionary_entries(rng, lex, 0.5 if solved else 0.0)
    z, v = sentence_pair(rng, lex)
    # Monolingual sentences only: the base never sees a sentence and its translation.
    if kind == 2:
        return f"Zorbish: {z}" if header else z
    return f"Velarian: {v}" if header else v
