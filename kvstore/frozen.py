"""Frozen, slotted dataclasses with a cheaper `__init__`, for the values made on every write.

A frozen dataclass's generated `__init__` sets each field through `object.__setattr__` (its
own `__setattr__` refuses), several times the cost of a plain attribute store. The values
made once or more per write on every node (messages, entries, commands, write results,
history events) paid for it: frozen dataclass `__init__`s were a fifth of a follower's CPU
at 256 writers (py-spy, bench/README.md). `quick_init` replaces the generated `__init__`
with one that stores each field through its slot's descriptor, the store `object.__setattr__`
ends in, at about half the cost. Everything else stays as `@dataclass` made it: the instance
is frozen (assignment raises FrozenInstanceError), and equality, hashing, repr, match args,
`__post_init__` (called last, as before) and `dataclasses.replace` are unchanged.

Only what these classes use is supported: frozen, slotted, positional-or-keyword fields with
plain defaults (no `default_factory`, `kw_only`, `init=False` or `InitVar`); anything else
raises TypeError when the class is defined, so a later change cannot silently lose a field.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, TypeVar

_Class = TypeVar("_Class", bound=type)


def quick_init(cls: _Class) -> _Class:
    """Give the frozen, slotted dataclass `cls` the cheaper `__init__` (module docstring)."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__}: quick_init needs a frozen, slotted dataclass")
    namespace: dict[str, Any] = {}
    parameters: list[str] = []
    body: list[str] = []
    fields = dataclasses.fields(cls)
    # The generated __init__ must take exactly the fields, in order, as plain parameters:
    # anything else (init=False, kw_only, InitVar) would be lost by the replacement.
    generated = list(inspect.signature(cls.__dict__["__init__"]).parameters.values())[1:]
    if [p.name for p in generated] != [f.name for f in fields] or any(
        p.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD for p in generated
    ):
        raise TypeError(f"{cls.__name__}: quick_init supports plain fields only")
    for field in fields:
        name = field.name
        if field.default_factory is not dataclasses.MISSING:
            raise TypeError(f"{cls.__name__}.{name}: quick_init supports plain defaults only")
        namespace[f"_set_{name}"] = cls.__dict__[name].__set__
        if field.default is dataclasses.MISSING:
            parameters.append(name)
        else:
            namespace[f"_default_{name}"] = field.default
            parameters.append(f"{name}=_default_{name}")
        body.append(f"    _set_{name}(self, {name})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    source = f"def __init__(self, {', '.join(parameters)}):\n" + "\n".join(body or ["    pass"])
    exec(source, namespace)  # the source is built from the class's own field names only
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    cls.__init__ = init  # type: ignore[misc]
    return cls
