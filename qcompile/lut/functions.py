"""The PTNQ function pool (seed 003): quantizers `w = s * f(a * u)` over normalised codes u.

SymPy builds the pool: 19 primitives, optionally composed to depth 1 (f(g(x))); it derives each
inverse with `solve` and drops a function when no single real solution inverts it on a window
around 0 (x^2, cos, cosh: they fold the code line onto itself). Every expression, the domain guards
of seed 003 Table 1 included, is lowered by one walker, `lower`, into NumPy, PyTorch or ONNX
nodes: there is no hand-written code per function.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import sympy as sp

x, y = sp.symbols("x y", real=True)

PRIMITIVES: dict[str, sp.Expr] = {
    "x": x, "x^2": x**2, "x^3": x**3, "exp": sp.exp(x), "log": sp.log(x), "sqrt": sp.sqrt(x), "cbrt": sp.cbrt(x),
    "sin": sp.sin(x), "cos": sp.cos(x), "tan": sp.tan(x), "sinh": sp.sinh(x), "cosh": sp.cosh(x),
    "tanh": sp.tanh(x), "arcsin": sp.asin(x), "arccos": sp.acos(x), "arctan": sp.atan(x),
    "arcsinh": sp.asinh(x), "arccosh": sp.acosh(x), "arctanh": sp.atanh(x),
}

# Seed 003 Table 1: the argument is clipped into [low, high] (None: unbounded). tan's guard keeps it finite.
GUARDS = {
    sp.log: (1e-5, None), sp.asin: (-0.99999, 0.99999), sp.acos: (-0.99999, 0.99999), sp.atanh: (-0.9999, 0.9999),
    sp.acosh: (1.0, None), sp.tan: (-(np.pi / 2 - 1e-3), np.pi / 2 - 1e-3),
}
SQRT_GUARD = (0.1, None)  # Table 1's sqrt guard
EVEN_ROOT_GUARD = (0.0, None)  # x^y with y < 1: x >= 0

# name -> (NumPy, PyTorch attribute, ONNX op) for each elementary function the pool uses.
ELEMENTARY = {
    sp.exp: (np.exp, "exp", "Exp"), sp.log: (np.log, "log", "Log"), sp.sin: (np.sin, "sin", "Sin"),
    sp.cos: (np.cos, "cos", "Cos"), sp.tan: (np.tan, "tan", "Tan"), sp.sinh: (np.sinh, "sinh", "Sinh"),
    sp.cosh: (np.cosh, "cosh", "Cosh"), sp.tanh: (np.tanh, "tanh", "Tanh"), sp.asin: (np.arcsin, "asin", "Asin"),
    sp.acos: (np.arccos, "acos", "Acos"), sp.atan: (np.arctan, "atan", "Atan"),
    sp.asinh: (np.arcsinh, "asinh", "Asinh"), sp.acosh: (np.arccosh, "acosh", "Acosh"),
    sp.atanh: (np.arctanh, "atanh", "Atanh"), sp.Abs: (np.abs, "abs", "Abs"), sp.sign: (np.sign, "sign", "Sign"),
}


class Backend:
    """Arithmetic for `lower`: NumPy by default; subclasses emit PyTorch ops or ONNX nodes."""

    def const(self, value: float):
        return np.float64(value)

    def add(self, a, b):
        return a + b

    def mul(self, a, b):
        return a * b

    def pow(self, a, exponent: float):
        return np.power(a, exponent)

    def clip(self, a, low: float | None, high: float | None):
        return np.clip(a, low, high)

    def call(self, func, a):
        return ELEMENTARY[func][0](a)


class TorchBackend(Backend):
    def __init__(self):
        import torch
        self.torch = torch

    def const(self, value: float):
        return value

    def pow(self, a, exponent: float):
        return self.torch.pow(a, exponent)

    def clip(self, a, low, high):
        return self.torch.clamp(a, low, high)

    def call(self, func, a):
        return getattr(self.torch, ELEMENTARY[func][1])(a)


def lower(expr: sp.Expr, symbols: dict, backend: Backend):
    """Evaluate `expr` with `symbols` (SymPy symbol -> backend value) through `backend`, with domain guards."""
    if expr in symbols:
        return symbols[expr]
    if expr.is_Number or expr.is_NumberSymbol:
        return backend.const(float(expr))
    args = [lower(arg, symbols, backend) for arg in expr.args]
    if expr.is_Add:
        return functools.reduce(backend.add, args)
    if expr.is_Mul:
        return functools.reduce(backend.mul, args)
    if expr.is_Pow:
        base, exponent = args[0], float(expr.exp)
        root = sp.Rational(expr.exp).q if expr.exp.is_Rational else 1
        if root > 1 and root % 2 == 1:  # odd roots are real roots: sign(b) * |b|^e
            magnitude = backend.pow(backend.call(sp.Abs, base), exponent)
            return backend.mul(backend.call(sp.sign, base), magnitude) if sp.Rational(expr.exp).p % 2 else magnitude
        if root > 1:
            base = backend.clip(base, *(SQRT_GUARD if expr.exp == sp.Rational(1, 2) else EVEN_ROOT_GUARD))
        return backend.pow(base, exponent)
    if expr.func in ELEMENTARY:
        argument = args[0]
        if expr.func in GUARDS:
            argument = backend.clip(argument, *GUARDS[expr.func])
        return backend.call(expr.func, argument)
    raise ValueError(f"no lowering for {expr.func.__name__} in {expr}")


@dataclass(frozen=True)
class PoolFunction:
    """f and its inverse f^-1 (both in x), as SymPy expressions."""

    name: str
    forward: sp.Expr
    inverse: sp.Expr

    def numpy(self, values: np.ndarray, inverse: bool = False) -> np.ndarray:
        with np.errstate(all="ignore"):
            return lower(self.inverse if inverse else self.forward, {x: values}, Backend())

    def torch(self, values, inverse: bool = False):
        return lower(self.inverse if inverse else self.forward, {x: values}, TorchBackend())


def _check_points(forward: sp.Expr) -> tuple[np.ndarray, np.ndarray] | None:
    """Points of the code line inside f's domain, and their images: [-1, 1] (the normalised codes),
    or [1, 3] for a function defined only beyond 1 (arccosh). None when f lives on neither."""
    for window in (np.linspace(-1.0, 1.0, 41), np.linspace(1.0, 3.0, 41)):
        with np.errstate(all="ignore"):
            images = lower(forward, {x: window}, Backend())
            inside = np.isfinite(images) & (lower(forward, {x: window}, _Unguarded()) == images)
        if inside.sum() >= 5:
            return window[inside], images[inside]
    return None


def _round_trips(forward: sp.Expr, inverse: sp.Expr) -> bool:
    points = _check_points(forward)
    if points is None:
        return False
    with np.errstate(all="ignore"):
        back = lower(inverse, {x: points[1]}, Backend())
    return bool(np.allclose(back, points[0], atol=1e-6))


def _inverse(forward: sp.Expr) -> sp.Expr | None:
    """The one real solution of y = f(x) that gives back x on the check window, or None."""
    solutions = sp.solve(sp.Eq(y, forward), x)
    working = [s.subs(y, x) for s in solutions if not s.has(sp.I) and _round_trips(forward, s.subs(y, x))]
    return working[0] if len(working) == 1 else None


class _Unguarded(Backend):
    """NumPy without domain guards: points where a guard changes f are outside its domain."""

    def clip(self, a, low, high):
        return a


@functools.lru_cache(maxsize=None)
def pool(depth: int = 0) -> tuple[PoolFunction, ...]:
    """The invertible functions: the primitives (depth 0), plus compositions f(g(x)) (depth 1).

    A composition's inverse is g^-1(f^-1(x)) from the SymPy-derived inverses of its parts; it is kept
    only if it round-trips on the check window (the composite's domain can be empty there)."""
    if depth not in (0, 1):
        raise ValueError(f"function depth must be 0 or 1, got {depth}")
    functions = [PoolFunction(name, f, inverse) for name, f in PRIMITIVES.items()
                 if (inverse := _inverse(f)) is not None]
    if depth == 1:
        primitives = [f for f in functions if f.name != "x"]
        for outer in primitives:
            for inner in primitives:
                forward = outer.forward.subs(x, inner.forward)
                inverse = inner.inverse.subs(x, outer.inverse)
                if _round_trips(forward, inverse):
                    functions.append(PoolFunction(f"{outer.name}({inner.name})", forward, inverse))
    return tuple(functions)


def by_name(name: str) -> PoolFunction:
    for function in pool(1 if "(" in name else 0):
        if function.name == name:
            return function
    raise KeyError(f"no invertible pool function named {name!r}")

