"""Verifiable chat tasks with held-out test sets, exact-match scoring, and a plain prompt-file format.

Built-in tasks (``make_task(name)``) are short-answer questions in chat format whose answer can be
checked exactly. SmolLM2-135M-Instruct (the default teacher, a 4-bit GGUF) answers them in one sentence
(``"The plural of mouse is mice."``); a student made of a few of its layers answers none of them:

=============  ==========================================================  ==============================
task           question (user turn)                                        answer checked
=============  ==========================================================  ==============================
``plural``     ``What is the plural of mouse?``                            ``mice``
``opposite``   ``What is the opposite of early?``                          ``late``
``capital``    ``What is the capital of Kenya?``                           ``Nairobi``
``addition``   ``What is 7 + 5?`` (``digits`` per operand)                 ``12``
=============  ==========================================================  ==============================

Each task is a fixed list of items (arithmetic: all operand pairs) split into train and test by a
seeded shuffle, so the test items are never seen in training. :func:`extract_answer` reads the model's
answer (words: the last word of the first sentence; numbers: the last number of the response) and
:func:`exact_match` compares it with the reference, ignoring case and surrounding punctuation.

**Prompt files** (:func:`load_prompt_file`) bring users' own prompts: either plain text, one prompt per
line (blank lines and lines starting with ``#`` are skipped; ``\\n`` in a line is a newline), or JSON
lines with the fields

``prompt``   the user message (required unless ``messages`` is given)
``messages`` a full chat ``[{"role": ..., "content": ...}, ...]`` ending with a user turn
``system``   an optional system message
``answer``   an optional reference answer (enables exact-match)
``context``  optional privileged context for self-distillation (e.g. the worked solution)
``completion`` an optional reference completion (the off-policy batches of GKD with lambda < 1)
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """One prompt: the chat messages the student sees, plus optional answer / completion / context.

    ``messages`` end with the user turn; the assistant's reply is generated. ``answer`` is the string
    that :func:`exact_match` checks, ``completion`` a reference reply in the teacher's style (used when a
    GKD step is not on-policy), ``context`` privileged information only the self-distillation teacher
    sees, and ``kind`` (``"word"`` or ``"number"``) selects the answer extraction rule.
    """

    messages: tuple[Message, ...]
    answer: str | None = None
    completion: str | None = None
    context: str | None = None
    kind: str = "word"

    def __post_init__(self) -> None:
        if not self.messages or self.messages[-1].get("role") != "user":
            raise ValueError("an Example's messages must end with a user turn")
        if self.kind not in ("word", "number"):
            raise ValueError(f"kind must be 'word' or 'number', got {self.kind!r}")

    @property
    def prompt(self) -> str:
        """The last user message."""
        return self.messages[-1]["content"]

    def teacher_messages(self, template: str) -> tuple[Message, ...]:
        """The messages with the privileged ``context`` inserted into the last user turn by ``template``
        (fields ``{prompt}`` and ``{context}``); unchanged when there is no context."""
        if self.context is None:
            return self.messages
        content = template.format(prompt=self.prompt, context=self.context)
        return (*self.messages[:-1], {"role": "user", "content": content})


@dataclass(frozen=True)
class TaskSplit:
    """A task's items split into ``train`` and ``test`` (disjoint; ``test`` is held out)."""

    name: str
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# Answer extraction and scoring
# ---------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")


def extract_answer(response: str, kind: str = "word") -> str | None:
    """The answer in a model's response, or ``None`` when there is none.

    ``kind="number"``: the last number in the response (thousands separators removed).
    ``kind="word"``: the last word of the first sentence (``"The plural of mouse is mice. ..."`` ->
    ``"mice"``), lower-cased.
    """
    text = response.strip()
    if kind == "number":
        numbers = _NUMBER.findall(text.replace(",", ""))
        return numbers[-1] if numbers else None
    first = re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0]
    words = _WORD.findall(first)
    return words[-1].strip("'-").lower() if words else None


