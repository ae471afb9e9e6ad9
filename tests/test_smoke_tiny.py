import json

import yaml

from conftest import run_cli, tiny_recipe


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
        assert 0.0 <= res["metrics"]["eval"]["accuracy"] <= 1.0
        assert (out / "strategy.safetensors").exists()
