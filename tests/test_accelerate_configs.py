"""The accelerate config files under recipes/accelerate/ parse with accelerate's own classes."""

from pathlib import Path

import pytest
import yaml

from conftest import ROOT

CONFIGS = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))


def test_configs_present():
    names = {p.name for p in CONFIGS}
    assert {"ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml", "deepspeed-zero3.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    raw = yaml.safe_load(path.read_text())
    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    # peftkit's train.precision decides the autocast, so the launcher must not add its own.
    assert cfg.mixed_precision == "no" and cfg.num_machines == 1
    kind = raw["distributed_type"]
    assert cfg.distributed_type.value == kind
    if kind == "FSDP":
        fc = cfg.fsdp_config
        assert fc["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fc["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the strategy's tensors are gathered on rank 0
        if fc["fsdp_version"] == 1:
            assert fc["fsdp_use_orig_params"] is True  # frozen + trainable in one flat parameter
    if kind == "DEEPSPEED":
        dc = cfg.deepspeed_config
        assert dc["zero_stage"] in (2, 3) and dc["gradient_accumulation_steps"] == "auto"
        if dc["zero_stage"] == 3:
            assert dc["zero3_save_16bit_model"] is True


def test_fsdp_plugin_accepts_config():
    """The FSDP keys are ones accelerate's plugin understands (env the launcher would set)."""
    import os

    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "x.py"])
    from accelerate.commands.launch import _validate_launch_command

    args, *_ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    old = dict(os.environ)
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))})
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    finally:
        os.environ.clear()
        os.environ.update(old)
