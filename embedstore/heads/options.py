"""How a head's hyper-parameters are spelled on the command line.

A head lists its `HeadOption`s; the CLI builds `train`'s and `sweep`'s flags
from them (sweep takes a comma list of values). Nothing here imports
scikit-learn, so option specs can be read as cheaply as the head module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def show_value(value: Any) -> str:
    """A default as help shows it: None as 'none'."""
    return "none" if value is None else str(value)


@dataclass(frozen=True)
class HeadOption:
    """One hyper-parameter as a flag: `--flag VALUE` sets the head's `param`."""

    flag: str  # e.g. "--max-iter"
    param: str  # the constructor parameter it sets, e.g. "max_iter"
    metavar: str  # e.g. "INTEGER"
    help: str  # what it is; the CLI adds which heads take it and their defaults
    parse: Callable[[str], Any] = str  # text -> value; ValueError when unreadable
    show: Callable[[Any], str] = show_value  # value -> text, for defaults in help


def float_or_auto(text: str) -> float | str:
    return text if text == "auto" else float(text)


def int_or_auto(text: str) -> int | str:
    return text if text == "auto" else int(text)


def none_or_text(text: str) -> str | None:
    return None if text == "none" else text


def sizes(text: str) -> tuple[int, ...]:
    """"256" -> (256,); "512x128" -> (512, 128); "0" or "none" -> ()."""
    if text.lower() in ("", "0", "none"):
        return ()
    return tuple(int(t) for t in text.lower().split("x"))


def show_sizes(value: Any) -> str:
    return "x".join(str(s) for s in value) if value else "0"


def on_off_auto(text: str) -> bool | str:
    if text.lower() == "auto":
        return "auto"
    if text.lower() in ("on", "true", "yes", "1"):
        return True
    if text.lower() in ("off", "false", "no", "0"):
        return False
    raise ValueError(text)


def show_on_off(value: Any) -> str:
    return value if isinstance(value, str) else ("on" if value else "off")


CLASS_WEIGHT = HeadOption("--class-weight", "class_weight", "balanced|none",
                          "'balanced' or 'none'", none_or_text)
