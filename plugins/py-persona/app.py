"""quizmaster: the Python example persona.

Mention it with `quiz` and it asks a question in the room; answer with
`@quizmaster ANSWER` (a correct answer counts even without the mention). It keeps
each agent's score in `kv`, shows the table with `scores`, and `recap` tells the
last round from the room's `history`. Without those grants it keeps going: scores
and rounds live in memory (until the instance is replaced) and the recap comes
from what it remembers itself; each fallback is logged once.

The rules are in `quiz.py` (plain Python, tested natively); this module is the glue
to the host: the `WitWorld` class componentize-py exports, and the capability calls.
"""

from __future__ import annotations

from typing import List, Optional, Set

import wit_world
from componentize_py_types import Err
from wit_world.imports import config, history, kv, log
from wit_world.imports.types import (
    Action,
    Action_Say,
    Manifest,
    Message,
    MessageFlags,
    Outgoing,
    Subscriptions,
)

import quiz

NAME = "quizmaster"
VERSION = "0.1.0"

_warned: Set[str] = set()


def warn_once(what: str, text: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.log(log.Level.WARN, text)


def denied_key(error: object) -> Optional[str]:
    """The roost.toml key that would grant the capability, if `error` is a denial."""
    if isinstance(error, (kv.Error_Denied, history.Error_Denied)):
        return error.value.config_key
    return None


class KvStore:
    """`quiz.Store` over the `kv` capability, falling back to memory for good once a
    call is denied or fails (so the quiz keeps working either way)."""

    def __init__(self) -> None:
        self.memory = quiz.MemoryStore()
        self.use_kv = True

    def _fail(self, e: Err[object]) -> None:
        key = denied_key(e.value)
        if key is not None:
            warn_once("kv", f"kv is not granted ({key}): keeping scores in memory")
        else:
            warn_once("kv", f"kv failed ({e.value!r}): keeping scores in memory")
        self.use_kv = False

    def get(self, key: str) -> Optional[str]:
        if self.use_kv:
            try:
                value = kv.get(key)
                return None if value is None else value.decode("utf-8", "replace")
            except Err as e:
                self._fail(e)
        return self.memory.get(key)

    def set(self, key: str, value: str) -> None:
        if self.use_kv:
            try:
                kv.set(key, value.encode("utf-8"))
                return
            except Err as e:
                self._fail(e)
        self.memory.set(key, value)

    def delete(self, key: str) -> None:
        if self.use_kv:
            try:
                kv.delete(key)
                return
            except Err as e:
                self._fail(e)
        self.memory.delete(key)

    def keys(self, prefix: str) -> List[str]:
        if self.use_kv:
            try:
                return kv.list(prefix)
            except Err as e:
                self._fail(e)
        return self.memory.keys(prefix)


QUIZ = quiz.Quiz(KvStore())


def recap(room: str, me: str) -> str:
    """The last round, from the room's history when granted, else from memory."""
    try:
        recent = history.recent(room, 50)
    except Err as e:
        key = denied_key(e.value)
        if key is not None:
            warn_once("history", f"history is not granted ({key}): recaps come from memory")
        return QUIZ.recap_from_memory(room)
    seen = [(m.sender, m.text, MessageFlags.FROM_SELF in m.flags) for m in recent]
    return quiz.recap_from_history(seen, me) or QUIZ.recap_from_memory(room)


def say(room: str, text: str) -> Action:
    return Action_Say(Outgoing(room=room, text=text))


class WitWorld(wit_world.WitWorld):
    def describe(self) -> Manifest:
        return Manifest(
            name=NAME,
            description="Quiz master: mention me with `quiz` for a question; keeps scores.",
            rooms=["lobby"],
            version=VERSION,
            subscriptions=Subscriptions(0),
        )

    def on_message(self, msg: Message) -> List[Action]:
        if msg.flags & (MessageFlags.FROM_SELF | MessageFlags.SYSTEM):
            return []
        me = config.bot_name()
        if msg.sender.lower() == me.lower():
            return []
        rest = quiz.mention_rest(msg.text, me)
        if rest is None:
            # Not for us, unless it is the right answer to the open question.
            reply = QUIZ.answer(msg.room, msg.sender, msg.text, mentioned=False)
            return [say(msg.room, reply)] if reply else []
        command = quiz.command_of(rest)
        if command == "ask":
            reply = QUIZ.ask(msg.room, me)
        elif command == "scores":
            reply = QUIZ.scores()
        elif command == "recap":
            reply = recap(msg.room, me)
        elif command == "skip":
            reply = QUIZ.skip(msg.room)
        elif command == "help":
            reply = quiz.HELP.format(me=me)
        else:
            answered = QUIZ.answer(msg.room, msg.sender, rest, mentioned=True)
            reply = answered or "No question is open. Mention me with `quiz` for one."
        log.log(log.Level.DEBUG, f"{command or 'answer'} from {msg.sender} in #{msg.room}")
        return [say(msg.room, reply)]
