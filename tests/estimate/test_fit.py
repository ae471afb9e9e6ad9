"""CUDA fixed costs, the allocator replay (reserved peak), the fit verdict, the cheapest change
and ``train.micro_batch_size: auto`` with a planted device capacity."""

import json

import pytest

from conftest import gen_recipe, instr_dir, run_cli, tiny_recipe  # noqa: F401  (fixture)
from peftkit import recipe as R
from peftkit.errors import UserError
from peftkit.estimate import cuda, fit

MiB = 2**20


# -- CUDA fixed costs ---------------------------------------------------------------------------
def _lines(env):
    return {c["name"]: c for c in cuda.fixed_costs(env)}


def test_workspaces_follow_torch_defaults_and_env():
    hopper = _lines({})  # no GPU here, no PEFTKIT_CUDA_ARCH: an sm90 target is assumed
    assert hopper["cublas_workspace"]["bytes"] == 2 * 32 * MiB and hopper["cublaslt_workspace"]["bytes"] == 2 * MiB
    assert "CublasHandlePool.cpp" in hopper["cublas_workspace"]["source"]
    assert hopper["cuda_context"]["in_allocated"] is False
    ampere = _lines({"PEFTKIT_CUDA_ARCH": "8.6"})  # :4096:2:16:8
    assert ampere["cublas_workspace"]["bytes"] == 2 * (4096 * 1024 * 2 + 16 * 1024 * 8)
    assert _lines({"CUBLAS_WORKSPACE_CONFIG": ":16:8"})["cublas_workspace"]["bytes"] == 2 * 16 * 1024 * 8
    assert _lines({"CUBLAS_WORKSPACE_CONFIG": ":4096:2:16:8"})["cublas_workspace"]["bytes"] == 2 * 8519680
    assert _lines({"TORCH_CUBLASLT_UNIFIED_WORKSPACE": "1"})["cublaslt_workspace"]["bytes"] == 0
    assert _lines({"CUBLASLT_WORKSPACE_SIZE": "4096"})["cublaslt_workspace"]["bytes"] == 2 * 4 * MiB
    # unified sizing: never above the cuBLAS workspace (getCUDABlasLtWorkspaceSize)
    small = _lines({"CUBLAS_WORKSPACE_CONFIG": ":16:8", "CUBLASLT_WORKSPACE_SIZE": "4096"})
    assert small["cublaslt_workspace"]["bytes"] == 2 * 16 * 1024 * 8


# -- the allocator replay ------------------------------------------------------------------------
def test_allocator_rounding_pools_and_reuse():
    sim = cuda.AllocatorSim()
    sim.malloc("a", 1)  # 512 B block in a 2 MiB small segment
    sim.malloc("b", 1000)  # same segment
    assert sim.allocated == 512 + 1024 and sim.reserved == 2 * MiB and len(sim.segments) == 1
    sim.malloc("c", 5 * MiB)  # 1-10 MiB: a 20 MiB large segment
    assert sim.reserved == 22 * MiB
    sim.malloc("d", 4 * MiB)  # the rest of that 20 MiB segment serves it
    assert sim.reserved == 22 * MiB
    sim.malloc("e", 31 * MiB + 1)  # own segment, rounded to 2 MiB
    assert sim.reserved == 22 * MiB + 32 * MiB
    sim.release("e")
    sim.malloc("f", 30 * MiB)  # the cached 32 MiB block: no new segment
    assert sim.reserved == 54 * MiB and sim.peak_reserved == 54 * MiB
    sim.release("f")
    sim.malloc("g", 31 * MiB + 512)  # rest 1 MiB - 512: a large block is split only if the rest > 1 MiB
    assert sim.live["g"].size == 32 * MiB and sim.allocated == 1536 + 9 * MiB + 32 * MiB


def test_allocator_cap_releases_cache_then_ooms():
    sim = cuda.AllocatorSim(cap=64 * MiB)
    sim.malloc("a", 40 * MiB)
    sim.release("a")  # cached, not in use
    sim.malloc("b", 50 * MiB)  # needs a new segment: the cache goes first
    assert sim.releases == 1 and sim.reserved == 50 * MiB
    with pytest.raises(cuda.OutOfMemory):
        sim.malloc("c", 20 * MiB)


