"""Bounds on the work one call into CPython's C code may do for a request.

A C builtin runs no request bytecode, so the stop checks the compiler inserts never run inside it:
`10 ** 10**9`, `sum(itertools.repeat(1))`, `sum([[0]] * 10**6, [])` would each keep the request
thread in one C call past its grace period (the replica would be replaced). Two rules close the
sources instead of naming consumers:

* **Big integers.** CPython's integer multiply is superlinear and its division quadratic in the
  digits, and memory does not bound the time (`x * x` on a 100 MB int). Request code's `**`,
  `*`, `<<`, `//`, `%` (the compiler routes them through `_arith_`), their augmented forms,
  `pow`, `divmod`, `math.factorial/comb/perm/prod/lcm` and the `operator` module's versions
  refuse an int result or dividend above `MAX_INT_BITS` bits, and a three-argument `pow` above
  `MAX_MODPOW_WORK` exponent-bits x modulus-bits. `int`<->`str` keep Python's 4,300-digit limit.
* **Unbounded iterators.** Every `itertools` function, and `range` longer than `RANGE_CHECKED`,
  return an iterator whose every step checks the request's stop: any C consumer (`sum`, `list`,
  `sorted`, `max`, `str.join`, `collections.deque`, ...) of an infinite or huge source ends at the
  stop. `iter(callable, sentinel)` is not available (the sandbox's `iter` takes one argument).
* **Quadratic consumers.** `sum` with a list or tuple start (quadratic concatenation) is refused;
  `sorted` and `list.sort` refuse more than `MAX_SORT_ITEMS` items.
"""

from __future__ import annotations

import builtins
import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from model_runtime.replica.request_thread import current_stop
from model_runtime.sandbox.errors import LimitExceeded

MAX_INT_BITS = 1 << 18  # 262,144 bits (~78,900 decimal digits): any one operation stays < ~0.1 s
MAX_MODPOW_WORK = 1 << 26  # exponent bits x modulus bits of pow(a, b, m)
RANGE_CHECKED = 1 << 20  # longer ranges iterate with a stop check per step
MAX_SORT_ITEMS = 10**7


def _too_big(what: str, bits: float) -> LimitExceeded:
    return LimitExceeded(f"{what} would make an integer of ~{int(bits):,} bits; the sandbox's limit is "
                         f"{MAX_INT_BITS:,} bits (a single C call this size could not be stopped)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int)


def check_pow(base: Any, exponent: Any, modulus: Any = None) -> None:
    if not (_is_int(base) and _is_int(exponent)):
        return
    if modulus is not None and _is_int(modulus):
        if exponent.bit_length() * modulus.bit_length() > MAX_MODPOW_WORK:
            raise LimitExceeded(f"pow(a, b, m) with a {exponent.bit_length():,}-bit exponent and a "
                                f"{modulus.bit_length():,}-bit modulus is over the sandbox's limit")
        return
    if exponent > 0 and abs(base) > 1:
        bits = math.log2(abs(base)) * exponent
        if bits > MAX_INT_BITS:
            raise _too_big("**", bits)


def checked_binop(op: str, left: Any, right: Any) -> Any:
    """`left op right` for `**`, `*`, `<<`, `//`, `%` (and their in-place forms), with the integer
    bounds; any other operand type goes straight to the operator."""
    if _is_int(left) and _is_int(right):
        if op in ("**", "**="):
            check_pow(left, right)
        elif op in ("*", "*="):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _too_big("*", left.bit_length() + right.bit_length())
        elif op in ("<<", "<<="):
            if left and right > 0 and left.bit_length() + right > MAX_INT_BITS:
                raise _too_big("<<", left.bit_length() + right)
        elif op in ("//", "%", "//=", "%=") and left.bit_length() > MAX_INT_BITS:
            raise _too_big(op.rstrip("="), left.bit_length())
    return _BINARY[op](left, right)


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "**": operator.pow, "*": operator.mul, "<<": operator.lshift, "//": operator.floordiv, "%": operator.mod,
    "**=": operator.ipow, "*=": operator.imul, "<<=": operator.ilshift, "//=": operator.ifloordiv,
    "%=": operator.imod,
}
BOUNDED_OPS = frozenset(_BINARY)


# -- builtins ------------------------------------------------------------------------------------

def _pow(base: Any, exp: Any, mod: Any = None) -> Any:
    check_pow(base, exp, mod)
    return builtins.pow(base, exp, mod)


def _divmod(a: Any, b: Any) -> Any:
    if _is_int(a) and _is_int(b) and a.bit_length() > MAX_INT_BITS:
        raise _too_big("divmod", a.bit_length())
    return builtins.divmod(a, b)


def _sum(iterable: Iterable[Any], /, start: Any = 0) -> Any:
    if isinstance(start, (list, tuple, bytes, bytearray)):
        raise LimitExceeded("sum() with a list or tuple start copies quadratically; use "
                            "itertools.chain or a comprehension")
    return builtins.sum(iterable, start)


