"""Argument checks shared by the scaling calculators: catalog names and plain numbers.

A calculator takes either an object (a `GPU`, an `Interconnect`, a `Precision`) or the name of
one in its catalog (`GPUS`, `INTERCONNECTS`, `PRECISIONS`); an unknown name is refused at once
with the list of known ones, anything else with a TypeError.
"""

from __future__ import annotations

from numbers import Real


def by_name(arg: str, value, catalog: dict, cls: type, catalog_name: str):
    """`value` if it is a `cls`, else the entry of `catalog` it names."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        if value in catalog:
            return catalog[value]
        known = ", ".join(repr(k) for k in catalog)
        raise ValueError(f"{arg} {value!r} is not in {catalog_name}; known: {known} "
                         f"(or pass your own {cls.__name__}(...))")
    a = "an" if cls.__name__[0] in "AEIOU" else "a"
    raise TypeError(f"{arg} must be {a} {cls.__name__} or the name of one in {catalog_name}, "
                    f"got {type(value).__name__}")


def number(name: str, value, *, minimum: float = 0.0, strict: bool = True) -> None:
    """TypeError unless `value` is a real number (not a bool); ValueError unless it is
    > minimum (strict) or >= minimum (NaN fails both)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value > minimum if strict else value >= minimum
    if not ok:
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