def test_expandable_segments_grow_in_pages():
    sim = cuda.AllocatorSim(expandable_segments=True)
    for k in range(3):
        sim.malloc(k, 7 * MiB)  # one large-pool segment, mapped in 20 MiB pages
    assert sim.reserved == 40 * MiB and len(sim.segments) == 1
    plain = cuda.replay([(1, k, 7 * MiB) for k in range(3)], [], [])
    assert plain.reserved == 20 * MiB * 2  # two 20 MiB segments (the third 7 MiB does not fit the first)
    assert cuda.expandable({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    assert not cuda.expandable({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"})


def test_replay_second_step_reuses_the_first_steps_cache():
    step = [(1, 0, 30 * MiB), (1, 1, 3 * MiB), (-1, 0, 0), (1, 2, 30 * MiB), (-1, 1, 0), (-1, 2, 0)]
    one, two = cuda.replay([], step, [], repeats=1), cuda.replay([], step, [], repeats=2)
    assert one.peak_reserved == two.peak_reserved and two.allocated == 0


# -- the estimate on a CUDA target ---------------------------------------------------------------
def test_cuda_estimate_names_its_fixed_costs_and_cpu_is_unchanged(tiny_models, sentiment_dir):
    from peftkit.estimate.trace import Estimator

    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora"))
    cpu = Estimator(r, "cpu").at(4, 32)
    assert not any(k in cpu for k in ("cuda_fixed", "reserved_peak_bytes", "context_bytes"))
    assert "cuda_workspaces" not in cpu["at_peak"]
    gpu = Estimator(r, "cuda").at(4, 32)
    names = {c["name"]: c["bytes"] for c in gpu["cuda_fixed"]}
    inside = names["cublas_workspace"] + names["cublaslt_workspace"]
    assert gpu["peak_bytes"] == gpu["traced_peak_bytes"] + inside and gpu["at_peak"]["cuda_workspaces"] == inside
    assert gpu["reserved_peak_bytes"] >= gpu["peak_bytes"] and gpu["reserved_peak_bytes"] % (2 * MiB) == 0
    assert gpu["device_total_bytes"] == gpu["peak_bytes"] + names["cuda_context"]
    assert gpu["reserved_total_bytes"] == gpu["reserved_peak_bytes"] + names["cuda_context"]


# -- the verdict -----------------------------------------------------------------------------------
def test_verdict_thresholds():
    est = {"peak_bytes": 1000, "reserved_peak_bytes": 1200, "context_bytes": 100}
    assert fit.verdict(est, 1365)["verdict"] == "fits"  # (1200 + 100) x 1.05 = 1365
    assert fit.verdict(est, 1364)["verdict"] == "tight"
    assert fit.verdict(est, 1045)["verdict"] == "tight"  # (1000 + 100) x 0.95 = 1045
    assert fit.verdict(est, 1044)["verdict"] == "does not fit"
    capped = fit.verdict(est, 1260, context=False)  # a memory-fraction cap: the context is outside it
    assert capped["verdict"] == "fits" and not capped["context_counted"]
    assert fit.verdict({"peak_bytes": 1000}, 1050)["verdict"] == "fits"  # CPU: no reserved, no context


class _Linear:
    """A stand-in estimator: peak affine in the micro-batch, reserved 10% above it."""

    def __init__(self, fixed, per_example):
        self.fixed, self.per, self.calls = fixed, per_example, []

    def at(self, b, s, accum=None):
        self.calls.append(b)
        peak = self.fixed + self.per * b
        return {"peak_bytes": peak, "reserved_peak_bytes": int(peak * 1.1), "context_bytes": 0}


def _need(b):  # what "fits" asks of the budget at micro-batch b: reserved + 5%
    return int(1000 + 100 * b * 1.0) * 1.1 * 1.05


@pytest.mark.parametrize("batch,world,cap,expect", [
    (64, 1, _need(16) + 1, 16),  # 16 fits, 32 does not
    (64, 1, _need(16) - 2, 8),
    (24, 1, 10**9, 8),  # the largest power of two dividing 24
    (64, 2, _need(32) + 1, 32),  # per process: 32
    (7, 1, 10**9, 1),
])
def test_choose_micro_batch_largest_fitting_power_of_two(tiny_models, sentiment_dir, batch, world, cap, expect):
    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=batch, micro_batch_size="auto"))
    est = _Linear(1000, 100)
    c = fit.choose_micro_batch(r, fit.Capacity(int(cap), False, "planted"), world=world, estimator=est)
    assert c.micro == expect and c.micro * c.accum * c.world == batch
    assert c.verdict["verdict"] == "fits" and len(est.calls) <= 7  # bisection over the exponents
    if 2 * expect <= batch // world and (batch // world) % (2 * expect) == 0:
        assert fit.verdict(est.at(2 * expect, 32), int(cap), False)["verdict"] != "fits"
    assert c.verdict["reserved_bytes"] == int((1000 + 100 * expect) * 1.1)
    upd = c.train_update()
    assert upd["batch_size"] * upd["grad_accum"] == batch and upd["micro_batch_size"] is None
    assert json.dumps(c.as_dict()) and "largest power of two" in c.line()


def test_micro_batch_nothing_fits_and_fixed_int(tiny_models, sentiment_dir):
    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=16, micro_batch_size="auto"))
    with pytest.raises(UserError, match="train.micro_batch_size: auto: even a micro-batch of 1"):
        fit.choose_micro_batch(r, fit.Capacity(500, False, "planted"), estimator=_Linear(1000, 100))
    r4 = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=16, micro_batch_size=4))
    c = fit.resolve_micro_batch(r4, world=2, capacity=fit.Capacity(1, False, "unused"))
    assert (c.micro, c.accum) == (4, 2) and c.train_update()["batch_size"] == 8
    with pytest.raises(UserError, match="does not divide the per-process batch 8"):
        fit.resolve_micro_batch(r4.model_copy(update={"train": r4.train.model_copy(update={"micro_batch_size": 16})}),
                                world=2, capacity=fit.Capacity(1, False, "x"))
    assert fit.resolve_micro_batch(R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir))) is None