def exact_match(response: str, answer: str, kind: str = "word") -> bool:
    """Whether the extracted answer equals ``answer`` (case-insensitive; multi-word answers such as
    ``"Buenos Aires"`` match when the first sentence ends with them)."""
    if kind == "number":
        got = extract_answer(response, "number")
        try:
            return got is not None and float(got) == float(answer)
        except ValueError:
            return False
    words = answer.lower().split()
    if len(words) > 1:
        first = re.split(r"(?<=[.!?])\s|\n", response.strip(), maxsplit=1)[0].lower()
        return [w.lower() for w in _WORD.findall(first)][-len(words) :] == words
    return extract_answer(response, "word") == words[0] if words else False


# ---------------------------------------------------------------------------------------------------
# Built-in tasks
# ---------------------------------------------------------------------------------------------------

# fmt: off
PLURALS: tuple[tuple[str, str], ...] = (
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("car", "cars"), ("tree", "trees"),
    ("house", "houses"), ("girl", "girls"), ("boy", "boys"), ("bird", "birds"), ("apple", "apples"),
    ("table", "tables"), ("chair", "chairs"), ("door", "doors"), ("window", "windows"),
    ("flower", "flowers"), ("river", "rivers"), ("mountain", "mountains"), ("road", "roads"),
    ("ship", "ships"), ("train", "trains"), ("horse", "horses"), ("cow", "cows"), ("pig", "pigs"),
    ("duck", "ducks"), ("frog", "frogs"), ("lion", "lions"), ("tiger", "tigers"), ("snake", "snakes"),
    ("shirt", "shirts"), ("shoe", "shoes"), ("hat", "hats"), ("coat", "coats"), ("bed", "beds"),
    ("lamp", "lamps"), ("cup", "cups"), ("plate", "plates"), ("spoon", "spoons"), ("pen", "pens"),
    ("pencil", "pencils"), ("desk", "desks"), ("king", "kings"), ("queen", "queens"), ("friend", "friends"),
    ("teacher", "teachers"), ("doctor", "doctors"), ("farmer", "farmers"), ("lake", "lakes"),
    ("island", "islands"), ("star", "stars"), ("planet", "planets"), ("cloud", "clouds"),
    ("stone", "stones"), ("rock", "rocks"), ("hill", "hills"), ("field", "fields"), ("garden", "gardens"),
    ("room", "rooms"), ("wall", "walls"), ("floor", "floors"), ("street", "streets"), ("town", "towns"),
    ("school", "schools"), ("student", "students"), ("song", "songs"), ("game", "games"), ("word", "words"),
    ("letter", "letters"), ("number", "numbers"), ("color", "colors"), ("egg", "eggs"), ("cake", "cakes"),
    ("bag", "bags"), ("ring", "rings"), ("key", "keys"), ("toy", "toys"), ("day", "days"),
    ("year", "years"), ("hand", "hands"), ("eye", "eyes"), ("ear", "ears"), ("arm", "arms"),
    ("leg", "legs"), ("nose", "noses"), ("hair", "hairs"), ("map", "maps"), ("clock", "clocks"),
    ("phone", "phones"), ("computer", "computers"), ("picture", "pictures"), ("bottle", "bottles"),
    ("box", "boxes"), ("fox", "foxes"), ("bus", "buses"), ("glass", "glasses"), ("dress", "dresses"),
    ("class", "classes"), ("kiss", "kisses"), ("watch", "watches"), ("church", "churches"),
    ("match", "matches"), ("beach", "beaches"), ("bench", "benches"), ("brush", "brushes"),
    ("dish", "dishes"), ("wish", "wishes"), ("lunch", "lunches"), ("tax", "taxes"), ("city", "cities"),
    ("baby", "babies"), ("lady", "ladies"), ("story", "stories"), ("party", "parties"),
    ("country", "countries"), ("family", "families"), ("cherry", "cherries"), ("body", "bodies"),
    ("berry", "berries"), ("army", "armies"), ("library", "libraries"), ("hobby", "hobbies"),
    ("puppy", "puppies"), ("fly", "flies"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("louse", "lice"), ("knife", "knives"), ("wife", "wives"), ("life", "lives"),
    ("leaf", "leaves"), ("wolf", "wolves"), ("half", "halves"), ("shelf", "shelves"), ("thief", "thieves"),
    ("loaf", "loaves"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("echo", "echoes"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("cactus", "cacti"),
    ("fungus", "fungi"), ("crisis", "crises"), ("analysis", "analyses"), ("phenomenon", "phenomena"),
    ("datum", "data"), ("boat", "boats"), ("coin", "coins"), ("drum", "drums"), ("fork", "forks"),
    ("gift", "gifts"), ("hole", "holes"), ("jar", "jars"), ("kite", "kites"), ("lemon", "lemons"),
    ("nail", "nails"), ("orange", "oranges"), ("pillow", "pillows"), ("rabbit", "rabbits"),
    ("sock", "socks"), ("tent", "tents"), ("violin", "violins"), ("wheel", "wheels"), ("zebra", "zebras"),
    ("banana", "bananas"), ("bridge", "bridges"), ("candle", "candles"), ("dragon", "dragons"),
    ("engine", "engines"), ("feather", "feathers"), ("guitar", "guitars"), ("helmet", "helmets"),
    ("insect", "insects"), ("jacket", "jackets"), ("kitten", "kittens"), ("ladder", "ladders"),
    ("monkey", "monkeys"), ("needle", "needles"), ("ocean", "oceans"), ("parrot", "parrots"),
    ("rocket", "rockets"), ("spider", "spiders"), ("turtle", "turtles"), ("village", "villages"),
    ("whale", "whales"), ("camel", "camels"), ("dolphin", "dolphins"), ("eagle", "eagles"),
    ("forest", "forests"), ("giraffe", "giraffes"), ("hammer", "hammers"), ("idea", "ideas"),
    ("journey", "journeys"), ("kitchen", "kitchens"), ("lesson", "lessons"), ("market", "markets"),
    ("nest", "nests"), ("owl", "owls"), ("painter", "painters"), ("question", "questions"),
    ("robot", "robots"), ("sandwich", "sandwiches"), ("ticket", "tickets"), ("uncle", "uncles"),
    ("valley", "valleys"), ("wagon", "wagons"), ("yard", "yards"), ("zoo", "zoos"),
)
# fmt: on

# fmt: off
OPPOSITES: tuple[tuple[str, str], ...] = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("old", "new"), ("open", "closed"), ("hard", "soft"), ("rich", "poor"),
    ("early", "late"), ("wet", "dry"), ("tall", "short"), ("long", "short"), ("good", "bad"),
    ("right", "wrong"), ("true", "false"), ("full", "empty"), ("heavy", "light"), ("high", "low"),
    ("thick", "thin"), ("strong", "weak"), ("young", "old"), ("clean", "dirty"), ("loud", "quiet"),
    ("near", "far"), ("first", "last"), ("left", "right"), ("day", "night"), ("black", "white"),
    ("in", "out"), ("on", "off"), ("yes", "no"), ("win", "lose"), ("push", "pull"), ("give", "take"),
    ("buy", "sell"), ("come", "go"), ("start", "finish"), ("begin", "end"), ("love", "hate"),
    ("friend", "enemy"), ("inside", "outside"), ("above", "below"), ("before", "after"),
    ("always", "never"), ("easy", "difficult"), ("cheap", "expensive"), ("safe", "dangerous"),
    ("sweet", "sour"), ("war", "peace"), ("north", "south"), ("east", "west"), ("winter", "summer"),
    ("male", "female"), ("question", "answer"), ("laugh", "cry"), ("alive", "dead"), ("smooth", "rough"),
    ("wide", "narrow"), ("deep", "shallow"), ("brave", "cowardly"), ("polite", "rude"), ("asleep", "awake"),
    ("arrive", "leave"), ("accept", "reject"), ("increase", "decrease"), ("maximum", "minimum"),
    ("success", "failure"), ("victory", "defeat"), ("import", "export"), ("positive", "negative"),
    ("major", "minor"), ("sunrise", "sunset"), ("top", "bottom"), ("front", "back"), ("more", "less"),
    ("many", "few"), ("noisy", "quiet"), ("kind", "cruel"), ("wise", "foolish"), ("ancient", "modern"),
    ("guilty", "innocent"), ("public", "private"), ("internal", "external"), ("visible", "invisible"),
    ("possible", "impossible"), ("legal", "illegal"), ("fair", "unfair"), ("able", "unable"),
    ("friendly", "unfriendly"), ("common", "rare"), ("sharp", "blunt"), ("tight", "loose"),
    ("awake", "asleep"), ("found", "lost"), ("remember", "forget"), ("borrow", "lend"),
)
# fmt: on

# fmt: off
CAPITALS: tuple[tuple[str, str], ...] = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
    ("England", "London"), ("Russia", "Moscow"), ("China", "Beijing"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Poland", "Warsaw"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Cuba", "Havana"),
    ("Thailand", "Bangkok"), ("Argentina", "Buenos Aires"), ("India", "New Delhi"), ("Turkey", "Ankara"),
    ("Finland", "Helsinki"), ("Belgium", "Brussels"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Mexico", "Mexico City"), ("Chile", "Santiago"), ("Colombia", "Bogota"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Lebanon", "Beirut"), ("Israel", "Jerusalem"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Czechia", "Prague"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"),
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Iceland", "Reykjavik"), ("Estonia", "Tallinn"),
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"),
    ("Philippines", "Manila"), ("Malaysia", "Kuala Lumpur"), ("Nigeria", "Abuja"), ("Ghana", "Accra"),
    ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Venezuela", "Caracas"), ("Afghanistan", "Kabul"),
    ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Mongolia", "Ulaanbaatar"),
    ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("South Korea", "Seoul"),
    ("North Korea", "Pyongyang"), ("Saudi Arabia", "Riyadh"), ("Qatar", "Doha"), ("Jordan", "Amman"),
    ("Libya", "Tripoli"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Sudan", "Khartoum"),
    ("Uganda", "Kampala"),
)
# fmt: on


QUESTIONS = {
    "plural": ("What is the plural of {}?", "The plural of {} is {}."),
    "opposite": ("What is the opposite of {}?", "The opposite of {} is {}."),
    "capital": ("What is the capital of {}?", "The capital of {} is {}."),
}


def _word_examples(pairs, question: str, completion: str) -> list[Example]:
    seen: set[str] = set()
    out = []
    for key, answer in pairs:
        if key in seen:  # a word listed twice would leak from train into test
            continue
        seen.add(key)
        out.append(
            Example(
                messages=({"role": "user", "content": question.format(key)},),
                answer=answer,
                completion=completion.format(key, answer),
                kind="word",
            )
        )
    return out


def _addition_examples(digits: int) -> list[Example]:
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    out = []
    for a in range(lo, hi + 1):
        for b in range(lo, hi + 1):
            out.append(
                Example(
                    messages=({"role": "user", "content": f"What is {a} + {b}?"},),
                    answer=str(a + b),
                    completion=f"{a} + {b} = {a + b}.",
                    kind="number",
                )
            )
    return out


TASKS = ("plural", "opposite", "capital", "addition")


def task_examples(name: str, *, digits: int = 1) -> list[Example]:
    """Every item of a built-in task, in a fixed order (``digits``: operand digits for ``addition``)."""
    if name in QUESTIONS:
        pairs = {"plural": PLURALS, "opposite": OPPOSITES, "capital": CAPITALS}[name]
        return _word_examples(pairs, *QUESTIONS[name])
    if name == "addition":
        if not 1 <= digits <= 3:
            raise ValueError(f"addition digits must be 1, 2 or 3, got {digits}")
        return _addition_examples(digits)
    raise ValueError(f"unknown task {name!r}; built-in tasks: {list(TASKS)} (or give a prompt file)")


def make_task(
    name: str,
    *,
    n_test: int | float = 0.25,
    seed: int = 0,
    digits: int = 1,
    max_train: int | None = None,
    context: bool = False,
) -> TaskSplit:
    """A built-in task split into train and held-out test items by a seeded shuffle.

    Args:
        name: one of :data:`TASKS`.
        n_test: test items: a count (int) or a fraction of all items (float in (0, 1)).
        seed: the shuffle seed (the same seed always gives the same split).
        digits: operand digits for ``addition``.
        max_train: keep at most this many training items (``None``: all the rest).
        context: attach the reference completion as privileged ``context`` (self-distillation).
    """
    items = task_examples(name, digits=digits)
    random.Random(seed).shuffle(items)
    if isinstance(n_test, float):
        if not 0.0 < n_test < 1.0:
            raise ValueError(f"a fractional n_test must lie in (0, 1), got {n_test}")
        n_test = max(1, round(n_test * len(items)))
    if not 1 <= n_test < len(items):
        raise ValueError(f"n_test must leave at least one training item (task has {len(items)} items)")
    test, train = items[:n_test], items[n_test:]
    if max_train is not None:
        train = train[:max_train]
    if context:
        train = [_with_context(e) for e in train]
        test = [_with_context(e) for e in test]
    return TaskSplit(name=name, train=train, test=test)


def vocabulary_words(tokenizer, *, min_len: int = 4, max_len: int = 10) -> list[str]:
    """Lower-case words that are single tokens of a byte-level BPE vocabulary (``"Ġword"``), sorted.

    Words ending in ``s``, ``ed`` or ``ing`` are dropped (mostly plurals and verb forms); some entries
    are word fragments, which is harmless for prompts whose answers come from the teacher.
    """
    pattern = re.compile(rf"[a-z]{{{min_len},{max_len}}}")
    words = set()
    for token in tokenizer.get_vocab():
        if token.startswith("Ġ") and pattern.fullmatch(token[1:]) and not token.endswith(("s", "ed", "ing")):
            words.add(token[1:])
    return sorted(words)


def unlabeled_prompts(name: str, words: list[str], n: int, *, seed: int = 0, exclude=()) -> list[Example]:
    """``n`` extra training prompts of task ``name`` built from ``words``, without answers.

    Distillation needs prompts, not labels (the teacher supplies the targets), so a task's few labelled
    items can be complemented by many unlabelled ones; the student then has to learn the behaviour (e.g.
    copying the word into the answer) instead of memorising the labelled items. Prompts whose text is in
    ``exclude`` (e.g. the held-out test prompts) are skipped.
    """
    if name not in QUESTIONS:
        raise ValueError(f"unlabelled prompts exist for the word tasks {sorted(QUESTIONS)}, not {name!r}")
    skip = set(exclude)
    pool = [w for w in words if QUESTIONS[name][0].format(w) not in skip]
    random.Random(seed).shuffle(pool)
    if n > len(pool):
        raise ValueError(f"asked for {n} unlabelled prompts but only {len(pool)} words are available")
    return [Example(({"role": "user", "content": QUESTIONS[name][0].format(w)},)) for w in pool[:n]]


def _with_context(e: Example) -> Example:
    return Example(e.messages, e.answer, e.completion, e.completion, e.kind)


# ---------------------------------------------------------------------------------------------------
# Prompt files
# ---------------------------------------------------------------------------------------------------


def load_prompt_file(path: str | Path, *, kind: str = "word") -> list[Example]:
    """Read users' prompts from a ``.jsonl`` file (fields in the module docstring) or a plain text file
    (one prompt per line). ``kind`` is the answer extraction rule for examples with an ``answer``
    (a JSON line may override it with its own ``kind`` field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    examples = []
    if path.suffix == ".jsonl":
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            examples.append(_example_from_row(row, f"{path}:{lineno}", kind))
    else:
        for line in path.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            examples.append(Example(({"role": "user", "content": line.strip().replace("\\n", "\n")},)))
    if not examples:
        raise ValueError(f"prompt file {path} holds no prompts")
    return examples


def _example_from_row(row: dict, where: str, kind: str) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object")
    unknown = set(row) - {"prompt", "messages", "system", "answer", "context", "completion", "kind"}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}")
    if "messages" in row:
        messages = tuple({"role": str(m["role"]), "content": str(m["content"])} for m in row["messages"])
    elif "prompt" in row:
        messages = ({"role": "user", "content": str(row["prompt"])},)
    else:
        raise ValueError(f"{where}: needs a 'prompt' or a 'messages' field")
    if row.get("system") is not None:
        messages = ({"role": "system", "content": str(row["system"])}, *messages)
    optional = {k: (None if row.get(k) is None else str(row[k])) for k in ("answer", "completion", "context")}
    try:
        return Example(messages, kind=str(row.get("kind", kind)), **optional)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def split_examples(examples: list[Example], n_test: int | float, seed: int = 0) -> TaskSplit:
    """Split a user's examples (e.g. from a prompt file) into train and held-out test by a seeded
    shuffle; ``n_test`` is a count or a fraction, 0 for no test set."""
    items = list(examples)
    random.Random(seed).shuffle(items)
    if isinstance(n_test, float):
        n_test = round(n_test * len(items))
    if not 0 <= n_test < len(items):
        raise ValueError(f"n_test={n_test} must leave at least one of {len(items)} examples for training")
    return TaskSplit(name="prompt_file", train=items[n_test:], test=items[:n_test])
