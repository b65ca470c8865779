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