def test_micro_batch_auto_with_planted_device_capacity(tiny_models, sentiment_dir, monkeypatch):
    """The real estimate of a tiny model; the device is planted between micro-batches 4 and 8."""
    from peftkit.estimate.trace import Estimator

    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=32, micro_batch_size="auto"))
    est = Estimator(r, "cpu")  # on a CUDA target a tiny model's 4 and 8 share the same 2 MiB segments
    need = {b: fit.verdict(est.at(b, 32, accum=32 // b), 0, False)["reserved_bytes"] * (1 + fit.MARGIN)
            for b in (4, 8)}
    assert need[8] > need[4]
    cap = int((need[4] + need[8]) / 2)
    monkeypatch.setattr(fit, "device_capacity", lambda: fit.Capacity(cap, False, "planted", "cpu"))
    c = fit.resolve_micro_batch(r, task=est.task)
    assert (c.micro, c.accum) == (4, 8) and c.device_bytes == cap and "planted" in c.why


def test_recipe_micro_batch_validation(tiny_models, sentiment_dir):
    d = tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=16, micro_batch_size=3)
    with pytest.raises(R.RecipeError, match="train.micro_batch_size: 3 does not divide train.batch_size 16"):
        R.from_dict(d)
    d["train"].update(micro_batch_size="auto", grad_accum=2)
    with pytest.raises(R.RecipeError, match="train.grad_accum: leave it at 1"):
        R.from_dict(d)


# -- the cheapest change ---------------------------------------------------------------------------
def test_does_not_fit_names_the_cheapest_change_that_fits(tiny_models, instr_dir):  # noqa: F811
    from peftkit.estimate.trace import Estimator

    r = R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, strategy="full", batch_size=16))
    est = Estimator(r, "cuda")
    at2 = fit.verdict(est.at(2, 40, accum=8), 0, False)["reserved_bytes"]
    budget = int(at2 * 1.06)  # micro-batch 2 fits, 16 does not
    row = fit.fit(r, budget, "cuda", seq=40, context=False)
    assert row["verdict"] == "does not fit" and row["max_batch"] >= 2
    ch = row["change"]
    assert ch["overrides"] == ["train.micro_batch_size=2"] and ch["verdict"] == "fits"
    assert "accumulation" in ch["change"]


