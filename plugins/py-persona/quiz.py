"""The quiz master's rules, as plain Python: no host calls, so they run (and are
tested, `python3 -m unittest` in this folder) natively.

Everything the persona remembers goes through a `Store` (kv when granted, memory
otherwise), and everything it knows about the room's recent past comes in as plain
`(sender, text, from_self)` tuples, so these functions never see a host type.
"""

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

# (question, accepted answers). Answers are compared after `normalise`.
QUESTIONS: List[Tuple[str, List[str]]] = [
    ("What is the capital of France?", ["paris"]),
    ("How many bits are in a byte?", ["8", "eight"]),
    ("Which planet is known as the Red Planet?", ["mars"]),
    ("What is 7 times 6?", ["42", "forty-two", "forty two"]),
    ("What is the chemical symbol for gold?", ["au"]),
    ("How many sides does a hexagon have?", ["6", "six"]),
    ("What is the largest ocean on Earth?", ["pacific", "pacific ocean"]),
    ("Who wrote 'Pride and Prejudice'?", ["jane austen", "austen"]),
    ("At how many degrees Celsius does water boil at sea level?", ["100", "one hundred"]),
    ("In what year did people first walk on the Moon?", ["1969"]),
    ("Which language is this quiz master written in?", ["python"]),
    ("What does the 'Wasm' in WebAssembly's nickname stand for, in full?", ["webassembly"]),
]

QUESTION_MARK = "❓"
HELP = (
    "I'm the quiz master. Mention me with `quiz` for a question, answer with "
    "`@{me} ANSWER`; `scores` shows the table, `recap` the last round, `skip` "
    "reveals the answer."
)


class Store(Protocol):
    """Where the quiz keeps its state: `get`/`set` text values, `keys` by prefix."""

    def get(self, key: str) -> Optional[str]: ...

    def set(self, key: str, value: str) -> None: ...

    def delete(self, key: str) -> None: ...

    def keys(self, prefix: str) -> List[str]: ...


class MemoryStore:
    """A `Store` in memory (for tests, and when `kv` is not granted)."""

    def __init__(self) -> None:
        self.data: Dict[str, str] = {}

    def get(self, key: str) -> Optional[str]:
        return self.data.get(key)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def keys(self, prefix: str) -> List[str]:
        return sorted(k for k in self.data if k.startswith(prefix))


def normalise(text: str) -> str:
    """Lowercase words without punctuation or a leading article: `The Pacific!` ->
    `pacific`."""
    words = re.findall(r"[\w'-]+", text.lower())
    words = [w.strip("'-") for w in words]
    words = [w for w in words if w]
    while words and words[0] in ("the", "a", "an", "it's", "its", "is"):
        words = words[1:]
    return " ".join(words)


def is_correct(question: int, answer: str, loose: bool) -> bool:
    """Whether `answer` answers question `question`. Loose: the accepted answer may
    appear anywhere in it (`I think it's Paris`); strict: it must be all of it."""
    said = normalise(answer)
    if not said:
        return False
    for accepted in QUESTIONS[question][1]:
        if said == accepted:
            return True
        if loose and re.search(rf"(?<![\w-]){re.escape(accepted)}(?![\w-])", said):
            return True
    return False


def mention_rest(text: str, name: str) -> Optional[str]:
    """The text after a mention of `name`: `name: rest` (or `name, rest`, `name rest`)
    at the start, or `@name` anywhere; None when `text` does not mention `name`."""
    n = re.escape(name)
    m = re.match(rf"\s*{n}(?=[:,\s]|$)[:,]?(.*)", text, re.IGNORECASE | re.DOTALL)
    if m:
        return m.group(1).strip()
    m = re.search(rf"(?<![\w@])@{n}(?![\w-])[:,]?", text, re.IGNORECASE)
    if m is None:
        return None
    return f"{text[:m.start()].strip()} {text[m.end():].strip()}".strip()


def question_line(index: int, me: str) -> str:
    return (
        f"{QUESTION_MARK} Question {index + 1}/{len(QUESTIONS)}: {QUESTIONS[index][0]} "
        f"(answer with @{me} ANSWER)"
    )


def parse_question_line(text: str) -> Optional[int]:
    """The question index of a line `question_line` wrote, if it is one."""
    m = re.match(rf"{QUESTION_MARK} Question (\d+)/\d+:", text)
    if not m:
        return None
    index = int(m.group(1)) - 1
    return index if 0 <= index < len(QUESTIONS) else None


@dataclass
class Round:
    """The open question of one room."""

    question: int
    tries: List[Tuple[str, str]] = field(default_factory=list)

    def dump(self) -> str:
        return json.dumps({"q": self.question, "tries": self.tries})

    @staticmethod
    def load(text: Optional[str]) -> Optional["Round"]:
        if not text:
            return None
        try:
            v = json.loads(text)
            q = int(v["q"])
            tries = [(str(s), str(a)) for s, a in v.get("tries", [])]
        except (ValueError, KeyError, TypeError):
            return None
        return Round(q, tries) if 0 <= q < len(QUESTIONS) else None


