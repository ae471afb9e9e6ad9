"""gpu_check.md: the tables of a gpu_check.json record."""

from __future__ import annotations


def mib(b):
    if not isinstance(b, (int, float)) or not b:
        return "–"
    m = b / 2**20
    return f"{m:,.0f}" if m >= 100 else f"{m:.1f}"  # tiny (dry-run) models: a decimal


def num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else "–"


def pct(x):
    return f"{100 * x:+.1f}%" if isinstance(x, (int, float)) else "–"


def share(x, mark=""):
    return f"{100 * x:.3g}%{mark}" if isinstance(x, (int, float)) and x else "–"


def times(x):
    return f"{x:.2f}x" if isinstance(x, (int, float)) else "–"


def model(m: str) -> str:
    return m.rsplit("/", 1)[-1] if m.startswith("/") else m  # a local directory: its name


def status(c: dict) -> str:
    return "skipped" if c.get("ok") is None else "yes" if c["ok"] else "NO"


MEASURED = "run peak MiB | step peak MiB | estimate MiB | est. error | tokens/s | step ms"


def measured(b: dict) -> str:
    """The columns every speed row has: memory (measured and estimated) and speed."""
    est = mib(b.get("estimate_bytes")) + ("*" if b.get("estimate_at") == "longest batch of this run" else "")
    return (f"{mib(b.get('peak_bytes'))} | {mib(b.get('step_peak_bytes'))} | {est} | {pct(b.get('estimate_error'))} | "
            f"{num(b.get('tokens_per_s'), ',.0f')} | {num(b.get('step_time_median_s') and 1e3 * b['step_time_median_s'], '.1f')}")


def header(r: dict) -> list[str]:
    env, v, pk = r["env"], r["env"]["versions"], r.get("peak_matmul_flops")
    load = " → ".join(", ".join(f"{x:.2f}" for x in env[k]) for k in ("loadavg_start", "loadavg_end") if env.get(k))
    return [f"# GPU check{' (dry run: tiny models, CPU)' if r['dry_run'] else ''}", "",
            f"- device: {env.get('device_name')} · torch {v.get('torch')} · transformers {v.get('transformers')} · "
            f"flash-attn {v.get('flash-attn') or 'not installed'} · bitsandbytes {v.get('bitsandbytes') or '–'} · "
            f"CUDA {env.get('cuda')}",
            f"- CPU: {env.get('cpu_model')}, {env.get('cpu_count')} cores, torch threads {env.get('torch_threads')}; "
            f"load average {load}",
            f"- measured {r['matmul_dtype']} matmul peak: {num(pk and pk / 1e12, '.1f')} TFLOP/s"
            + (f" ({r['peak_error']})" if r.get("peak_error") else ""),
            f"- elapsed {r['elapsed_s']:.0f} s of a {r['budget_s']:.0f} s budget ({num(r.get('cpu_s'), '.0f')} s CPU)"]


def table(title: str, intro: str, columns: str, rows: list[str]) -> list[str]:
    """A section: title, what the columns mean, the table (``columns``: "a | b | c")."""
    return [f"## {title}", "", *([intro, ""] if intro else []), f"| {columns} |",
            "|" + "---|" * (columns.count("|") + 1), *(f"| {x} |" for x in rows)]


def correctness(r: dict) -> list[str]:
    rows = []
    for c in r["checks"]:
        ev = ", ".join(f"{k} {v:.3f}" for k, v in (c.get("eval") or {}).items() if isinstance(v, float))
        rows.append(f"{c['strategy']} | {model(c['model'])} | {status(c)} | {ev} | {num(c.get('loss_first'), '.4f')} → "
                    f"{num(c.get('loss_last'), '.4f')} | {mib(c.get('peak_bytes'))} | {c.get('error', '')}")
    return table("Correctness: every strategy trains and evaluates", "",
                 "strategy | model | ok | eval | loss first → last | peak MiB | error", rows)


def scale(r: dict) -> list[str]:
    rows = []
    for c in r.get("scale", []):
        detail = (f"{c.get('overlap') or 0:.2f}x overlap; " + "; ".join(f"{x['variant']} on {x.get('where')}"
                                                                     for x in c.get("runs", []))
                  if c["check"] == "parallel" else f"max abs loss diff {num(c.get('max_abs_loss_diff'), '.2e')}")
        rows.append(f"{c['check']} | {status(c)} | {detail} | {c.get('error', '')}")
    return table("Scale-out", "", "check | ok | detail | error", rows)