def test_below_micro_batch_one_the_schemas_savers_are_re_estimated(tiny_models, instr_dir):  # noqa: F811
    from peftkit.estimate.trace import Estimator

    r = R.from_dict(gen_recipe(tiny_models["llama"], instr_dir, strategy="full", batch_size=16,
                               optimizer="adamw_foreach"))
    cands = [c[1] for c in fit.candidates(r)]
    assert ["model.gradient_checkpointing=true"] in cands and ["task.loss_chunk_tokens=1024"] in cands
    # CPU target: a tiny model's CUDA segments (2 MiB) would hide the savings
    base = Estimator(r, "cpu").at(1, 40, accum=16)
    saved = {tuple(o): Estimator(fit._with(r, o), "cpu").at(1, 40, accum=16) for o in cands[:3]}
    best = min(saved, key=lambda o: saved[o]["peak_bytes"])
    budget = int(saved[best]["peak_bytes"] * 1.06)  # that candidate fits at micro-batch 1
    assert fit.verdict(base, budget, False)["verdict"] != "fits"
    change = fit.cheapest_change(r, budget, "cpu", 16, 40, context=False)
    assert change is not None and change["verdict"] == "fits"
    assert change["overrides"][0] in sum(cands, []) and "train.micro_batch_size=1" in change["overrides"]
    assert cands.index(list(change["overrides"][:-1])) <= cands.index(list(best))  # the cheapest that fits


@pytest.mark.slow  # ~30 s: a CLI process with three fake-model builds
def test_estimate_cli_fit_verdict_json(tiny_models, sentiment_dir, tmp_path):
    import yaml

    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora")))
    p = run_cli("estimate", str(rec), "strategy.name=lora", "--fit", "80GiB", "--device", "cuda", "--json")
    assert p.returncode == 0, p.stderr
    (row,) = json.loads(p.stdout)
    assert row["verdict"] == "fits" and row["reserved_bytes"] >= row["peak_bytes"] and row["margin"] == fit.MARGIN


def test_estimate_of_a_recipe_with_a_micro_batch_traces_its_accumulation(tiny_models, sentiment_dir):
    from peftkit.estimate.trace import Estimator

    d = tiny_recipe(tiny_models["llama"], sentiment_dir, "full", batch_size=16, micro_batch_size=4)
    est = Estimator(R.from_dict(d))
    e = est.at()
    assert (e["batch_size"], e["accumulation"]) == (4, 4)
    one = est.at(4, None, accum=1)  # no accumulation: the gradients are not live in the forward
    assert e["peak_bytes"] > one["peak_bytes"] and one["accumulation"] == 1


def test_trainer_trains_the_chosen_micro_batch_and_records_why(tiny_models, sentiment_dir, monkeypatch, tmp_path):
    """micro_batch_size: auto through a real run: the trainer splits the global batch of 16 as
    the planted device allows, steps as often as the unsplit recipe would, and says so."""
    import json

    from peftkit.model.build import build
    from peftkit.training.trainer import Trainer

    r = R.from_dict(tiny_recipe(tiny_models["llama"], sentiment_dir, "lora", batch_size=16, max_steps=3,
                                micro_batch_size="auto", log_every=1))
    monkeypatch.setattr(fit, "choose_micro_batch", lambda recipe, capacity, world, **kw: fit.MicroBatchChoice(
        4, 16 // 4 // world, "planted: 4 fit", world, 1))
    res = Trainer(build(r), tmp_path / "run").fit()
    mb = res["run"]["micro_batch"]
    assert (mb["micro_batch_size"], mb["grad_accum"], mb["global_batch"]) == (4, 4, 16) and "planted" in mb["why"]
    steps = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    assert res["run"]["recipe_hash"] == r.hash()  # the recipe as written, not the resolved split
