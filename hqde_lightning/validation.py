"""Argument checks shared by the whole package (plain Python: no Ray, no Lightning, no torch).

Every check returns the value it accepted (converted: ``int``, ``float``, ``dict``) and raises
an :class:`ArgumentError` naming the parameter, what it must be and what it got:

* a value of the wrong type raises :class:`ArgumentTypeError`, a ``TypeError``;
* a value of the right type outside its range or set of choices raises :class:`ArgumentError`,
  a ``ValueError``.

``ArgumentTypeError`` is a ``ValueError`` too, so callers that catch ``ValueError`` for any bad
argument keep working. Both carry the parameter's ``name`` and the ``value`` that was refused,
so the Lightning boundary (:func:`hqde_lightning.misconfiguration.lightning_arguments`) can name
the call that was wrong.

Registries (name -> class, as for aggregators, topologies and combiners) use :func:`registry`
and :func:`resolve`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "check_bool",
    "check_choice",
    "check_int",
    "check_mapping",
    "check_number",
    "check_optional",
    "registry",
    "resolve",
]

T = TypeVar("T")


class ArgumentError(ValueError):
    """A bad argument value: ``name`` is the parameter, ``value`` what it got, ``requirement`` what it must be."""

    #: how the message reads (``str.format`` fields: ``name``, ``value``, ``requirement``)
    template = "`{name}` must be {requirement}, got {value!r}"

    def __init__(self, name: str, value: Any, requirement: str, template: str | None = None) -> None:
        self.name = name
        self.value = value
        self.requirement = requirement
        self.template = template or type(self).template
        super().__init__(self.template.format(name=name, value=value, requirement=requirement))

    def or_none(self) -> ArgumentError:
        """The same error for a parameter that also accepts ``None``."""
        return type(self)(self.name, self.value, f"{self.requirement} or None", self.template)

    def in_call(self, owner: str) -> str:
        """The message said of the call ``owner(name=value)``, e.g. "`QuantumNoise(scale=-1.0)`: `scale` must be ..."."""
        if not self.name.isidentifier():  # e.g. "resources_per_member['num_cpus']"
            return f"{owner}: {self}"
        call = f"`{owner}({self.name}={self.value!r})`"
        head = "`{name}={value!r}`"
        if self.template.startswith(head):
            return call + self.template[len(head) :].format(name=self.name, value=self.value, requirement=self.requirement)
        return f"{call}: {self}"

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.name, self.value, self.requirement, self.template)


class ArgumentTypeError(ArgumentError, TypeError):
    """A bad argument type (a ``TypeError``, and a ``ValueError`` like every :class:`ArgumentError`)."""


def _bounds(low: float | None, high: float | None, open_low: bool, open_high: bool) -> str:
    """``"in [0, 1)"``, ``">= 1"``, ``"< 0.5"`` or ``""`` for the given bounds."""
    if low is not None and high is not None:
        return f"in {'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
    if low is not None:
        return f"{'>' if open_low else '>='} {low:g}"
    if high is not None:
        return f"{'<' if open_high else '<='} {high:g}"
    return ""


def _in_bounds(value: float, low: float | None, high: float | None, open_low: bool, open_high: bool) -> bool:
    above = low is None or (value > low if open_low else value >= low)
    below = high is None or (value < high if open_high else value <= high)
    return above and below


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(name, value, "True or False")
    return value


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` when it is an integer (numpy integers too, not a bool) in ``[low, high]``."""
    bounds = _bounds(low, high, False, False)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(name, value, f"an integer {bounds}".strip())
    if not _in_bounds(value, low, high, False, False):
        raise ArgumentError(name, value, bounds)
    return int(value)


def check_number(
    value: Any,
    name: str,
    low: float | None = None,
    high: float | None = None,
    *,
    open_low: bool = False,
    open_high: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a ``float`` when it is a real number (not a bool, never NaN) within the bounds.

    Args:
        value: the argument.
        name: the parameter's name, for the message.
        low, high: the bounds (``None``: unbounded on that side).
        open_low, open_high: whether the bound itself is excluded.
        finite: whether ``±inf`` is refused (it always is when both bounds are given).
    """
    bounds = _bounds(low, high, open_low, open_high)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(name, value, f"{'a finite number' if finite else 'a number'} {bounds}".strip())
    number = float(value)
    if math.isnan(number) or (finite and math.isinf(number)) or not _in_bounds(number, low, high, open_low, open_high):
        bounded = low is not None and high is not None
        raise ArgumentError(name, value, bounds if bounded else " and ".join(p for p in ("finite" if finite else "a number", bounds) if p))
    return number


def check_choice(value: Any, name: str, allowed: Sequence[T]) -> T:
    """``value`` when it is one of ``allowed`` and of the same kind (an integer for integer choices, not 8.0 or True)."""
    if isinstance(value, bool) or not any(isinstance(value, numbers.Integral if isinstance(a, int) else type(a)) and value == a for a in allowed):
        raise ArgumentError(name, value, f"one of {list(allowed)}", "`{name}`: {value!r} is not known; choose {requirement}")
    return value


def check_optional(check: Callable[..., T], value: Any, name: str, *args: Any, **kwargs: Any) -> T | None:
    """``None`` for ``None``, else ``check(value, name, *args, **kwargs)`` (whose message then adds "or None")."""
    if value is None:
        return None
    try:
        return check(value, name, *args, **kwargs)
    except ArgumentError as err:
        raise err.or_none() from None


def check_mapping(value: Any, name: str, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``value`` as a ``dict`` (``None`` gives ``{}``) when it is a mapping whose keys are among ``keys``."""
    allowed = None if keys is None else list(keys)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(name, value, "a dict" + ("" if allowed is None else f" with keys among {allowed}") + " or None")
    unknown = [] if allowed is None else sorted(str(key) for key in value if key not in allowed)
    if unknown:
        listed = str(unknown).replace("{", "{{").replace("}", "}}")
        raise ArgumentError(name, value, f"{allowed}", f"`{{name}}` has unknown keys {listed}; allowed keys are {{requirement}}")
    return dict(value)


def registry(*classes: type[T]) -> dict[str, type[T]]:
    """``{cls.name: cls}`` for classes that carry a ``name`` class attribute."""
    return {cls.name: cls for cls in classes}  # type: ignore[attr-defined]


def resolve(value: str | T, name: str, base: type[T], names: Mapping[str, Callable[[], T]]) -> T:
    """An instance of ``base``: ``value`` itself, or ``names[value]()`` for a registered name.

    Raises:
        ArgumentError: for a name that is not registered (the message lists the names).
        ArgumentTypeError: for anything that is neither a name nor a ``base`` instance.
    """
    if isinstance(value, base):
        return value
    choices = f"one of {sorted(names)} or an instance of `{base.__name__}`"
    if not isinstance(value, str):
        raise ArgumentTypeError(name, value, choices, "`{name}={value!r}` is neither a name nor an instance; choose {requirement}")
    if value not in names:
        raise ArgumentError(name, value, choices, "`{name}={value!r}` is not known; choose {requirement}")
    return names[value]()
