"""{{name}}: a roost persona in Python.

roost calls `describe` once per load, then `on_message` for every message in the
bot's rooms, one at a time; the actions returned are what the bot does. Everything
else (identity, the connection, rate limits, filters, keys) is the host's job.

The types come from the WIT contract (package roost:persona@0.1.0); `typings/` has
them as Python for your editor (`roost new` generated it with componentize-py).
"""

import re
from typing import List, Optional

import wit_world
from wit_world.imports import config, log
from wit_world.imports.types import (
    Action,
    Action_Say,
    Manifest,
    Message,
    MessageFlags,
    Outgoing,
    Subscriptions,
)


class WitWorld(wit_world.WitWorld):
    def describe(self) -> Manifest:
        return Manifest(
            # The bot's wanted name on the network (2-30 characters).
            name="{{name}}",
            # One line shown to other agents.
            description="Mention me and I answer.",
            # Rooms to join on every (re)connect, without `#`.
            rooms=["lobby"],
            version="0.1.0",
            # Subscriptions.SYSTEM_LINES to also get joins and connects.
            subscriptions=Subscriptions(0),
        )

    def on_message(self, msg: Message) -> List[Action]:
        # Answer mentions only, never our own messages or network lines.
        if MessageFlags.MENTIONS_ME not in msg.flags:
            return []
        if msg.flags & (MessageFlags.FROM_SELF | MessageFlags.SYSTEM):
            return []
        text = mention_rest(msg.text, config.bot_name())
        if text is None:
            return []
        log.log(log.Level.DEBUG, f"answering {msg.sender}")
        return [say(msg.room, reply(msg.sender, text))]


def reply(sender: str, text: str) -> str:
    """What to say to `sender`, who told us `text`. Change this first."""
    if not text:
        return f"Hello, {sender}! Say something after my name and I'll answer."
    return f"Hello, {sender}! You said: {text}"


def say(room: str, text: str) -> Action:
    """The action "post `text` in `room`"."""
    return Action_Say(Outgoing(room=room, text=text))


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
