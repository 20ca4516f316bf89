"""Classifier heads on embeddings: a registry of scikit-learn estimators.

  logreg  standardise + multinomial logistic regression (heads.logreg)
  dense   a Keras MLP head (heads.dense)
  knn     cosine k nearest neighbours (heads.knn)

A head is a module holding `HEAD = <an EmbeddingHead subclass>`; the class
carries everything embedstore asks of a head: its CLI options, whether it
calibrates, its export layer, its training history (see heads.base). Adding
one is its module and one line in _MODULES. Importing this package is cheap:
a head's module (and scikit-learn) loads when the head is first asked for.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from embedstore.heads.options import HeadOption

if TYPE_CHECKING:
    from embedstore.heads.base import EmbeddingHead

# name -> module holding HEAD; the order is the order help and a sweep list them in
_MODULES = {
    "logreg": "embedstore.heads.logreg",
    "dense": "embedstore.heads.dense",
    "knn": "embedstore.heads.knn",
}


class _Registry(Mapping[str, "type[EmbeddingHead]"]):
    """name -> head class; a head's module is imported when its class is first asked for."""

    def __getitem__(self, name: str) -> type[EmbeddingHead]:
        if name not in _MODULES:
            raise KeyError(name)
        from embedstore.heads.base import EmbeddingHead

        head = getattr(importlib.import_module(_MODULES[name]), "HEAD", None)
        if not (isinstance(head, type) and issubclass(head, EmbeddingHead)):
            raise TypeError(f"head {name!r}: module {_MODULES[name]} needs "
                            "HEAD = <an EmbeddingHead subclass>")
        return head

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


HEADS: Mapping[str, type[EmbeddingHead]] = _Registry()


def make_head(kind: str, **params: Any) -> EmbeddingHead:
    """A head by registry name, with hyper-parameters (validated when it is fit)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEADS)}")
    return HEADS[kind](**params)


def validate_head_params(kind: str, params: dict) -> None:
    """Raise scikit-learn's InvalidParameterError (a ValueError naming the parameter)
    for values fit would refuse, without fitting."""
    make_head(kind, **params).check_params()


def head_kind(head: EmbeddingHead) -> str:
    """The registry name of a head object: its own class's (a registered head may subclass
    another), else the nearest registered base class's."""
    for name, cls in HEADS.items():
        if type(head) is cls:
            return name
    for name, cls in HEADS.items():
        if isinstance(head, cls):
            return name
    raise ValueError(f"{type(head).__name__} is not a registered head ({', '.join(HEADS)})")


def head_options() -> dict[str, HeadOption]:
    """flag -> option, over every head, in registry order; heads share an option (e.g.
    --class-weight) by listing the same HeadOption."""
    found: dict[str, HeadOption] = {}
    owner: dict[str, str] = {}
    for name, cls in HEADS.items():
        for option in cls.options:
            if found.setdefault(option.flag, option) != option:
                raise ValueError(f"heads {owner[option.flag]} and {name} define {option.flag} "
                                 "differently; share one HeadOption")
            owner.setdefault(option.flag, name)
    return found


def heads_taking(param: str) -> dict[str, Any]:
    """head name -> its constructor's default, for every head with this parameter."""
    out = {}
    for name, cls in HEADS.items():
        p = inspect.signature(cls.__init__).parameters.get(param)
        if p is not None:
            out[name] = p.default
    return out


def param_choices(param: str) -> list[str]:
    """The strings a hyper-parameter allows, for heads whose constraint on it is only
    strings (e.g. weights: uniform, distance); [] otherwise."""
    return sorted(set().union(*(cls.string_choices(param) for cls in HEADS.values())))
