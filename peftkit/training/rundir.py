"""What a run directory holds, the rules for reusing one, and loading a trained run.

``peftkit train --out RUN`` writes ``RECIPE`` (the resolved recipe), ``LOG``, ``tb/``,
``checkpoints/step-N/`` while it runs, and at the end ``WEIGHTS`` (unless
``output.save_weights: false``) and ``RESULT``. An ``--adapter-only`` export holds
``RECIPE`` and ``WEIGHTS`` or peft's ``ADAPTER``. ``export`` and ``predict`` both load runs
from here, so neither imports the other for it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peftkit.training.checkpoint import DIR as CHECKPOINTS
from peftkit.training.checkpoint import read_manifest, step_dirs
from peftkit.errors import UserError
from peftkit.training.lock import LOCK

RECIPE = "recipe.yaml"
RESULT = "result.json"
WEIGHTS = "strategy.safetensors"
ADAPTER = "adapter_model.safetensors"  # peft's adapter format (an --adapter-only export)
LOG = "log.jsonl"
EXPORT_JSON = "peftkit.json"  # an export's metadata (peftkit.export.merge), with its files' sha256
# What a run directory holds while a run is unfinished; anything else makes it "not ours".
RUN_FILES = {LOG, RECIPE, WEIGHTS, "tb", CHECKPOINTS, "predictions.json"}  # an unfinished run may hold these
OUTPUTS = RUN_FILES | {RESULT}


# -- reusing a directory for `peftkit train`, checked before any weight is loaded -----------
def _recipe_yaml_hash(path: Path) -> str | None:
    import yaml

    from peftkit.recipe import from_dict

    try:
        return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}).hash()
    except Exception:  # noqa: BLE001 - any unreadable/old recipe.yaml is "not this recipe"
        return None


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if not out.exists():
        parent = next(p for p in out.absolute().parents if p.exists())
        if not parent.is_dir():
            raise UserError(f"--out {out}: cannot create directory ({parent} is not a directory)")
        if not os.access(parent, os.W_OK):
            raise UserError(f"--out {out}: cannot create directory ({parent} is not writable)")
    elif not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: directory is not writable")


def check_run_dir(out: Path, recipe_hash: str, force: bool, resume: bool = True) -> str:
    """Decide what ``peftkit train`` does with ``out``: 'fresh' or 'resume' (or raise).

    Resuming is automatic when ``out`` holds checkpoints of the same recipe hash and no
    result.json, with or without ``--force`` (``compare`` reruns killed runs that way). A
    finished run, another recipe's checkpoints or foreign files are refused unless
    ``--force``, which then starts over (discarding peftkit's own files only).
    """
    _check_writable(out)
    names = {p.name for p in out.iterdir()} - {LOCK} if out.exists() else set()
    if not names:
        return "fresh"
    hashes = {m["recipe_hash"] for p in step_dirs(out / CHECKPOINTS) if (m := read_manifest(p))}
    finished = RESULT in names
    if not force:
        if finished:
            try:
                json.loads((out / RESULT).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise UserError(f"--out {out}: result.json is corrupt ({e.__class__.__name__}: {e}); "
                                "use --force to train again") from None
            raise UserError(f"--out {out}: holds a finished run (result.json); use --force to train again")
        if hashes - {recipe_hash}:
            raise UserError(f"--out {out}: holds checkpoints of a different recipe (hash {', '.join(sorted(hashes))}; "
                            f"this recipe {recipe_hash}); use another --out, or --force to discard them")
        if not names <= RUN_FILES:
            raise UserError(f"--out {out}: directory is not empty (use --force to overwrite)")
        if RECIPE in names and not hashes and _recipe_yaml_hash(out / RECIPE) != recipe_hash:
            raise UserError(f"--out {out}: holds an unfinished run of a different recipe; "
                            "use another --out, or --force to discard it")
    if hashes == {recipe_hash} and not finished and resume:
        return "resume"
    start_over(out)
    return "fresh"


def start_over(out: Path) -> None:
    """Discard peftkit's own files in a run directory (never anything else)."""
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def last_step(d: Path) -> int | None:
    """The step of the newest checkpoint with a readable manifest, None if there is none."""
    steps = [m["step"] for p in step_dirs(Path(d) / CHECKPOINTS) if (m := read_manifest(p))]
    return max(steps) if steps else None


# -- loading a trained run ------------------------------------------------------------------
def read_recipe(d: str | Path):
    """The run's resolved recipe; label names from result.json so no data is needed to load."""
    from peftkit import recipe as R

    d = Path(d)
    if not d.is_dir():
        raise UserError(f"{d}: run directory not found")
    if not (d / RECIPE).is_file():
        raise UserError(f"{d}: not a peftkit run directory (no {RECIPE})")
    r = R.load(d / RECIPE)
    labels = None
    if (d / RESULT).is_file():
        try:
            labels = (json.loads((d / RESULT).read_text(encoding="utf-8")).get("task") or {}).get("labels")
        except (OSError, ValueError) as e:
            raise UserError(f"{d / RESULT}: cannot read ({e})") from None
    if labels and "labels" in type(r.task).model_fields and getattr(r.task, "labels", None) is None:
        data = r.to_dict()
        data["task"]["labels"] = labels
        r = R.from_dict(data, str(d / RECIPE))
    return r


def no_weights(d: Path, recipe) -> UserError:
    """Why a run directory has no weights to load, and what to do about it."""
    step = last_step(d)
    if not (d / RESULT).is_file() and step is not None:
        return UserError(f"{d}: the run stopped at step {step} before it finished (no {WEIGHTS} yet); "
                         f"resume it with the same `peftkit train` command, e.g. "
                         f"peftkit train {d / RECIPE} --out {d}")
    if not (d / RESULT).is_file():
        return UserError(f"{d}: the run did not finish and left no checkpoint; train it again")
    if not recipe.output.save_weights:
        return UserError(f"{d}: trained with output.save_weights: false, so it has no weights to load")
    return UserError(f"{d}: {WEIGHTS} is missing (the finished run wrote it; was it moved or deleted?)")


def recorded_sha256(d: Path, name: str) -> tuple[str | None, str]:
    """(sha256 recorded for ``d/name`` when peftkit wrote it, where): result.json for a run's
    weights, peftkit.json for an export's files; (None, ...) when nothing was recorded."""
    from peftkit.io import read_json

    if name == WEIGHTS and (d / RESULT).is_file():
        art = read_json(d / RESULT).get("artifact") or {}
        return art.get("strategy_sha256"), str(d / RESULT)
    if (d / EXPORT_JSON).is_file():
        return (read_json(d / EXPORT_JSON).get("sha256") or {}).get(name), str(d / EXPORT_JSON)
    return None, ""


def check_weights(d: Path, name: str) -> None:
    """IntegrityError (one line, exit 2) when ``d/name`` is not the file peftkit recorded."""
    from peftkit.io import check_sha256

    expected, where = recorded_sha256(d, name)
    check_sha256(d / name, expected, where)


def read_weights(path: Path) -> dict:
    """A safetensors file's tensors; a corrupt or cut-off file is one line naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read the weights (corrupt or truncated file?): {e}") from None


def load_weights(built, d: Path) -> None:
    st, adapter = d / WEIGHTS, d / ADAPTER
    if st.is_file():
        try:
            built.strategy.load_state_dict(built.model, read_weights(st))
        except ValueError as e:
            raise UserError(f"{st}: {e}") from None
    elif adapter.is_file():
        from peft import set_peft_model_state_dict

        res = set_peft_model_state_dict(built.model, read_weights(adapter))
        if res.unexpected_keys:
            raise UserError(f"{adapter}: weights do not fit the model: unknown {res.unexpected_keys[:3]}")
    else:
        raise no_weights(d, built.recipe)


def load_trained(d: str | Path, base: str = "as-trained"):
    """Rebuild a run (or an adapter-only export) with its trained weights, in eval mode.

    ``base``: ``as-trained`` (quantized if the run was); ``dequantized`` (a quantized
    backbone turned into plain linears holding the dequantized weights before the strategy
    is applied); ``original`` (the backbone's full-precision weights, no quantization).
    """
    from peftkit.model.backbone import DTYPES
    from peftkit.model.build import build

    d = Path(d)
    recipe = read_recipe(d)
    if not (d / WEIGHTS).is_file() and not (d / ADAPTER).is_file():
        raise no_weights(d, recipe)  # before minutes of model loading
    check_weights(d, WEIGHTS if (d / WEIGHTS).is_file() else ADAPTER)  # also before loading
    quantized = recipe.model.quantization != "none"
    if base == "original" and quantized:
        # model_copy skips validation: a qlora recipe without quantization would not validate.
        recipe = recipe.model_copy(update={"model": recipe.model.model_copy(update={"quantization": "none"})})
    if base == "dequantized" and quantized:
        built = build(recipe, apply_strategy=False)
        model = built.model.dequantize(dtype=DTYPES[recipe.model.dtype])
        built.model = built.strategy.apply(model, built.head)
    else:
        built = build(recipe)
    load_weights(built, d)
    built.model.eval()
    return built
