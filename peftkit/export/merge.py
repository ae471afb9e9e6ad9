"""Export a run: fold the strategy into plain transformers weights, save, verify.

The run is rebuilt from its directory as it was trained, with the strategy's weights
(``rundir.load_trained``). Then:

* a mergeable strategy is merged (``Strategy.merge``) and saved with its tokenizer: a
  directory that ``AutoModelFor<Task>.from_pretrained`` loads with transformers alone;
* a quantized backbone (QLoRA) is dequantized first (bitsandbytes' ``dequantize_4bit``
  through ``PreTrainedModel.dequantize``) and the LoRA deltas are merged into those
  weights. They are the weights the adapters were trained against, so the export computes
  the trained function; merging into the original full-precision weights would put the
  4-bit rounding error back under adapters that learned around it. verify.json measures
  both (``merge_base``);
* ``adapter_only`` writes the strategy alone: peft's adapter format for peft strategies,
  the strategy's safetensors otherwise, each with the recipe and tokenizer, so
  ``Predictor.load`` (and this module) can rebuild the model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from peftkit import hardware, strategies
from peftkit.model.backbone import DTYPES
from peftkit.errors import UserError
from peftkit.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, save_safetensors, sha256_file
from peftkit.export.model_card import write as write_card
from peftkit.training.rundir import EXPORT_JSON, RECIPE, RESULT, WEIGHTS, load_trained, read_recipe
VERIFY_SCHEMA = "peftkit.verify/1"
# Allowed max |Δlogit| between the trained model and its export, by the lowest precision
# either side computes in: ATOL, or RTOL x the largest trained logit if that is more. An
# fp32 merge differs only by float rounding (~1e-6 on MiniLM); bf16 (8-bit mantissa) and
# fp16 (11-bit) round every weight and activation. Measured worst cases (tests, MiniLM
# quickstart runs) are several times inside these.
ATOL = 1e-4
RTOL = {"fp32": 0.0, "fp16": 1e-2, "bf16": 5e-2}
_RANK = ["bf16", "fp16", "fp32"]
# --verify also evaluates the export on the run's whole eval split and compares its primary
# metric with the one result.json recorded: allowed |Δ| = max(METRIC_ATOL[precision], 1/examples),
# precision the lowest of the export's and the training's (one example may flip on a near-tie
# through float rounding; bf16/fp16 round every weight). Tampered weights that still parse move
# the metric far beyond this (and fail their sha256 check first).
METRIC_ATOL = {"fp32": 0.0, "fp16": 0.01, "bf16": 0.02}


class NotMergeable(UserError):
    pass


def is_peft(model) -> bool:
    peft = sys.modules.get("peft")  # not imported -> cannot be a peft model
    return peft is not None and isinstance(model, peft.PeftModel)


# -- checks before any weight is loaded ---------------------------------------------------
def check_out_dir(out: Path, force: bool) -> None:
    """An existing non-empty --out is refused unless forced; nothing is created here."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out}: directory is not empty (use --force to overwrite)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK):
        raise UserError(f"--out {out}: {parent} is not writable")


def check(run_dir: str | Path, out: str | Path, adapter_only: bool = False, dtype: str = "fp32"):
    run_dir, out = Path(run_dir), Path(out)
    recipe = read_recipe(run_dir)
    r_run, r_out = run_dir.resolve(), out.resolve()
    if r_out == r_run or r_out in r_run.parents or r_run in r_out.parents:
        raise UserError(f"--out {out}: must not be the run directory, inside it, or contain it")
    scls = strategies.REGISTRY[recipe.strategy.name]
    if not scls.can_merge and not adapter_only:
        raise NotMergeable(
            f"strategy '{scls.name}' cannot be folded into plain transformers weights; "
            f"use --adapter-only to export it for peftkit (recipe + strategy weights + tokenizer)"
        )
    if adapter_only and dtype != "fp32":
        raise UserError("--dtype applies to merged weights; --adapter-only writes the strategy's weights as trained")
    return recipe


