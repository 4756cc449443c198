"""Layer 2: the trace body and shipped helper functions compile through RestrictedPython.

RestrictedPython rewrites the AST so every attribute read, item read, iteration, unpacking,
attribute/item write, augmented assignment and `print` goes through a guard function
(`_getattr_`, `_getitem_`, `_getiter_`, `_write_`, `_inplacevar_`, ...), and it rejects at
compile time any name or attribute starting with `_` (no `__class__`, `__globals__`,
`__subclasses__`, `__builtins__`), generator/frame attributes and `except*`. NDIF's guards
were inert because the code was compiled with the stock `compile()`; here *all* user code is
compiled by `restricted_compile`:

* the trace body (the executor compiles it instead of `RequestModel.deserialize`);
* every inner `with` block nnsight captures at run time (`tracer.invoke`, `tracer.iter`,
  `backward`, the inner traces of a session): `install_compile_hook()` wraps
  `nnsight.tracing.tracer.Tracer.compile` so that, while a sandboxed request runs on this
  thread, it compiles restricted too;
* helper functions shipped by value (the unpickler routes `_load_function` here).

Our policy adds to RestrictedPython's: every loop iteration, function (and lambda) entry and
comprehension step first calls `_check_stop_()`, which raises the request's stop once it timed
out, again at every later call, so code that catches the stop cannot go on running (a stop
delivered only once could be absorbed by a handler, a `finally` that starts new work, or a
library that catches it); a bare `except:` is rewritten to `except Exception:` and
`continue`/`break`/`return` inside `finally` are refused, friendly early errors for the same
rule; `global`/`nonlocal` are refused; augmented assignment on items and attributes becomes one
guarded call. The guard functions themselves are `guards.py`; request
source is compiled under server-made names (`sources.py`).
"""

from __future__ import annotations

import ast
import copy
import functools
import threading
import types
import warnings
from collections.abc import Iterable
from typing import Any

from RestrictedPython.compile import compile_restricted
from RestrictedPython.transformer import RestrictingNodeTransformer

from model_runtime.sandbox import sources
from model_runtime.sandbox.errors import CapabilityDenied, CodeRejected
from model_runtime.sandbox.guards import Guards as Guards  # its former home; callers may import it here


class SandboxPolicy(RestrictingNodeTransformer):  # type: ignore[misc]  # RestrictedPython is untyped
    """RestrictedPython's policy plus the rules the timeout and shared state need."""

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> ast.AST:
        # A bare `except:` would catch the injected timeout; narrow it to `Exception`.
        if node.type is None:
            node.type = ast.copy_location(ast.Name(id="Exception", ctx=ast.Load()), node)
        result: ast.AST = super().visit_ExceptHandler(node)
        return result

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        # `h[:, -1, :] += v` (the tutorials' steering line) and `acc.total += x` on an object of
        # the request's own class: RestrictedPython refuses both; here they become one guard call
        # that reads, applies the in-place operator and writes back, each step guarded.
        target = node.target
        if not isinstance(target, (ast.Subscript, ast.Attribute)):
            result: ast.AST = super().visit_AugAssign(node)
            return result
        op = _AUGMENTED_OPS[type(node.op)]
        obj: ast.expr = self.visit(target.value)
        value: ast.expr = self.visit(node.value)
        if isinstance(target, ast.Subscript):
            key: ast.expr = self.visit(_slice_as_expression(target.slice))
            guard, args = "_inplace_item_", [obj, key]
        else:
            self.check_name(node, target.attr)  # the same rule as a plain attribute access
            guard, args = "_inplace_attr_", [obj, ast.Constant(target.attr)]
        call = ast.Expr(ast.Call(ast.Name(guard, ast.Load()), [*args, ast.Constant(op), value], []))
        for made in ast.walk(call):
            if not hasattr(made, "lineno") and isinstance(made, (ast.expr, ast.stmt)):
                ast.copy_location(made, node)
        return call

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        # `**`, `*`, `<<`, `//`, `%` on ints are one C call whose time memory does not bound:
        # they go through `_arith_` (builtin_bounds.checked_binop), which bounds int sizes.
        result: ast.AST = super().visit_BinOp(node)
        op = _BOUNDED_BINOPS.get(type(node.op))
        if op is None or not isinstance(result, ast.BinOp):
            return result
        call = ast.Call(ast.Name("_arith_", ast.Load()), [ast.Constant(op), result.left, result.right], [])
        for made in (call, call.func, call.args[0]):
            ast.copy_location(made, node)
        return call

    # -- the stop: a check at every place where request code can run on without end ----------
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return _check_first(super().visit_FunctionDef(node))

    def visit_While(self, node: ast.While) -> ast.AST:
        return _check_first(super().visit_While(node))

    def visit_For(self, node: ast.For) -> ast.AST:
        return _check_first(super().visit_For(node))

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        result: ast.AST = super().visit_Lambda(node)
        if isinstance(result, ast.Lambda):  # `lambda: body` -> `lambda: _check_stop_() or body`
            result.body = ast.copy_location(ast.BoolOp(ast.Or(), [_check_call(result.body), result.body]), result.body)
        return result

    def visit_comprehension(self, node: ast.comprehension) -> ast.AST:
        result: ast.AST = super().visit_comprehension(node)
        if isinstance(result, ast.comprehension):  # one more condition: `if not _check_stop_()`
            check = ast.UnaryOp(ast.Not(), _check_call(result.iter))
            result.ifs = [ast.copy_location(check, result.iter), *result.ifs]
        return result

    def visit_Try(self, node: ast.Try) -> ast.AST:
        _refuse_flow_out_of_finally(self, node.finalbody)
        result: ast.AST = self.node_contents_visit(node)
        return result

    def visit_Global(self, node: ast.Global) -> ast.AST:
        self.error(node, "global statements are not allowed in the sandbox")
        return node

    def visit_Nonlocal(self, node: ast.Nonlocal) -> ast.AST:
        self.error(node, "nonlocal statements are not allowed in the sandbox")
        return node