def _sorted(iterable: Iterable[Any], /, *, key: Any = None, reverse: bool = False) -> list[Any]:
    items = list(iterable)
    _check_sort(len(items))
    items.sort(key=key, reverse=reverse)
    return items


def _check_sort(n: int) -> None:
    if n > MAX_SORT_ITEMS:
        raise LimitExceeded(f"sorting {n:,} items in one call is over the sandbox's {MAX_SORT_ITEMS:,}-item limit")


def list_sort(items: list[Any]) -> Callable[..., None]:
    """`items.sort` with the item bound (the attribute guard hands this out for lists)."""

    def sort(*, key: Any = None, reverse: bool = False) -> None:
        _check_sort(len(items))
        items.sort(key=key, reverse=reverse)

    return sort


class CheckedRange:
    """A range too long for one C call to consume: the same numbers, a stop check per step."""

    __slots__ = ("_range",)

    def __init__(self, inner: range) -> None:
        self._range = inner

    def __iter__(self) -> Iterator[int]:
        return checked_iter(iter(self._range))

    def __reversed__(self) -> Iterator[int]:
        return checked_iter(reversed(self._range))

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, index: Any) -> Any:
        return _range(self._range[index]) if isinstance(index, slice) else self._range[index]

    def __contains__(self, value: Any) -> bool:
        return value in self._range

    def __eq__(self, other: Any) -> bool:
        return self._range == (other._range if isinstance(other, CheckedRange) else other)

    def __hash__(self) -> int:
        return hash(self._range)

    def __repr__(self) -> str:
        return repr(self._range)

    def __getattr__(self, name: str) -> Any:
        if name in ("start", "stop", "step", "count", "index"):
            return getattr(self._range, name)
        raise AttributeError(name)


def _range(*args: Any) -> Any:
    inner = args[0] if len(args) == 1 and isinstance(args[0], range) else builtins.range(*args)
    try:
        long = len(inner) > RANGE_CHECKED
    except OverflowError:  # more than sys.maxsize steps
        long = True
    return CheckedRange(inner) if long else inner


def checked_iter(source: Iterator[Any]) -> Iterator[Any]:
    """`source`, with the request's stop checked before every item."""
    stop = current_stop()
    for item in source:
        if stop.stopped:
            stop.check()
        yield item


BUILTINS: dict[str, Any] = {"pow": _pow, "divmod": _divmod, "sum": _sum, "sorted": _sorted, "range": _range}


# -- modules -------------------------------------------------------------------------------------

def _checked_iterator_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def make(*args: Any, **kwargs: Any) -> Iterator[Any]:
        return checked_iter(fn(*args, **kwargs))

    return make


def _factorial(n: Any) -> Any:
    if _is_int(n) and n > 2 and n * math.log2(n) > MAX_INT_BITS:
        raise _too_big("math.factorial", n * math.log2(n))
    return math.factorial(n)


def _comb_like(fn: Callable[..., int], name: str) -> Callable[..., Any]:
    def bounded(n: Any, k: Any = None) -> Any:
        if _is_int(n) and n > 2:
            taken = n if k is None else min(k, n - k) if fn is math.comb else k
            if _is_int(taken) and taken > 0 and taken * math.log2(n) > MAX_INT_BITS:
                raise _too_big(f"math.{name}", taken * math.log2(n))
        return fn(n, k) if k is not None else fn(n)

    return bounded


def _prod(iterable: Iterable[Any], /, *, start: Any = 1) -> Any:
    total = start
    for item in checked_iter(iter(iterable)):
        total = checked_binop("*", total, item)
    return total


def _lcm(*values: Any) -> Any:
    if all(_is_int(v) for v in values) and sum(abs(v).bit_length() for v in values) > MAX_INT_BITS:
        raise _too_big("math.lcm", sum(abs(v).bit_length() for v in values))
    return math.lcm(*values)


def _binary(op: str) -> Callable[[Any, Any], Any]:
    return lambda a, b: checked_binop(op, a, b)


def module_override(module: str, name: str) -> Any | None:
    """The bounded stand-in for `module.name`, or None when the real one is served."""
    if module == "itertools" and not name.startswith("_"):
        value = getattr(itertools, name, None)
        return _checked_iterator_factory(value) if callable(value) else None
    return _MODULE_OVERRIDES.get((module, name))


_MODULE_OVERRIDES: dict[tuple[str, str], Any] = {
    ("math", "factorial"): _factorial,
    ("math", "comb"): _comb_like(math.comb, "comb"),
    ("math", "perm"): _comb_like(math.perm, "perm"),
    ("math", "prod"): _prod,
    ("math", "lcm"): _lcm,
    ("operator", "mul"): _binary("*"), ("operator", "pow"): _binary("**"), ("operator", "lshift"): _binary("<<"),
    ("operator", "floordiv"): _binary("//"), ("operator", "mod"): _binary("%"), ("operator", "imul"): _binary("*="),
    ("operator", "ipow"): _binary("**="), ("operator", "ilshift"): _binary("<<="),
    ("operator", "ifloordiv"): _binary("//="), ("operator", "imod"): _binary("%="),
    ("builtins", "pow"): _pow,
}
