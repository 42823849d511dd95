"""Hook references of a spec resolved to functions: `name` (the spec's own hook module), `module.name`
(a built-in hook module of `specs/hooks/`) or `{hook: name, <param>: value}` (parameters bound), with
the texts docs, messages and `macp-runtime hooks` show for them."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import os
import pkgutil
from typing import Any, Callable

from ..specs.hooks.contract import describe
from .errors import SpecError
from .nodes import Ctx
from .validate import suggest

HOOKS_PACKAGE = "macp_runtime.specs.hooks"


class HookResolver:
    def __init__(self, ctx: Ctx, spec_dir: str, module_ref: str | None):
        self.ctx = ctx
        self.modules = []
        if module_ref:
            self.modules.append(self._load(module_ref, spec_dir))
        self.common = importlib.import_module(f"{HOOKS_PACKAGE}.common")
        self._memo: dict = {}

    def _load(self, ref: str, spec_dir: str):
        try:
            if ref.endswith(".py"):
                path = ref if os.path.isabs(ref) else os.path.join(spec_dir, ref)
                name = "macp_runtime_user_hooks_" + os.path.splitext(os.path.basename(path))[0]
                spec = importlib.util.spec_from_file_location(name, path)
                if spec is None or not os.path.exists(path):
                    raise ImportError(f"no such file {path}")
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
            return importlib.import_module(f"{HOOKS_PACKAGE}.{ref}")
        except ImportError as exc:
            raise SpecError(self.ctx.file, "hooks", f"cannot load hook module {ref!r}: {exc}") from None
        except Exception as exc:   # a user module that fails while loading: say so, no traceback
            raise SpecError(self.ctx.file, "hooks",
                            f"hook module {ref!r} failed to load: {type(exc).__name__}: {exc}") from None

    def find(self, name: str) -> tuple[Callable | None, str | None]:
        """(the hook, None), or (None, why not — with the known hooks and the nearest name)."""
        if "." in name:
            mod_name, _, attr = name.rpartition(".")
            module = self.common if mod_name == "common" else _hook_module(mod_name)
            if module is None:
                return None, f"unknown hook module {mod_name!r} in {name!r}{suggest(mod_name, hook_module_names(), 'modules')}"
            fn = getattr(module, attr, None)
            if callable(fn) and not attr.startswith("_"):
                return fn, None
            known = [f"{mod_name}.{n}" for n in module_hooks(module)]
            return None, f"hook {name!r} does not exist{suggest(name, known, 'hooks')}; `macp-runtime hooks` lists them"
        for module in self.modules:
            fn = getattr(module, name, None)
            if callable(fn):
                return fn, None
        known = [n for module in self.modules for n in module_hooks(module)]
        elsewhere = [f"{m}.{name}" for m in hook_module_names() if callable(getattr(_hook_module(m), name, None))]
        if elsewhere and not known:
            return None, f"hook {name!r} does not exist: bare names come from the spec's `hooks` module; did you mean {elsewhere[0]!r}?"
        return None, f"hook {name!r} does not exist{suggest(name, known + elsewhere, 'hooks')}"

    def get(self, node, path: str, name: Any, key=None) -> Callable:
        """A hook reference resolved (memoised: a generated spec names the same hooks many times)."""
        arity = 2 if path.startswith("roles.") or path.startswith("roles[") else 1
        try:
            memo_key = (json.dumps(name, sort_keys=True, default=str), arity, key == "hook")
        except (TypeError, ValueError):
            memo_key = None
        if memo_key is not None:
            hit = self._memo.get(memo_key)
            if hit is not None:
                return hit
        fn = self._get(node, path, name, key)
        if memo_key is not None:
            self._memo[memo_key] = fn
        return fn

    def _get(self, node, path: str, name: Any, key=None) -> Callable:
        """Resolve a hook reference: `name`, `module.name`, or `{hook: name, <param>: value, ...}`.

        The mapping form binds parameters, so one generic hook serves many specs
        (e.g. `{hook: generic.all_participants_sent, message: SignOff}`).
        """
        arity = 2 if path.startswith("roles.") or path.startswith("roles[") else 1
        if isinstance(name, dict):
            params = {k: v for k, v in name.items() if k != "hook"}
            fn = self.get(name, path, name.get("hook"), "hook")
            try:
                inspect.signature(fn).bind(*([None] * arity), **params)
            except (TypeError, ValueError) as exc:
                raise self.ctx.fail(name, path, f"bad parameters for hook {name.get('hook')!r}: {exc}") from None
            bound = functools.partial(fn, **params)
            bound.__name__ = hook_label(name)
            bound.__doc__ = fn.__doc__
            bound.__macp_text__ = describe(fn, params)
            return bound
        if not isinstance(name, str) or not name:
            raise self.ctx.fail(node, path, "a hook name must be a non-empty string or {hook: name, ...}", key)
        if "." in name:
            mod_name, _, attr = name.rpartition(".")
            if not mod_name.isidentifier():
                raise self.ctx.fail(node, path, f"unknown hook module {mod_name!r} in {name!r}", key)
            if mod_name == "common":
                module = self.common
            else:
                try:
                    module = importlib.import_module(f"{HOOKS_PACKAGE}.{mod_name}")
                except ImportError:
                    raise self.ctx.fail(node, path, f"unknown hook module {mod_name!r} in {name!r}", key) from None
            fn = _public_function(module, attr)
        else:
            fn = None
            for module in self.modules:
                fn = _public_function(module, name)
                if fn is not None:
                    break
        if fn is None:
            raise self.ctx.fail(node, path, f"hook {name!r} does not exist (a hook is a public function defined "
                                            f"in its hook module)", key)
        if key != "hook":   # the {hook: ..., params} form checks its signature with the parameters above
            try:
                inspect.signature(fn).bind(*([None] * arity))
            except (TypeError, ValueError):
                raise self.ctx.fail(node, path, f"hook {name!r} does not take {arity} argument(s) as a "
                                                f"{'role' if arity == 2 else 'hook'} here", key) from None
        return fn


def _hook_module(name: str):
    if name.startswith("_") or name in ("context", "contract"):
        return None
    try:
        return importlib.import_module(f"{HOOKS_PACKAGE}.{name}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def _hook_module_names() -> tuple[str, ...]:
    from ..specs import hooks as hooks_pkg

    return tuple(m.name for m in pkgutil.iter_modules(hooks_pkg.__path__)
                 if not m.name.startswith("_") and m.name not in ("context", "contract"))


def hook_module_names() -> list[str]:
    """The built-in hook modules (`generic`, `common`, one per built-in mode, ...)."""
    return list(_hook_module_names())


def module_hooks(module) -> list[str]:
    """The public functions a hook module defines (not the ones it imports)."""
    return sorted(n for n, f in vars(module).items()
                  if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == module.__name__
                  and (hasattr(f, "__macp_hook__") or _first_param(f) in ("ctx", "session", "raw")))


def _first_param(fn) -> str:
    params = list(inspect.signature(fn).parameters)
    return params[0] if params else ""


def hook_text(fn: Callable) -> str:
    """What a resolved hook checks, in prose with its parameters filled in (reasons, docs)."""
    text = getattr(fn, "__macp_text__", None)
    return text if text is not None else describe(fn)


def _public_function(module, attr: str):
    """`module.attr` when it is a public function defined in that module itself (not one it imports,
    not a class, not a private helper), else None."""
    if not isinstance(attr, str) or not attr or attr.startswith("_"):
        return None
    fn = getattr(module, attr, None)
    if not inspect.isfunction(fn) or fn.__module__ != module.__name__:
        return None
    return fn


def hook_label(ref: Any) -> str:
    """How a hook reference reads in docs and messages: `name` or `name(param=value, ...)`."""
    if isinstance(ref, dict):
        params = ", ".join(f"{k}={v}" for k, v in ref.items() if k != "hook")
        return f"{ref.get('hook')}({params})"
    return str(ref)