def speed(r: dict) -> list[str]:
    rows = []
    for b in r["bench"]:
        tflops = b.get("model_flops_per_s") and b["model_flops_per_s"] / 1e12
        batches = "padding-free" if b.get("padding_free") else "padded"
        rows.append(f"{model(b['model'])} | {b['strategy']} | {b['attn']} | {b.get('task', 'classification')}, {batches} | "
                    f"{measured(b)} | {num(tflops, '.2f')} | {share(b.get('mfu'))} | {b.get('error', '')}")
    return table("Speed and memory",
                 "MFU = model FLOPs/s (peftkit.step.flops, result.json `speed.model_flops_per_s`: matmuls on real "
                 "(non-padding) tokens, backward only where gradients flow, plus attention) over the measured "
                 "matmul peak. Tokens are real (non-padding) tokens. Run peak: the whole run's CUDA "
                 "max_memory_allocated (CPU: RSS growth); step peak: one step after warm-up (CUDA: "
                 "max_memory_allocated over it; CPU: live tensor storages), which the trainer's pre-training "
                 "estimate (result.json `memory`, at that step's batch shape; * = at the run's longest batch: "
                 "padding-free) is compared with: est. error = (estimate − step peak) / step peak.",
                 f"model | strategy | attention | batches | {MEASURED} | TFLOP/s | MFU | error", rows)


def quantized(r: dict) -> list[str]:
    rows = []
    for b in (b for b in r["bench"] if b["strategy"] == "qlora"):
        ref, vs = b.get("lora") or {}, b.get("vs_lora") or {}
        rows.append(f"{model(b['model'])} | {b['attn']} | {num(b.get('tokens_per_s'), ',.0f')} | "
                    f"{num(ref.get('tokens_per_s'), ',.0f')} | {times(vs.get('tokens_per_s'))} | "
                    f"{mib(b.get('step_peak_bytes'))} | {mib(ref.get('step_peak_bytes'))} | "
                    f"{times(vs.get('step_peak'))} | {b.get('error', '')}")
    return table("bitsandbytes 4-bit: qlora vs lora",
                 "Same model, attention and batches; ratios are qlora / lora (the speed table's rows).",
                 "model | attention | qlora tokens/s | lora tokens/s | tokens/s ratio | qlora step peak MiB | "
                 "lora step peak MiB | step peak ratio | error", rows)


def compiled(r: dict) -> list[str]:
    rows = []
    for c in r.get("compile", []):
        vs = c.get("vs_eager") or {}
        mode = f"compiled ({c.get('backend')})" if c.get("compile") else "eager"
        warm = f"{num(c.get('warmup_s'), '.2f')} ({c.get('warmup_steps', '–')})"
        mfu = share(c["mfu"]) if c.get("mfu") else share(vs.get("mfu"), "*")
        rows.append(f"{model(c['model'])} | {mode} | {c.get('padding', '')} | {measured(c)} | {mfu} | "
                    f"{num(c.get('first_step_s'), '.2f')} | {warm} | {num(c.get('overhead_s'), '.2f')} | "
                    f"{num(vs.get('compile_s'), '.1f')} | {num(c.get('graphs'), 'd')} | {times(vs.get('speedup'))} | "
                    f"{num(vs.get('break_even_steps'), 'd')} | {c.get('error', '')}")
    return table("Compiled vs eager (`train.compile`)",
                 "LoRA; both rows pad lengths to the same buckets (`train.pad_to_multiple_of`). The first step and the warm-up "
                 "(the steps the median leaves out) hold the compilation; overhead = train_s − steps × median "
                 "step (compilation, warm-up, the memory probe); compile s = torch._dynamo's own compile wall "
                 "time (forward, backward, recompiles); graphs = graphs compiled (recompiles for new shapes "
                 "included); break-even = steps after which the compiled run is ahead. MFU* of a compiled "
                 "run: at the eager run's FLOPs per token (the trainer counts no FLOPs on a compiled model).",
                 f"model | mode | padding | {MEASURED} | MFU | first step s | warm-up s | overhead s | compile s | "
                 "graphs | speed-up | break-even steps | error", rows)


def frozen(r: dict) -> list[str]:
    rows = []
    for c in r.get("frozen", []):
        fw, vs = c.get("frozen_weights") or {}, c.get("vs_keep") or {}
        rows.append(f"{model(c['model'])} | {c['frozen_dtype']} | {fw.get('dtype', 'as loaded' if c.get('ok') else '–')} | "
                    f"{mib(fw.get('bytes_saved'))} | {measured(c)} | {times(vs.get('tokens_per_s'))} | "
                    f"{times(vs.get('step_peak'))} | {c.get('error', '')}")
    return table("Frozen weights in the compute dtype (`model.frozen_dtype`)",
                 "LoRA over fp32 weights under bf16 autocast: `auto` stores the frozen weights once in bf16, "
                 "`keep` leaves them fp32 (autocast re-casts them every step). Ratios: auto / keep.",
                 f"model | frozen_dtype | stored | saved MiB | {MEASURED} | tokens/s ratio | step peak ratio | error",
                 rows)


def markdown(r: dict) -> str:
    parts = [header(r), correctness(r), scale(r), speed(r), quantized(r), compiled(r), frozen(r)]
    return "\n".join(line for p in parts for line in [*p, ""]).rstrip() + "\n"
