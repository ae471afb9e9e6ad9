"""Which classification head for a frozen backbone: frozen pooler, trained pooler, or mean pooling.

all-MiniLM-L6-v2 was trained (sentence-transformers) with mean pooling: its CLS -> pooler.dense
-> tanh path was never tuned. A strategy that freezes the backbone (LoRA here) classifies
through that path unless the pooler belongs to the head. Three heads, same everything else
(MiniLM, fp32, 2,000 SST-2 sentences, batch 32, one epoch = 63 steps, lr 5e-4, r 8, alpha 16):

* ``frozen``: ``task.train_pooler=false`` (peftkit before this change);
* ``pooler``: the pooler trains with the head (``task.train_pooler=true``, the new default);
* ``mean``: the pooler replaced by a masked mean over tokens (how the checkpoint was trained).

    python benchmarks/pooler_head.py --seeds 0 1 2         # writes benchmarks/results/pooler_head.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


class MeanPool:
    """Replaces BertModel.pooler: masked mean of the last hidden states (no parameters)."""

    @staticmethod
    def install(model):
        import torch

        bert = model.get_submodule("bert")
        state = {}

        def grab(mod, args, kwargs):
            state["mask"] = kwargs.get("attention_mask")

        class Pool(torch.nn.Module):
            def forward(self, hidden):
                m = state["mask"].unsqueeze(-1).to(hidden.dtype)
                return (hidden * m).sum(1) / m.sum(1).clamp(min=1)

        bert.register_forward_pre_hook(grab, with_kwargs=True)
        bert.pooler = Pool()


def worker(spec: dict) -> dict:
    from peftkit import recipe as R
    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    rec = R.from_dict({
        "model": {"name": "builtin:minilm", "compute_dtype": "fp32"},
        "task": {"kind": "classification", "max_length": 128, "text_column": "sentence", "label_column": "label",
                 "train_pooler": spec["head"] == "pooler",
                 "data": common.sst2_data_section(spec["n_train"], None, Path(spec["data"]))},
        "strategy": {"name": spec["strategy"], **({"r": 8, "alpha": 16} if spec["strategy"] == "lora" else {})},
        "train": {"seed": spec["seed"], "epochs": 1, "batch_size": 32, "lr": spec["lr"], "precision": "fp32",
                  "progress": False, "checkpoint_every": None},
        "output": {"save_weights": False, "report_to": []},
    })
    built = build(rec, apply_strategy=False)
    if spec["head"] == "mean":
        MeanPool.install(built.model)
    built.model = built.strategy.apply(built.model, built.task.head(built.model))
    with tempfile.TemporaryDirectory() as d:
        res = Trainer(built, d).fit()
    return {"accuracy": res["metrics"]["eval"]["accuracy"], "trainable": res["params"]["trainable"],
            "steps": res["speed"]["steps"], "train_s": res["speed"]["train_s"]}


def markdown(data: dict, env: dict) -> str:
    a = data["args"]
    lines = [f"# Classification head with a frozen backbone ({a['strategy']}, MiniLM, SST-2)", "",
             f"{a['n_train']} train sentences, batch 32, one epoch, fp32, lr {a['lr']}, test = SST-2 dev "
             "(872 sentences). Accuracy per seed.", "",
             "| head | trainable params | " + " | ".join(f"seed {s}" for s in a["seeds"]) + " | mean ± std |",
             "|---|---|" + "---|" * len(a["seeds"]) + "---|"]
    for head, rs in data["by_head"].items():
        accs = [r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {head} | {rs[0]['trainable']:,} | " + " | ".join(f"{x:.3f}" for x in accs)
                     + f" | {statistics.fmean(accs):.3f} ± {sd:.3f} |")
    lines += ["", f"Total wall time {data['wall_s'] / 60:.1f} min on a shared machine "
              f"(load average at the end {', '.join(f'{x:.2f}' for x in data['loadavg_end'])}).", "",
              "## Environment", *common.env_lines(env), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--heads", nargs="+", default=["frozen", "pooler", "mean"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--strategy", default="lora")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--data", type=Path, default=common.SST2)
    p.add_argument("--name", default="pooler_head")
    args = p.parse_args(argv)
    if args.worker:
        import peftkit  # noqa: F401

        common.quiet()
        common.emit(worker(json.loads(args.worker)))
        return 0
    env, t0 = common.environment(), time.time()
    by_head: dict = {}
    for seed in args.seeds:
        for head in args.heads:
            spec = {"head": head, "seed": seed, "strategy": args.strategy, "lr": args.lr, "n_train": args.n_train,
                    "data": str(args.data)}
            r = common.run_worker(Path(__file__).resolve(), spec)
            by_head.setdefault(head, []).append({"seed": seed, **r})
            print(f"{head:7s} seed {seed}: accuracy {r['accuracy']:.4f} ({r['train_s']:.0f} s)", flush=True)
    data = {"schema": "peftkit.bench.pooler_head/1", "args": {k: str(v) if isinstance(v, Path) else v
                                                              for k, v in vars(args).items()},
            "by_head": by_head, "wall_s": time.time() - t0}
    import os

    data["loadavg_end"] = os.getloadavg()
    data["env"] = env
    common.publish(args.name, data, markdown(data, env), common.RESULTS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
