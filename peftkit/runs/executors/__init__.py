"""Where the runs of a comparison (or a search) execute: a registry, like the strategies'.

Adding an executor = one module with an :class:`Executor` subclass (``name``, a typed ``Config``
subclassing :class:`ExecutorConfig` with ``name: Literal["<name>"]``, ``run``) and one line in
``REGISTRY``. The compare recipe's ``executor:`` section is validated by that ``Config``, and
``peftkit compare --executor`` takes its choices (and the ``Config``'s ``FLAGS``) from here.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from peftkit.errors import UserError
from peftkit.runs.executors.base import (
    PACKAGE_ROOT,
    THREAD_VARS,
    Executor,
    ExecutorConfig,
    Outcome,
    error_record,
    execute,
    failed_report,
    finish,
    label,
    pending,
    spawn,
    stop_child,
    summary,
    train_args,
)
from peftkit.runs.executors.local import LocalConfig, LocalExecutor
from peftkit.runs.executors.ray import RayConfig, RayExecutor
from peftkit.runs.executors.slurm import SlurmConfig, SlurmExecutor

REGISTRY: dict[str, type[Executor]] = {
    "local": LocalExecutor,
    "slurm": SlurmExecutor,
    "ray": RayExecutor,
}
DEFAULT = "local"


def get(name: str) -> type[Executor]:
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise UserError(f"executor.name: unknown executor {name!r} (known: {', '.join(REGISTRY)})") from None


def config(section: dict[str, Any] | None = None) -> ExecutorConfig:
    """An ``executor:`` section validated by its executor's ``Config`` (default: local)."""
    section = {"name": DEFAULT, **(section or {})}
    cls = get(section["name"]).Config
    try:
        return cls.model_validate(section)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        what = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise UserError(f"executor.{loc}: {what}" + (f" of executor '{section['name']}'" if
                                                      err["type"] == "extra_forbidden" else "")) from None


def resolve(section: dict[str, Any] | None, flags: dict[str, Any] | None) -> ExecutorConfig:
    """The recipe's ``executor:`` section with ``flags`` (None values ignored) over it. When the flags
    name another executor, only the recipe's options that executor has still apply."""
    section, flags = dict(section or {}), {k: v for k, v in (flags or {}).items() if v is not None}
    name = flags.get("name", section.get("name", DEFAULT))
    if name != section.get("name", DEFAULT):
        fields = get(name).Config.model_fields
        section = {k: v for k, v in section.items() if k in fields}
    return config(section | flags)


def create(cfg: ExecutorConfig) -> Executor:
    return get(cfg.name)(cfg)


def from_options(name: str = DEFAULT, **opts) -> Executor:
    """An executor from keyword options, e.g. ``from_options("local", parallel=2)``."""
    return create(config({"name": name, **opts}))


def cli_flags() -> dict[str, dict[str, Any]]:
    """``peftkit compare`` flags of every registered executor's options: field -> argparse keywords."""
    flags: dict[str, dict[str, Any]] = {}
    for ex in REGISTRY.values():
        for cls in reversed(ex.Config.__mro__):
            flags.update(cls.__dict__.get("FLAGS") or {})
    return flags


__all__ = ["DEFAULT", "PACKAGE_ROOT", "REGISTRY", "THREAD_VARS", "Executor", "ExecutorConfig", "LocalConfig",
           "LocalExecutor", "Outcome", "RayConfig", "RayExecutor", "SlurmConfig", "SlurmExecutor", "cli_flags",
           "config", "create", "error_record", "execute", "failed_report", "finish", "from_options", "get", "label",
           "pending", "resolve", "spawn", "stop_child", "summary", "train_args"]
