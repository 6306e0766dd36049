"""Settings from the command line: kernel settings (module-level upper-case constants of ``hybridlm.ops`` modules),
as ``MODULE.KNOB=N``: the launchers read them at every call, so a setting takes effect at once, compiled graphs
included (the kernels are opaque custom ops there); and model fields, as ``FIELD=VALUE`` (:func:`model_fields`)."""

from __future__ import annotations

import importlib
import json


def model_fields(items: list[str]) -> dict[str, object]:
    """``{FIELD: VALUE}`` of ``FIELD=VALUE`` items (a benchmark's repeatable ``--set``), each value read as JSON, or
    as a bare string where it is not JSON."""
    fields = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            fields[name] = json.loads(value)
        except json.JSONDecodeError:
            fields[name] = value
    return fields


def parse(item: str) -> tuple[object, str, int | None]:
    """(module, knob, value) of ``MODULE.KNOB=N`` (``N``: an integer, or ``None``); SystemExit saying
    what is wrong otherwise."""
    target, _, value = item.partition("=")
    module, _, knob = target.rpartition(".")
    try:
        mod = importlib.import_module(f"hybridlm.ops.{module}")
    except ImportError:
        raise SystemExit(f"{item}: no module hybridlm.ops.{module}") from None
    if not knob.isupper() or not hasattr(mod, knob) or not (value.isdigit() or value == "None"):
        raise SystemExit(
            f"{item}: expected MODULE.KNOB=N (N an integer or None) with KNOB an upper-case setting of hybridlm.ops.{module}"
        )
    return mod, knob, None if value == "None" else int(value)


def apply(items: list[str]) -> dict[tuple[object, str], object]:
    """Set each ``MODULE.KNOB=N`` of ``items``; returns the previous values, for :func:`restore`."""
    parsed = [parse(item) for item in items]  # all checked before any is set
    old = {}
    for mod, knob, value in parsed:
        old.setdefault((mod, knob), getattr(mod, knob))
        setattr(mod, knob, value)
    return old


def restore(old: dict[tuple[object, str], object]) -> None:
    for (mod, knob), value in old.items():
        setattr(mod, knob, value)