class Quiz:
    """The quiz master's decisions for one message, over a `Store`."""

    MAX_TRIES_KEPT = 20

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- state ---------------------------------------------------------------

    def open_round(self, room: str) -> Optional[Round]:
        return Round.load(self.store.get(f"open/{room}"))

    def save_round(self, room: str, rnd: Round) -> None:
        rnd.tries = rnd.tries[-self.MAX_TRIES_KEPT :]
        self.store.set(f"open/{room}", rnd.dump())

    def close_round(self, room: str, rnd: Round, winner: Optional[str]) -> None:
        self.store.delete(f"open/{room}")
        last = {"q": rnd.question, "tries": rnd.tries, "winner": winner}
        self.store.set(f"last/{room}", json.dumps(last))

    def score(self, agent: str) -> int:
        try:
            return int(self.store.get(f"score/{agent.lower()}") or 0)
        except ValueError:
            return 0

    def add_point(self, agent: str) -> int:
        points = self.score(agent) + 1
        self.store.set(f"score/{agent.lower()}", str(points))
        return points

    def next_question(self) -> int:
        try:
            index = int(self.store.get("next") or 0) % len(QUESTIONS)
        except ValueError:
            index = 0
        self.store.set("next", str((index + 1) % len(QUESTIONS)))
        return index

    # -- commands ------------------------------------------------------------

    def ask(self, room: str, me: str) -> str:
        rnd = self.open_round(room)
        if rnd is not None:
            return f"Still open: {question_line(rnd.question, me)}"
        rnd = Round(self.next_question())
        self.save_round(room, rnd)
        return question_line(rnd.question, me)

    def answer(self, room: str, sender: str, text: str, mentioned: bool) -> Optional[str]:
        """A reply to an attempt at the open question; None to stay quiet (no open
        question, or a wrong answer that did not mention us)."""
        rnd = self.open_round(room)
        if rnd is None:
            return None
        correct = is_correct(rnd.question, text, loose=mentioned)
        if not correct and not mentioned:
            return None
        rnd.tries.append((sender, text.strip()[:80]))
        if correct:
            self.close_round(room, rnd, sender)
            points = self.add_point(sender)
            answer = QUESTIONS[rnd.question][1][0]
            plural = "point" if points == 1 else "points"
            return f"✅ {sender} got it: {answer}! {sender} has {points} {plural}."
        self.save_round(room, rnd)
        n = len(rnd.tries)
        return f"Not quite, {sender}. ({n} {'try' if n == 1 else 'tries'} so far)"

    def skip(self, room: str) -> str:
        rnd = self.open_round(room)
        if rnd is None:
            return "No question is open. Mention me with `quiz` for one."
        self.close_round(room, rnd, None)
        return f"The answer was: {QUESTIONS[rnd.question][1][0]}."

    def scores(self, limit: int = 5) -> str:
        table = []
        for key in self.store.keys("score/"):
            table.append((self.score(key[len("score/") :]), key[len("score/") :]))
        if not table:
            return "No scores yet. Mention me with `quiz` to play."
        table.sort(key=lambda t: (-t[0], t[1]))
        top = ", ".join(f"{name} {points}" for points, name in table[:limit])
        return f"🏆 Scores: {top}"

    def recap_from_memory(self, room: str) -> str:
        """The last round of `room` from the store."""
        rnd = self.open_round(room)
        if rnd is not None:
            return recap_line(rnd.question, rnd.tries, None, still_open=True)
        raw = self.store.get(f"last/{room}")
        if not raw:
            return "No round played here yet. Mention me with `quiz` for one."
        v = json.loads(raw)
        tries = [(str(s), str(a)) for s, a in v.get("tries", [])]
        return recap_line(int(v["q"]), tries, v.get("winner"), still_open=False)


def recap_from_history(
    messages: Sequence[Tuple[str, str, bool]], me: str
) -> Optional[str]:
    """The last round as the room's history shows it: the last question this bot
    asked (`from_self`, or sent under its name) and the attempts after it that
    mentioned the bot. None if the history holds no question."""
    start = None
    for i in range(len(messages) - 1, -1, -1):
        sender, text, from_self = messages[i]
        if (from_self or sender.lower() == me.lower()) and parse_question_line(text) is not None:
            start = i
            break
    if start is None:
        return None
    question = parse_question_line(messages[start][1])
    assert question is not None
    tries: List[Tuple[str, str]] = []
    winner = None
    for sender, text, from_self in messages[start + 1 :]:
        if from_self or sender.lower() == me.lower():
            m = re.match(r"✅ (.+?) got it:", text)
            if m:
                winner = m.group(1)
            continue
        rest = mention_rest(text, me)
        if rest and command_of(rest) is None:
            tries.append((sender, rest[:80]))
    return recap_line(question, tries, winner, still_open=winner is None)


def recap_line(
    question: int, tries: List[Tuple[str, str]], winner: Optional[str], still_open: bool
) -> str:
    q = QUESTIONS[question][0]
    said = "; ".join(f"{s}: {a}" for s, a in tries[-5:]) or "none yet"
    if winner:
        end = f" {winner} won."
    elif still_open:
        end = " Still open."
    else:
        end = f" Nobody got it: {QUESTIONS[question][1][0]}."
    return f"Last question: {q} Answers: {said}.{end}"


COMMANDS = {
    "quiz": "ask",
    "question": "ask",
    "q": "ask",
    "scores": "scores",
    "score": "scores",
    "leaderboard": "scores",
    "recap": "recap",
    "last": "recap",
    "skip": "skip",
    "reveal": "skip",
    "help": "help",
}


def command_of(rest: str) -> Optional[str]:
    """The command a mention asks for (`quiz`, `scores`, ...), by its first word;
    `help` for an empty mention; None for anything else (an answer)."""
    words = rest.split()
    if not words:
        return "help"
    return COMMANDS.get(words[0].lower().strip("!?.,:"))
