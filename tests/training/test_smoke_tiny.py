import pytest
import json

import yaml
from safetensors.torch import load_file

from conftest import run_cli, tiny_recipe


@pytest.mark.slow  # 27 s; the CLI train path is also covered by test_prefix, test_foundation and test_api
def test_train_tiny_end_to_end(tiny_models, sentiment_dir, tmp_path):
    for kind in ("bert", "llama"):
        rec = tmp_path / f"{kind}.yaml"
        rec.write_text(yaml.safe_dump(tiny_recipe(tiny_models[kind], sentiment_dir, "lora")))
        out = tmp_path / f"run-{kind}"
        p = run_cli("train", str(rec), "--out", str(out))
        assert p.returncode == 0, p.stderr
        res = json.loads((out / "result.json").read_text())
        assert res["schema"] == "peftkit.result/1"
        assert res["params"]["trainable"] < res["params"]["total"]
        ev = res["metrics"]["eval"]
        assert ev["examples"] == 32 and res["metrics"]["eval_split"] == "test"
        assert (ev["accuracy"] * 32).is_integer()  # a share of the 32 test examples, not a made-up number
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        losses = [x["loss"] for x in log if "loss" in x]
        # log_every 10 > 4 steps: one line at the last step, the mean loss of all four.
        assert [x["step"] for x in log if "loss" in x] == [4] and all(0 < x < 10 for x in losses)
        assert res["speed"]["steps"] == 4 and res["metrics"]["train_loss"] == losses[-1]
        sd = load_file(out / "strategy.safetensors")  # LoRA factors and the new head, nothing else
        assert len(sd) == res["artifact"]["tensors"] and any("lora_A" in k for k in sd)
        assert all(any(p in k for p in (".lora_", ".classifier.", ".score.", ".pooler.")) for k in sd), sorted(sd)
