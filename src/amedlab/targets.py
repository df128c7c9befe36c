"""``_target_``: a user's class named by its dotted path (``model._target_``, ``solver._target_``).

Only imports: :func:`import_class` finds the object and checks it is a class and a subclass of the
expected base; nothing is called (no constructor, no factory) before that check passes. The
builders (:func:`amedlab.models.factory.build_model`, :func:`amedlab.solvers.make_solver`) then
construct it with the node's keyword arguments, checked against the constructor's signature first.
Every failure is a ValueError naming the key, the value and what is accepted (the command line
prints it as one line). docs/extending.md has the worked examples.
"""
from __future__ import annotations

import importlib
import inspect
import re

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")


def import_class(target, key: str, base: type) -> type:
    """The class at the dotted path ``target`` (``package.module.Class``), checked to subclass ``base``.

    ``key`` (e.g. ``model._target_``) names the setting in the errors. The module is imported (that
    runs its top-level code, as any import does); the attribute found is only inspected.
    """
    base_name = f"{base.__module__}.{base.__qualname__}"
    accepted = (f"the dotted path of a subclass of {base_name}, importable from the Python path "
                "(PYTHONPATH or the working directory), e.g. mypkg.MyClass")
    if not isinstance(target, str) or not _DOTTED.fullmatch(target):
        raise ValueError(f"{key}={target!r} is not a dotted path module.Class; accepted: {accepted}")
    parts = target.split(".")
    module, obj = None, None
    for i in range(len(parts) - 1, 0, -1):  # the longest importable module prefix, then attributes
        name = ".".join(parts[:i])
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise ValueError(f"{key}={target!r}: importing {name} failed, it needs the missing module "
                             f"{err.name!r}; accepted: {accepted}") from err
        except Exception as err:  # the user's module raised while importing
            raise ValueError(f"{key}={target!r}: importing {name} failed ({type(err).__name__}: "
                             f"{' '.join(str(err).split())}); accepted: {accepted}") from err
        obj = module
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                raise ValueError(f"{key}={target!r}: module {name} has no attribute "
                                 f"{'.'.join(parts[i:])}; accepted: {accepted}")
            obj = getattr(obj, attr)
        break
    if module is None:
        raise ValueError(f"{key}={target!r}: no module {parts[0]!r} on the Python path; accepted: {accepted}")
    if not isinstance(obj, type):
        raise ValueError(f"{key}={target!r} is a {type(obj).__name__}, not a class: it must subclass {base_name}; "
                         f"accepted: {accepted}")
    if not issubclass(obj, base):
        raise ValueError(f"{key}={target!r} must subclass {base_name}; accepted: {accepted}")
    return obj


def check_arguments(cls: type, kwargs: dict, key: str, prefix: str) -> None:
    """``kwargs`` bind to ``cls``'s constructor (names and required ones), checked without calling it.

    ``prefix`` is where the arguments live in the config (``model`` or ``solver.options``).
    """
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no signature to read: the constructor itself will say
        return
    params = [p for p in signature.parameters.values()
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    names = [p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
    target = f"{cls.__module__}.{cls.__qualname__}"
    unknown = [k for k in kwargs if k not in names]
    if unknown and not accepts_any:
        raise ValueError(f"{prefix}.{unknown[0]}={kwargs[unknown[0]]!r} is not an argument of {target} "
                         f"({key}); accepted: {', '.join(names) or 'none'}")
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise ValueError(f"{key}={target!r} needs {', '.join(f'{prefix}.{m}' for m in missing)} "
                         f"(its constructor has no default for {', '.join(missing)})")