# -- running both models on the same examples ---------------------------------------------
def device_of(model) -> torch.device:
    return next(model.parameters()).device


def eval_batches(built, n: int, batch_size: int = 16) -> list[dict]:
    """The first ``n`` examples of the run's eval split, collated as in training."""
    ds = built.task.datasets()[built.recipe.train.eval_split]
    ds = ds.select(range(min(n, len(ds))))
    rows = [ds[i] for i in range(len(ds))]
    return [built.task.collate(rows[k : k + batch_size]) for k in range(0, len(rows), batch_size)]


@torch.no_grad()
def run_model(model, task, batches) -> dict:
    """Logits ([positions, C], float32 on CPU; positions from ``task.logit_mask``) and the task's metrics."""
    from accelerate.utils import send_to_device

    model.eval()
    dev = device_of(model)
    logits, preds, refs = [], [], []
    for b in batches:
        b = send_to_device(b, dev)
        # Teacher-forced forward: the tensors a model takes (labels give T5 its decoder inputs),
        # not the generation prompts (gen_*) or python lists (references, truncated tails).
        out = model(**{k: v for k, v in b.items() if torch.is_tensor(v) and not k.startswith("gen_")}).logits
        mask = task.logit_mask(b)
        logits.append((out if mask is None else out[mask]).float().cpu())
        del out
        p, r = task.eval_step(model, b)
        preds += p
        refs += r
    return {"logits": logits, "metrics": task.metrics(preds, refs), "device": dev}


