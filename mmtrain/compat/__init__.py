"""Every use of a private or undocumented API of torch, transformers, peft, accelerate, DeepSpeed, datasets or bitsandbytes, one module per library.

Nothing else in mmtrain reaches past a library's public surface: when it must, it goes
through a helper here, whose comment says why we need the private thing and what breaks
if a release changes it. ``tests/test_compat.py`` checks each one against the installed
releases (on CPU, without mocks), and the upper bounds in ``pyproject.toml`` name the
newest releases those checks passed on. Raising a bound means running those tests first.

These modules pin; they do not compute: kernels and algorithms built on a private API
live with their users. Only torch is imported at module level; the other libraries load
on first use (deepspeed only inside the functions that need it, after ``DS_ACCELERATOR``
is set by :func:`mmtrain.training.distributed.prepare_environment`). No module here reads
the environment or imports ``mmtrain.args`` or ``mmtrain.data``.
"""


import sys as _sys


def lazy_attributes(module_name: str, loaders: dict):
    """``(__getattr__, __dir__)`` for a compat module whose pinned names load on first use.

    ``loaders`` maps each name to a function that imports and returns it; the value is then
    kept on the module, so a library is imported only by the code that needs it.
    """

    def __getattr__(name: str):
        loader = loaders.get(name)
        if loader is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = loader()
        setattr(_sys.modules[module_name], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(_sys.modules[module_name])) | set(loaders))

    return __getattr__, __dir__
