"""Experiment trackers (TensorBoard, MLflow, W&B, ...) through accelerate's tracking API.

A run logs the resolved recipe as its parameters, every ``log.jsonl`` record's scalars at
their step, and ``result.json`` as an artifact. A compare groups its runs: the trainer
processes read the group from the environment that :func:`compare_group` sets (an MLflow
parent run, ``mlflow.parentRunId`` on every child; a W&B ``group``), so it works whatever
executes them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import UserError
from peftkit.log import warn


class TrackerError(UserError):
    """A tracker of output.report_to cannot start: said before training, nothing created."""

GROUP_ENV = "PEFTKIT_TRACKING_GROUP"
PARENT_ENV = "PEFTKIT_MLFLOW_PARENT_RUN_ID"
# Tracker name -> the module that must import for it (accelerate drops missing ones silently).
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
           "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab", "trackio": "trackio"}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(MODULES[name]) is not None


def resolve(report_to: list[str] | None) -> list[str]:
    """The trackers a run uses: ``output.report_to``, or [tensorboard] when installed."""
    if report_to is None:
        return ["tensorboard"] if _installed("tensorboard") else []
    missing = [n for n in report_to if not _installed(n)]
    if missing:
        raise UserError(f"output.report_to: {', '.join(missing)} not installed "
                        f"(pip install {' '.join(MODULES[n] for n in missing)}, or pip install 'peftkit[trackers]')")
    return list(dict.fromkeys(report_to))


def flatten(d: dict, prefix: str = "") -> dict:
    """Nested recipe -> flat ``{"train.lr": 1e-3, ...}`` of str/int/float/bool (trackers' params)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif v is None or isinstance(v, (str, int, float, bool)):
            out[key] = "None" if v is None else v
        else:
            out[key] = str(v)
    return out


def scalars(rec: dict, prefix: str = ""):
    """(name, number) pairs of a log record; nested dicts as ``eval/accuracy``; step and time left out."""
    for k, v in rec.items():
        if isinstance(v, dict):
            yield from scalars(v, f"{prefix}{k}/")
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
            yield f"{prefix}{k}", v


class Tracking:
    """The trackers of one training run: ``accelerator_kwargs()`` for the Accelerator,
    then ``start(acc)``, ``log(rec, step)`` per record, ``finish(run_dir)`` at the end."""

    def __init__(self, recipe, run_dir: str | Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        self.names = resolve(recipe.output.report_to)
        self.group = os.environ.get(GROUP_ENV) or None
        self.acc = None
        self.failed = False  # a tracker failed mid-run: warned once, the run goes on without trackers
        from peftkit.step.distributed import env_rank

        if env_rank() == 0:  # the process that logs (ranks > 0 must not race to create a sqlite store)
            check(self.names)  # before the Accelerator, the run dir, any training: fail in one line

    def accelerator_kwargs(self) -> dict:
        from accelerate.utils import ProjectConfiguration

        if not self.names:
            return {}
        cfg = ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "tb"))
        return {"log_with": self.names, "project_config": cfg}

    def run_name(self) -> str:
        # A compare run lives in <out>/<variant>/seed<k>: "variant/seed0" names it in its group.
        return f"{self.run_dir.parent.name}/{self.run_dir.name}" if self.group else self.run_dir.name

    def init_kwargs(self) -> dict:
        tags = {"peftkit.strategy": self.recipe.strategy.name, "peftkit.recipe_hash": self.recipe.hash()}
        if parent := os.environ.get(PARENT_ENV):
            tags["mlflow.parentRunId"] = parent
        return {"mlflow": {"run_name": self.run_name(), "tags": tags},
                "wandb": {"name": self.run_name(), "group": self.group, "job_type": "train",
                          "tags": [self.recipe.strategy.name]}}

    def start(self, acc) -> None:
        if not self.names:
            return
        self.acc = acc
        config = {**flatten(self.recipe.to_dict()), "recipe_hash": self.recipe.hash()}
        try:
            acc.init_trackers(self.group or self.recipe.name or "peftkit", config=config,
                              init_kwargs=self.init_kwargs())
        except Exception as e:
            self.acc = None
            raise TrackerError(f"output.report_to: {', '.join(self.names)} cannot start: {_one_line(e)}") from None

    def log(self, rec: dict, step: int | None = None) -> None:
        if self.acc is None or self.failed:
            return
        values = dict(scalars(rec))
        if values:
            try:
                self.acc.log(values, step=rec.get("step") if step is None else step)
            except Exception as e:  # a tracker (server gone, disk full) never costs the run
                self._lost(e)

    def _lost(self, e: Exception) -> None:
        self.failed = True
        warn(f"output.report_to: {', '.join(self.names)} failed mid-run, training goes on without it "
             f"(log.jsonl and result.json are complete): {_one_line(e)}")

    def finish(self, files: list[Path] = ()) -> None:
        """Log ``files`` (result.json, ...) as artifacts, then close every tracker.

        Not ``accelerator.end_training()``: that also destroys the process group, which the
        trainer (and a DDP caller after it) still uses.
        """
        if self.acc is None:
            return
        for t in self.acc.trackers:
            try:
                if not self.failed:
                    log_artifacts(t.name, [Path(f) for f in files if Path(f).exists()], getattr(t, "tracker", None))
                t.finish()
            except Exception as e:
                if not self.failed:
                    self._lost(e)
        self.acc.trackers.clear()
        self.acc = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {text[0].strip() if text else ''}"[:300]


