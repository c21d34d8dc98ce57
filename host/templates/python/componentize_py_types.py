"""A stand-in for the module componentize-py provides inside the component.

The bindings in this folder (from `componentize-py bindings`) import it; this copy
lets editors, type checkers and native unit tests import them too. A failed host
call raises `Err(error)`, e.g. `Err(kv.Error_Denied(...))`.
"""

from dataclasses import dataclass
from typing import Generic, TypeVar, Union

S = TypeVar("S")
T = TypeVar("T")
E = TypeVar("E")


@dataclass
class Some(Generic[S]):
    value: S


@dataclass
class Ok(Generic[T]):
    value: T


@dataclass(frozen=True)
class Err(Generic[E], Exception):
    value: E


Result = Union[Ok[T], Err[E]]