def compare(ref: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """max/mean |Δlogit| and argmax agreement over the compared positions (examples or tokens)."""
    a, b = torch.cat(ref), torch.cat(other)
    d = (a - b).abs()
    agree = a.argmax(-1) == b.argmax(-1)
    top2 = a.topk(min(2, a.shape[-1]), -1).values
    margin = top2[:, 0] - top2[:, -1]
    return {
        "max_abs_logit_diff": float(d.max()),
        "mean_abs_logit_diff": float(d.mean()),
        "max_abs_logit": float(a.abs().max()),
        "argmax_agreement": float(agree.float().mean()),
        "positions": int(a.shape[0]),
        # Reference margin (top-1 minus top-2 logit) of each disagreement: a flip on a
        # margin smaller than the logit tolerance is rounding, not a different model.
        "disagreement_margins": [float(x) for x in margin[~agree]],
    }


def precision_of(recipe, dtype: str, merged: bool, device: torch.device) -> str:
    """The lowest precision the trained model or the export computes in."""
    if not merged:
        return "fp32"  # the same model rebuilt: identical arithmetic
    precs = [dtype, recipe.model.dtype]
    if recipe.model.quantization != "none":
        precs.append(hardware.compute_dtype(recipe))
        if device.type == "cpu":
            precs.append("bf16")  # bitsandbytes' CPU 4-bit inference kernel computes in bf16
    return min(precs, key=_RANK.index)


def tolerance(precision: str, max_abs_logit: float) -> float:
    return max(ATOL, RTOL[precision] * max_abs_logit)


def passed(cmp: dict, precision: str, tol: float) -> bool:
    if cmp["max_abs_logit_diff"] > tol:
        return False
    if precision == "fp32":
        return cmp["argmax_agreement"] == 1.0
    return all(m <= 2 * tol for m in cmp["disagreement_margins"])


# -- export -------------------------------------------------------------------------------
def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def _save_adapter(built, dest: Path) -> str:
    from peftkit.recipe import dump_yaml

    if is_peft(built.model):
        built.model.save_pretrained(dest)  # adapter_config.json + adapter_model.safetensors
        fmt = "peft"
    else:
        save_safetensors(dest / WEIGHTS, built.strategy.state_dict(built.model))
        fmt = "peftkit"
    atomic_write_text(dest / RECIPE, dump_yaml(built.recipe))
    return fmt


def export(run_dir: str | Path, out: str | Path, dtype: str = "fp32", verify: bool = False,
           adapter_only: bool = False, verify_examples: int = 64) -> dict:
    """Export ``run_dir`` into ``out`` (replaced atomically); returns a summary dict.

    With ``verify`` the export is reloaded fresh and compared with the trained model on
    ``verify_examples`` eval examples; the report is ``out/verify.json`` and ``summary['verify']``.
    """
    run_dir, out = Path(run_dir), Path(out)
    recipe = check(run_dir, out, adapter_only, dtype)
    built = load_trained(run_dir)
    task = built.task
    quantized = recipe.model.quantization != "none"
    batches = ref = None
    if verify:
        batches = eval_batches(built, verify_examples)
        ref = run_model(built.model, built.task, batches)
    # The run's own hash (result.json), not the re-read recipe's: that one carries the label
    # names result.json added, so it hashed differently and the card and peftkit.json disagreed.
    meta = {"schema": "peftkit.export/1", "source_run": str(run_dir.resolve()), "recipe_hash": run_hash(run_dir, recipe),
            "strategy": recipe.strategy.name, "task": recipe.task.kind,
            "max_length": getattr(recipe.task, "max_length", None),
            # What prediction needs of the task: label names, prompt template, chat template, lengths.
            "task_config": recipe.task.model_dump(mode="json")}
    with atomic_dir(out) as tmp:
        if adapter_only:
            meta.update(format=_save_adapter(built, tmp), merged=False)
        else:
            if quantized:
                built.model = None  # free the 4-bit model before building the dequantized one
                built = load_trained(run_dir, base="dequantized")
            model = built.strategy.merge(built.model).to(DTYPES[dtype])
            model.save_pretrained(tmp)
            meta.update(format="transformers", merged=True, dtype=dtype,
                        merge_base="dequantized-" + recipe.model.quantization if quantized else "full-precision")
            del model
        built.tokenizer.save_pretrained(tmp)
        # Every weights file's sha256, checked by predict and --verify before they load it.
        meta["sha256"] = {f.name: sha256_file(f) for f in sorted(tmp.glob("*.safetensors"))}
        atomic_write_json(tmp / EXPORT_JSON, meta)
    del built
    summary = {**meta, "out": str(out), "bytes": _dir_bytes(out), "files": sorted(p.name for p in out.iterdir())}
    if verify:
        summary["verify"] = _verify(run_dir, out, recipe, task, meta, batches, ref, dtype)
    summary["model_card"] = write_card(out, run_dir, summary)  # README.md: a Hub model card
    return summary


def run_hash(run_dir: Path, recipe) -> str:
    """The recipe hash the run recorded (result.json), the one every artifact shows."""
    if (run_dir / RESULT).is_file():
        if h := (read_json(run_dir / RESULT).get("run") or {}).get("recipe_hash"):
            return h
    return recipe.hash()


def verify(run_dir: str | Path, out: str | Path, verify_examples: int = 64) -> dict:
    """Compare an existing export with the run it came from; writes ``out/verify.json``."""
    run_dir, out = Path(run_dir), Path(out)
    try:
        meta = json.loads((out / EXPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{out / EXPORT_JSON}: not a peftkit export ({e})") from None
    built = load_trained(run_dir)
    batches = eval_batches(built, verify_examples)
    ref = run_model(built.model, built.task, batches)
    return _verify(run_dir, out, built.recipe, built.task, meta, batches, ref, meta.get("dtype") or "fp32")


def _verify(run_dir: Path, out: Path, recipe, task, meta: dict, batches, ref, dtype: str) -> dict:
    from peftkit.export.predict import Predictor

    exported = Predictor.load(out)  # fresh from disk: plain transformers for a merged export
    got = run_model(exported.model, task, batches)
    cmp = compare(ref["logits"], got["logits"])
    precision = precision_of(recipe, dtype, meta["merged"], ref["device"])
    tol = tolerance(precision, cmp["max_abs_logit"])
    report = {
        "schema": VERIFY_SCHEMA,
        "run": str(run_dir.resolve()),
        "export": str(out.resolve()),
        "strategy": recipe.strategy.name,
        "merged": meta["merged"],
        "dtype": dtype if meta["merged"] else None,
        "split": recipe.train.eval_split,
        "examples": sum(len(b["input_ids"]) for b in batches),
        "reference": "the run's model rebuilt from recipe.yaml + strategy weights, fp32 forward "
                     "(4-bit layers compute in model.compute_dtype)",
        **cmp,
        "metrics": {"trained": ref["metrics"], "exported": got["metrics"]},
        "tolerance": {"precision": precision, "max_abs_logit_diff": tol,
                      "rule": f"max({ATOL:g}, {RTOL[precision]:g} x max |trained logit|)",
                      "argmax": "100% agreement" if precision == "fp32" else
                                "disagreements only where the reference margin <= 2 x tolerance"},
    }
    report["metric_check"] = metric_check(run_dir, exported.model, task, recipe, precision)
    report["passed"] = passed(cmp, precision, tol) and report["metric_check"].get("passed", True)
    if meta["merged"] and recipe.model.quantization != "none":
        report["merge_base"] = {"used": meta["merge_base"], "alternative": _original_base_error(run_dir, dtype, batches, ref)}
    atomic_write_json(out / "verify.json", report)
    return report


@torch.no_grad()
def metrics_only(model, task, batches) -> dict:
    from accelerate.utils import send_to_device

    model.eval()
    preds, refs = [], []
    for b in batches:
        p, r = task.eval_step(model, send_to_device(b, device_of(model)))
        preds += p
        refs += r
    return task.metrics(preds, refs)


def metric_check(run_dir: Path, model, task, recipe, precision: str) -> dict:
    """The export's primary metric on the run's whole eval split vs the one result.json recorded."""
    res = read_json(run_dir / RESULT) if (run_dir / RESULT).is_file() else {}
    m = res.get("metrics") or {}
    name = m.get("primary_metric") or task.primary_metric
    recorded = (m.get("eval") or {}).get(name)
    if not isinstance(recorded, (int, float)):
        return {"skipped": f"{run_dir / RESULT} records no {name} to compare with"}
    ds = task.datasets()[m.get("eval_split") or recipe.train.eval_split]
    rows = [ds[i] for i in range(len(ds))]
    got = metrics_only(model, task, [task.collate(rows[k : k + 16]) for k in range(0, len(rows), 16)]).get(name)
    trained = ((res.get("run") or {}).get("precision") or {}).get("resolved", "fp32")
    prec = min([precision, trained if trained in _RANK else "fp32"], key=_RANK.index)
    tol = max(METRIC_ATOL[prec], 1 / max(1, len(rows)))
    ok = isinstance(got, (int, float)) and abs(got - recorded) <= tol + 1e-9
    return {"metric": name, "recorded": recorded, "exported": got, "examples": len(rows),
            "tolerance": tol, "rule": f"max({METRIC_ATOL[prec]:g} ({prec}), 1/examples)", "passed": ok}


def _original_base_error(run_dir: Path, dtype: str, batches, ref) -> dict:
    """What merging into the original full-precision weights would have given."""
    built = load_trained(run_dir, base="original")
    model = built.strategy.merge(built.model).to(DTYPES[dtype])
    got = run_model(model, built.task, batches)
    cmp = compare(ref["logits"], got["logits"])
    return {"base": "original-full-precision", "max_abs_logit_diff": cmp["max_abs_logit_diff"],
            "mean_abs_logit_diff": cmp["mean_abs_logit_diff"], "argmax_agreement": cmp["argmax_agreement"],
            "metrics": got["metrics"]}