def _check_call(near: ast.AST) -> ast.Call:
    call = ast.Call(ast.Name("_check_stop_", ast.Load()), [], [])
    for made in (call, call.func):
        ast.copy_location(made, near)
    return call


def _check_first(node: Any) -> ast.AST:
    """Put `_check_stop_()` first in a loop's or function's body (after RestrictedPython's own
    rewriting, so the inserted name is not refused for its underscore)."""
    if isinstance(node, (ast.FunctionDef, ast.While, ast.For)) and node.body:
        first = node.body[0]
        node.body.insert(0, ast.copy_location(ast.Expr(_check_call(first)), first))
    result: ast.AST = node
    return result


_BOUNDED_BINOPS: dict[type[ast.operator], str] = {
    ast.Pow: "**", ast.Mult: "*", ast.LShift: "<<", ast.FloorDiv: "//", ast.Mod: "%",
}

_AUGMENTED_OPS: dict[type[ast.operator], str] = {
    ast.Add: "+=", ast.Sub: "-=", ast.Mult: "*=", ast.Div: "/=", ast.FloorDiv: "//=", ast.Mod: "%=",
    ast.Pow: "**=", ast.MatMult: "@=", ast.LShift: "<<=", ast.RShift: ">>=", ast.BitAnd: "&=",
    ast.BitOr: "|=", ast.BitXor: "^=",
}


def _slice_as_expression(node: ast.expr) -> ast.expr:
    """A subscript's key as an ordinary expression: `a:b:c` → `slice(a, b, c)`, in tuples too."""
    if isinstance(node, ast.Slice):
        parts = [part if part is not None else ast.Constant(None) for part in (node.lower, node.upper, node.step)]
        return ast.copy_location(ast.Call(ast.Name("slice", ast.Load()), parts, []), node)
    if isinstance(node, ast.Tuple):
        return ast.copy_location(ast.Tuple([_slice_as_expression(e) for e in node.elts], ast.Load()), node)
    return node


def _refuse_flow_out_of_finally(policy: RestrictingNodeTransformer, body: list[ast.stmt]) -> None:
    """`continue`/`break`/`return` in a `finally` would discard the exception in flight, which
    may be the request's timeout: a `while True: try: ... finally: continue` loop would absorb
    every stop. Loops and functions nested inside the `finally` are their own scope for these."""
    pending: list[ast.AST] = list(body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Continue, ast.Break, ast.Return)):
            policy.error(node, f"'{type(node).__name__.lower()}' inside 'finally' is not allowed in the sandbox "
                               "(it would swallow the request's stop); move it after the try statement")
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            # break/continue inside a nested loop leave that loop only; a return still leaves.
            pending.extend(n for n in ast.walk(node) if isinstance(n, ast.Return))
            continue
        pending.extend(ast.iter_child_nodes(node))


def restricted_compile(source: str | ast.Module, filename: str, name: str | None = None) -> types.CodeType:
    """Compile `source` (text or a module AST, which is not modified) under the sandbox policy.

    Text sources are memoised: clients send the same block over and over (a trace in a loop), and
    a code object is immutable, so sharing it across requests is safe.
    """
    if isinstance(source, str):
        return _compile_text(source, filename, name)
    return _compile_tree(copy.deepcopy(source), filename, name)


def _compile_text(source: str, filename: str, name: str | None) -> types.CodeType:
    # Each request's source has its own server-made file name (sources.py), so the memo is keyed
    # by text alone and the file name is put into the (immutable) code objects afterwards.
    return _with_filename(_compile_text_memo(source, name), filename)