def check(names: list[str]) -> None:
    """Each tracker's store reachable as the user set it up, or one TrackerError line."""
    if "mlflow" in names:
        check_mlflow()
    if "wandb" in names:
        check_wandb()


def check_mlflow() -> None:
    """MLflow as configured: the default ``sqlite:///mlflow.db`` (needs full mlflow: sqlalchemy
    and alembic), a ``file:`` store, or a server; one cheap call proves it answers."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith("file:") or (uri and "://" not in uri and not uri.startswith("databricks")):
        # The user chose a file store; MLflow 3 refuses one unless this switch is on.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    # A server that is down: one try, 10 s, not MLflow's minutes of retries.
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        from mlflow import MlflowClient

        MlflowClient().search_experiments(max_results=1)
        MlflowClient()._get_registry_client()  # the registry store: where mlflow-skinny fails on sqlite
    except Exception as e:
        where = uri or f"the default store {_default_mlflow_uri()}"
        hint = (" (pip install 'peftkit[trackers]': full mlflow reads sqlite stores)"
                if "sqlite" in where and "Unsupported" in type(e).__name__ else "")
        raise TrackerError(f"output.report_to: mlflow cannot use {where}: {_one_line(e)}{hint}") from None
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _default_mlflow_uri() -> str:
    try:
        from mlflow.tracking._tracking_service.utils import _get_default_tracking_uri

        return _get_default_tracking_uri()
    except Exception:
        return "sqlite:///mlflow.db"


def check_wandb() -> None:
    """W&B offline/disabled needs nothing; online needs a login (an API key)."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return
    if os.environ.get("WANDB_API_KEY"):
        return
    try:
        import wandb

        wandb.Api()  # raises UsageError when no API key is configured (no network call)
    except Exception as e:
        raise TrackerError(f"output.report_to: wandb is online but cannot start ({_one_line(e)}); "
                           "wandb login, WANDB_API_KEY, or WANDB_MODE=offline") from None


def log_artifacts(name: str, files: list[Path], run=None) -> None:
    """Files as artifacts of the tracker's active run (MLflow run, W&B run)."""
    if not files:
        return
    if name == "mlflow":
        import mlflow

        for f in files:
            mlflow.log_artifact(str(f))
    elif name == "wandb" and run is not None:
        import wandb

        art = wandb.Artifact(f"{run.id}-files", type="peftkit-result")
        for f in files:
            art.add_file(str(f))
        run.log_artifact(art)


@contextmanager
def compare_group(name: str, names: set[str], files=lambda: []):
    """Group the runs started inside (subprocesses too) under ``name``; afterwards log
    ``files()`` (the report) to the group: the MLflow parent run, a W&B ``report`` run."""
    check(sorted(names))  # before any run starts: a tracker that cannot start is one line, not N failed runs
    saved = {k: os.environ.get(k) for k in (GROUP_ENV, PARENT_ENV)}
    os.environ[GROUP_ENV] = name
    client, parent = _mlflow_parent(name) if "mlflow" in names else (None, None)
    if parent is not None:
        os.environ[PARENT_ENV] = parent
    ok = False
    try:
        yield
        ok = True
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        report = [Path(f) for f in files() if Path(f).exists()]
        if parent is not None:
            for f in report:
                client.log_artifact(parent, str(f))
            client.set_terminated(parent, "FINISHED" if ok else "FAILED")
        if "wandb" in names and report:
            import wandb

            run = wandb.init(project=name, group=name, name=f"{name}/report", job_type="report")
            log_artifacts("wandb", report, run)
            run.finish()


def _mlflow_parent(name: str):
    """(client, run id) of a new parent run; not the process's active run, so runs trained in
    this same process (the Python API) start their own."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", name)  # the children's experiment, as accelerate picks it
    exp = client.get_experiment_by_name(exp_name)
    exp_id = exp.experiment_id if exp is not None else client.create_experiment(exp_name)
    run = client.create_run(exp_id, run_name=name, tags={"peftkit.kind": "compare"})
    return client, run.info.run_id
