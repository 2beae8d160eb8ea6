"""Bad arguments at the Lightning boundary (``HQDEStrategy`` and the callbacks).

The plain modules raise ``ValueError``/``TypeError`` (see :mod:`hqde_lightning.validation`);
what a user passes to ``HQDEStrategy(...)`` or a callback, checked at construction or at
``setup``, is reported as Lightning reports a misconfiguration: :class:`InvalidArgument`, a
``MisconfigurationException`` that is also a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from lightning.pytorch.utilities.exceptions import MisconfigurationException

from hqde_lightning.validation import ArgumentError

__all__ = ["InvalidArgument", "lightning_arguments"]


class InvalidArgument(MisconfigurationException, ValueError):
    """A bad argument of ``HQDEStrategy`` or of a callback (a ``MisconfigurationException`` and a ``ValueError``)."""


@contextmanager
def lightning_arguments(owner: str) -> Iterator[None]:
    """Re-raises a ``ValueError``/``TypeError`` from the checks inside as :class:`InvalidArgument` naming ``owner``.

    An :class:`~hqde_lightning.validation.ArgumentError` reads as said of the call
    (`` `QuantumNoise(scale=-1.0)`: `scale` must be ... ``); any other error is prefixed by ``owner``.
    """
    try:
        yield
    except InvalidArgument:
        raise
    except ArgumentError as err:
        raise InvalidArgument(err.in_call(owner)) from err
    except (ValueError, TypeError) as err:
        raise InvalidArgument(f"{owner}: {err}") from err
