"""Mode specs: YAML text -> checked model -> compiled `transitions` machine.

The loader never executes anything and the compiler never reads files; the kernel's interpreter
(runtime/kernel/interpreter.py) runs the compiled result. The spec format: `spec-schema.json` here,
rendered as docs/spec-format.md.
"""
from .compiler import compile_spec, load_modes
from .errors import SpecError
from .loader import load_spec_file, load_spec_text
from .model import CompiledMode

__all__ = ["SpecError", "load_spec_file", "load_spec_text", "CompiledMode", "compile_spec", "load_modes"]