@functools.lru_cache(maxsize=512)
def _compile_text_memo(source: str, name: str | None) -> types.CodeType:
    return _compile_tree(source, "<request>", name)


def _with_filename(code: types.CodeType, filename: str) -> types.CodeType:
    if code.co_filename == filename:
        return code
    consts = tuple(_with_filename(c, filename) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


def _compile_tree(tree: str | ast.Module, filename: str, name: str | None) -> types.CodeType:
    try:
        # RestrictedPython warns (SyntaxWarning) about its own `printed` bookkeeping when a block
        # prints; the request's stderr is streamed to the user as LOG, so keep that noise out.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            code: types.CodeType = compile_restricted(tree, filename=filename, mode="exec", policy=SandboxPolicy)
    except SyntaxError as exc:
        raise CodeRejected(str(exc)) from None
    return code.replace(co_name=name) if name else code


# --------------------------------------------------------------------------------------------
# nnsight's run-time capture of inner `with` blocks: compile them restricted while sandboxed.

_ACTIVE = threading.local()
_HOOK_LOCK = threading.Lock()


class sandboxed_compilation:
    """Context manager: while active on this thread, nnsight compiles captured blocks restricted."""

    def __enter__(self) -> None:
        _ACTIVE.depth = getattr(_ACTIVE, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.depth -= 1


def is_sandboxed() -> bool:
    return getattr(_ACTIVE, "depth", 0) > 0


def install_compile_hook() -> None:
    """Wrap `Tracer.compile` once per process so inner blocks compile restricted when sandboxed."""
    from nnsight.tracing.tracer import Tracer

    with _HOOK_LOCK:
        if getattr(Tracer.compile, "_sandbox_hook", False):
            return
        original = Tracer.compile

        def compile_hook(self: Any, module: ast.Module, frame: types.FrameType) -> types.CodeType:
            if is_sandboxed():
                filename, name = frame.f_code.co_filename, frame.f_code.co_name
                text = _block_text(module, filename)
                if text is not None:  # the same inner block as an earlier request: reuse its code
                    return _compile_text(text, filename, name)
                return restricted_compile(module, filename, name)
            compiled: types.CodeType = original(self, module, frame)
            return compiled

        compile_hook._sandbox_hook = True  # type: ignore[attr-defined]
        Tracer.compile = compile_hook
        _install_remote_hook()


def _install_remote_hook() -> None:
    """A sandboxed body may not open its own remote/"local" trace: that would make the server a
    client (network egress, a second unsandboxed deserialisation)."""
    from nnsight.modeling.mixins.remotable import Remotable

    for method in ("trace", "session"):
        original = getattr(Remotable, method)

        def hook(self: Any, *args: Any, _original: Any = original, _name: str = method, **kwargs: Any) -> Any:
            positional_backend = _name == "session" and bool(args) and args[0] is not None
            if is_sandboxed() and (kwargs.get("remote") or kwargs.get("backend") is not None or positional_backend):
                raise CapabilityDenied("remote=/backend= are not available inside a remote request")
            return _original(self, *args, **kwargs)

        hook.__name__ = hook.__qualname__ = method
        hook.__doc__ = original.__doc__
        setattr(Remotable, method, hook)


def _block_text(module: ast.Module, filename: str) -> str | None:
    """The captured block as text padded to its line numbers, from the request's own source."""
    import linecache

    if not module.body:
        return None
    first, last = module.body[0].lineno, module.body[-1].end_lineno
    lines = linecache.getlines(filename)
    if last is None or last > len(lines):
        return None
    # The block's indentation in the file: nnsight parses a block dedented to its `with` line, so
    # the nodes' col_offset is relative to that line, not to the file.
    indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
    chunk = lines[first - 1 : last]
    if any(line.strip() and len(line) - len(line.lstrip()) < indent for line in chunk):
        return None
    return "\n" * (first - 1) + "".join(line[indent:] if line.strip() else "\n" for line in chunk)


def restricted_function(
    source: str, name: str, origin_filename: str, origin_line: int, namespace: dict[str, Any],
    defaults: Iterable[Any] | None = None,
) -> types.FunctionType:
    """Rebuild a shipped helper function from its source, compiled restricted (cf. nnsight's
    `_load_function`, which compiles with the stock compiler)."""
    padded = "\n" * (max(origin_line, 1) - 1) + source
    filename = sources.current().register(padded, origin_filename, part=name)
    module_code = restricted_compile(padded, filename)
    func_code = None
    for const in module_code.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == name:
            func_code = const
    if func_code is None:
        raise CodeRejected(f"shipped function {name!r} has no matching definition in its source")
    return types.FunctionType(func_code, dict(namespace), name, tuple(defaults) if defaults else None)
