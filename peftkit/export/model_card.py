"""A Hub-style model card (README.md with YAML metadata) for an export, and the Hub upload.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData`` from the run's result.json,
the export summary and its verify report.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from peftkit import tasks
from peftkit.errors import UserError
from peftkit.io import atomic_write_text

# Builtin weights are copies of these Hub models.
HUB_IDS = {"builtin:minilm": "sentence-transformers/all-MiniLM-L6-v2",
           "builtin:smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(name: str) -> str | None:
    """The Hub repo id of a recipe's ``model.name`` (None for a local directory)."""
    if name in HUB_IDS:
        return HUB_IDS[name]
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not Path(name).exists() else None


def task_class(result: dict) -> type[tasks.Task]:
    """The task kind of a run (its pipeline tag and Auto class are the kind's own declarations)."""
    kind = result["run"]["recipe"]["task"]["kind"]
    if kind not in tasks.REGISTRY:
        raise UserError(f"model card: task kind '{kind}' of this run is not known to this peftkit "
                        f"(known: {', '.join(tasks.REGISTRY)})")
    return tasks.REGISTRY[kind]


def card_data(summary: dict, result: dict):
    from huggingface_hub import EvalResult, ModelCardData

    rec = result["run"]["recipe"]
    kind = rec["task"]["kind"]
    pipeline = task_class(result).pipeline_tag
    ev = {k: v for k, v in (result.get("metrics", {}).get("eval") or {}).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("eval_") and k != "examples"}
    source = (rec["task"].get("data") or {}).get("source") or "local files"
    split = result.get("metrics", {}).get("eval_split")
    evals = [EvalResult(task_type=pipeline, dataset_type=source, dataset_name=rec.get("name") or source,
                        dataset_split=split, metric_type=k, metric_value=v) for k, v in ev.items()]
    v = summary.get("verify")
    peft_format = not summary.get("merged") and summary.get("format") == "peft"
    return ModelCardData(
        base_model=hub_id(rec["model"]["name"]), library_name="peft" if peft_format else "transformers",
        pipeline_tag=pipeline, tags=["peftkit", rec["strategy"]["name"], kind,
                                     "merged" if summary.get("merged") else "adapter"],
        metrics=list(ev), eval_results=evals or None,
        # the Hub requires a model name with eval results: the recipe's, else what was tuned for what
        model_name=rec.get("name") or f"{Path(rec['model']['name']).name}-{kind}-{rec['strategy']['name']}",
        peftkit={"strategy": rec["strategy"], "recipe_hash": result["run"].get("recipe_hash"),
                 "merged": summary.get("merged"), "dtype": summary.get("dtype"),
                 "verify": None if v is None else {k: v.get(k) for k in (
                     "passed", "examples", "max_abs_logit_diff", "argmax_agreement")}})


def _body(summary: dict, result: dict) -> str:
    rec = result["run"]["recipe"]
    kind, strat = rec["task"]["kind"], rec["strategy"]
    params = result.get("params", {})
    ev = result.get("metrics", {}).get("eval") or {}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in ev.items() if isinstance(v, float) and not k.startswith("eval_"))
    settings = "\n".join(f"| `{k}` | `{json.dumps(x)}` |" for k, x in strat.items())
    v = summary.get("verify")
    verify = ("Not verified (export without `--verify`)." if v is None else
              f"{'Passed' if v['passed'] else 'FAILED'} on {v['examples']} examples: max |Δlogit| "
              f"{v['max_abs_logit_diff']:.2e} (tolerance {v['tolerance']['max_abs_logit_diff']:.0e}), "
              f"argmax agreement {100 * v['argmax_agreement']:.1f}%.")
    auto = task_class(result).auto_class_name
    load = (f"from transformers import AutoTokenizer, {auto}\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("REPO_OR_DIR")\n'
            f'model = {auto}.from_pretrained("REPO_OR_DIR")') if summary.get("merged") else (
            'from peftkit.export.predict import Predictor  # adapter-only export: rebuilt from its recipe.yaml\n\n'
            'print(Predictor.load("DIR").predict(["an example input"]))')
    return (f"# {rec.get('name') or 'peftkit model'} ({strat['name']})\n\n"
            f"Fine-tuned from `{rec['model']['name']}` for {kind} with peftkit's **{strat['name']}** strategy "
            f"({params.get('trainable', 0):,} of {params.get('total', 0):,} parameters trained, "
            f"{params.get('trainable_pct', 0):.2f}%)"
            + (", merged into plain transformers weights." if summary.get("merged") else "; adapter only.")
            + f"\n\n## Evaluation ({result.get('metrics', {}).get('eval_split')} split)\n\n| metric | value |\n|---|---|\n"
            + rows + "\n\n## Strategy settings\n\n| key | value |\n|---|---|\n" + settings
            + f"\n\n## Export check\n\n{verify}\n\n## How to load\n\n```python\n{load}\n```\n\n"
            f"Recipe hash `{result['run'].get('recipe_hash')}`; the full recipe is in the run's `result.json`.\n")


def build(summary: dict, result: dict):
    """The ModelCard of an export (``summary``: export's return value; ``result``: the run's result.json)."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_data(summary, result).to_yaml()}\n---\n\n{_body(summary, result)}")


def write(out: str | Path, run_dir: str | Path, summary: dict) -> str | None:
    """README.md in ``out`` from ``run_dir/result.json`` (None when the run has no result.json)."""
    try:
        result = json.loads((Path(run_dir) / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = Path(out) / "README.md"
    atomic_write_text(path, str(build(summary, result)))
    return str(path)


def commit_operations(out: str | Path) -> list:
    """One CommitOperationAdd per file of the export (what :func:`push` uploads)."""
    from huggingface_hub import CommitOperationAdd

    out = Path(out)
    return [CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p))
            for p in sorted(out.rglob("*")) if p.is_file()]


def push(out: str | Path, repo: str, private: bool = True, token: str | None = None) -> dict:
    """Create ``repo`` (a model repo, private by default) if needed and commit the export to it."""
    from huggingface_hub import HfApi

    ops = commit_operations(out)
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo, operations=ops, commit_message="peftkit export", repo_type="model")
    except Exception as e:  # network, auth, a bad repo id: one line; the export itself is complete
        raise UserError(f"--push-to-hub {repo}: upload failed ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); the export in {out} is complete") from None
    return {"repo": repo, "commit": info.oid, "url": info.commit_url, "files": len(ops)}
