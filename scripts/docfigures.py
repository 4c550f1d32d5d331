"""The figures in README.md and docs/benchmarks.md, written from the files that hold them (metrics/*.json of the
committed run, bench/*.json of the benchmark commands), so a quoted figure cannot drift from its file.

The documents call these functions from cog blocks (`<!-- [[[cog figures.results()]]] -->`); `make docs`
rewrites the blocks (cog -r) and tests/unit/test_docs.py fails when a block differs from its files (cog --check):
the working tree's, or, where a local run has rewritten them, the committed ones the documents describe.
"""

from __future__ import annotations

import json
import os
import subprocess
from functools import cache
from pathlib import Path

import cog

ROOT = Path(__file__).resolve().parents[1]


@cache
def load(path: str) -> dict:
    """A figure file as in the working tree, or as committed at $DOCFIGURES_REV (e.g. HEAD)."""
    rev = os.environ.get("DOCFIGURES_REV")
    if rev:
        return json.loads(subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout)
    return json.loads((ROOT / path).read_text())


def pct(x: float, digits: int = 2) -> str:
    return f"{x * 100:.{digits}f} %"


def num(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def out(lines: list[str]) -> None:
    for line in lines:
        cog.outl(line)


def table(header: list[str], rows: list[list[str]]) -> None:
    out(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)])


def service_row(setup: str, model: str = "default") -> dict:
    return next(r for r in load("bench/serve.json")["service"] if r["setup"] == setup and r["model"] == model)


# --- README ----------------------------------------------------------------------------------------------

def threads_text(per_epoch: list) -> str:
    """metrics/train.info.json's threads: one count, or the range the run's share moved through."""
    per_epoch = per_epoch if isinstance(per_epoch, list) else [per_epoch]
    counts = sorted({n for epoch in per_epoch for n in (epoch if isinstance(epoch, list) else [epoch])})
    if len(counts) == 1:
        return f"{counts[0]} thread{'s' if counts[0] != 1 else ''}"
    return f"{counts[0]}–{counts[-1]} threads"


def results() -> None:
    """The README's results table: the committed run of the default pipeline and the serving benchmark."""
    ev, evi = load("metrics/eval.json"), load("metrics/eval.info.json")
    tr, tri = load("metrics/train.json"), load("metrics/train.info.json")
    q, qi, ex, exi = (load("metrics/quantize.json"), load("metrics/quantize.info.json"), load("metrics/export.json"),
                      load("metrics/export.info.json"))
    baseline, served = service_row("baseline (FastAPI + onnxruntime, inline)"), service_row("cnnpipe /predict")
    base, predict = baseline["requests_per_s"], served["requests_per_s"]
    m = load("bench/serve.json")["machine"]
    tta = ", flip TTA" if evi["tta_flip"] else ""
    native = ", native bf16" if tri.get("precision_choice", {}).get("native_bf16") else ""
    table(["what", "figure", "from"], [
        [f"test accuracy ({evi['images']:,} {evi['dataset']} test images{tta})",
         f"**{pct(ev['acc'])}**, macro-F1 {ev['f1']:.3f}, worst class F1 {ev['min_f1']:.3f}", "`metrics/eval.json`"],
        [f"training ({tri['device']}{native})", f"{num(tr['sec'])} s, {num(tri['images_per_second'], 0)} images/s, "
         f"{tri['epochs']} epochs, {threads_text(tri['threads'])}, {tri['precision']}",
         "`metrics/train.json`, `metrics/train.info.json`"],
        ["validation accuracy", f"{pct(tr['val_acc'])} (epoch {tr['epoch']}, the one kept)", "`metrics/train.json`"],
        ["ONNX against PyTorch", f"argmax agreement {pct(ex['agree'], 1)}, max abs diff {exi['max_abs_diff']:.1e}",
         "`metrics/export.json`, `.info.json`"],
        ["int8 against fp32 (onnxruntime, no TTA)",
         f"{pct(qi['int8']['accuracy'])} vs {pct(qi['fp32']['accuracy'])}; {qi['size_ratio']:.1f}× smaller; "
         f"batch-1 p50 {q['ms']} vs {qi['fp32']['latency_ms_p50']} ms", "`metrics/quantize.json`, `.info.json`"],
        [f"HTTP `/predict`, {served['clients']} connections ({m['processor']}, {m['cpus']} CPUs)",
         f"{num(predict, 0)} requests/s, {predict / base:.2f}× a plain FastAPI handler", "`bench/serve.json`"],
        *recipe_rows(),
        *gpu_rows(),
        *experiments_rows(),
    ])


NATIVE_BF16_BENCHES = ["bench/precision_amx.json", "bench/precision_avx512bf16.json"]  # auto vs fp32, per CPU kind


def cpu_kind(machine: dict) -> str:
    """What gives a CPU native bf16: AMX, or AVX512-BF16 alone."""
    return "AMX" if "amx_bf16" in machine["cpu_flags"] else "AVX512-BF16 (no AMX)"


def auto_and_fp32(b: dict) -> tuple[dict, dict]:
    """The `auto` and forced `fp32` summaries of a `bench train --precisions auto,fp32` file."""
    by = {s["precision_asked"]: s for s in b["summary"]}
    return by["auto"], by["fp32"]


def recipe_rows() -> list[list[str]]:
    """The default recipe over seeds: on a CPU without native bf16 (bench/recipe.json), and auto (bf16) against
    forced fp32 on each kind of CPU with it (NATIVE_BF16_BENCHES)."""
    recipe = load("bench/recipe.json")
    r, native = recipe["summary"][0], recipe["peak"][0]["native_bf16"]
    off = off_note(recipe["accuracy"]["train_params"])
    parts = [f"CPU {'with' if native else 'without'} native bf16{off}, `auto` ({r['precision']}): mean "
             f"{pct(r['mean_test_acc'])}, lowest {pct(r['min_test_acc'])}"]
    runs = list(recipe["runs"])
    for path in NATIVE_BF16_BENCHES:
        b = load(path)
        auto, fp32 = auto_and_fp32(b)
        runs += b["runs"]
        off = off_note(b["accuracy"]["train_params"])
        parts.append(f"CPU with {cpu_kind(b['machine'])}{off}, `auto` ({auto['precision']}): mean "
                     f"{pct(auto['mean_test_acc'])}, lowest {pct(auto['min_test_acc'])}, "
                     f"{speedup(b):.2f}× the images/s of "
                     f"fp32 (mean {pct(fp32['mean_test_acc'])})")
    t94 = sum(x["seconds_to_test_acc"].get("0.94") is not None for x in runs)
    return [[f"the default recipe over seeds {', '.join(map(str, r['seeds']))} (`cnnpipe bench train`)",
             "; ".join(parts) + f"; 94 % reached in {t94} of {len(runs)} runs (auto and fp32)",
             ", ".join(f"`{p}`" for p in ["bench/recipe.json", *NATIVE_BF16_BENCHES])]]


def experiments_rows() -> list[list[str]]:
    q = load("bench/queue.json")
    j1, j2, _ = q["rows"]
    rows = [[f"{j1['experiments']} one-epoch experiments, `dvc queue start -j 2` against `-j 1`",
             f"{q['ratio_j2_to_j1']:.2f}× the wall time ({num(j2['wall_seconds'])} s vs {num(j1['wall_seconds'])} s; "
             f"every process on all cores: {q['ratio_j2_all_cores_to_j1']:.2f}×)", "`bench/queue.json`"]]
    if Path("bench/sweep.json").is_file():
        sw = load("bench/sweep.json")
        arm = next(a for a in sweep_arms(sw) if is_default(sw, a))
        gap = sw[arm]["best_gap_points"]
        rows.append([f"{sw['trials']}-trial sweep, the default median pruner (from epoch {first_cut(sw, arm)} of "
                     f"{sw['epochs_per_trial']}) against none", f"{sw[arm]['epochs_ratio']:.2f}× the epochs, "
                     + (f"best trial {abs(gap):.2f} points {'below' if gap > 0 else 'above'} the unpruned best"
                        if gap else "the same best trial"), "`bench/sweep.json`"])
    return rows


# --- docs/benchmarks.md -----------------------------------------------------------------------------------

def machine_line(m: dict) -> str:
    return (f"{m['processor']}, {m['cpus']} CPUs, flags {', '.join(m['cpu_flags']) or 'none of note'}; "
            f"onnxruntime {m['onnxruntime']}, Python {m['python']}")


def machine() -> None:
    out([machine_line(load("bench/serve_avx2.json")["machine"]) + "."])


def train_throughput() -> None:
    rows = []
    for path in ("bench/train.json", "bench/train_lenet_3_repeats.json", "bench/train_lenet_5_repeats.json"):
        t = load(path)["throughput"]
        rows.append([f"`{path}` ({t['repeats']} repeats)", num(t["tutorial_loop_median"]), num(t["engine_median"]),
                     f"**{t['ratio_of_medians']}×**",
                     f"{num(t['engine_tutorial_module_median'])} ({t['ratio_tutorial_module']}×)"])
    table(["run", "tutorial 000 loop, images/s", "cnnpipe engine, images/s", "ratio",
           "engine on the tutorial's LeNet module"], rows)


def off_note(tp: dict | None) -> str:
    """', `norm_lr=1`' for a run's train params whose recipe settings are not params.yaml's; '' where they are
    or are not known (None)."""
    return "".join(f", `{k}`" for k in off_recipe(tp)) if tp else ""


def config_label(tp: dict) -> str:
    """A bench run's config: its model and epochs, its shift where it has one, and its recipe settings where
    they are not params.yaml's."""
    extra = f" translate={tp['translate']}" if tp.get("translate") else ""
    return f"`model={tp['model']} epochs={tp['epochs']}{extra}{''.join(' ' + k for k in off_recipe(tp))}`"


# train settings of the recipe, and the value a bench file without the key ran with
RECIPE_KEYS = {"norm_lr": 1.0}  # files without norm_lr: every parameter at the one learning rate


@cache
def train_params_at(rev: str | None) -> dict | None:
    """params.yaml's train section at a commit (a bench file's source revision, "-dirty" or not), or in the
    working tree (None); None where that commit cannot be read (a shallow clone)."""
    import yaml

    if rev is None:
        return yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    proc = subprocess.run(["git", "show", f"{rev.removesuffix('-dirty')}:params.yaml"], cwd=ROOT,
                          capture_output=True, text=True)
    return yaml.safe_load(proc.stdout)["train"] if proc.returncode == 0 else None


def default_train() -> dict:
    return train_params_at(os.environ.get("DOCFIGURES_REV")) or {}


def off_recipe(tp: dict) -> list[str]:
    """`key=value` for each recipe setting of a run's train params that is not params.yaml's."""
    out = []
    for key, absent in RECIPE_KEYS.items():
        value = tp.get(key, absent)
        if value != default_train().get(key, absent):  # a params.yaml from before the key: the same value
            out.append(f"{key}={value:g}")
    return out


def time_to_accuracy() -> None:
    rows = []
    for path in ("bench/recipe.json", "bench/train.json", "bench/train_4_epochs.json", "bench/train_3_epochs.json",
                 "bench/train_20_epochs.json", "bench/train_20_epochs_translate1.json"):
        a = load(path)["accuracy"]
        reached = a["seconds_to_test_acc"]
        cells = [("" if k not in reached else "not reached" if reached[k] is None else f"{num(reached[k])} s")
                 for k in ("0.90", "0.92", "0.93", "0.94")]
        seed = f" (seed {a['train_params']['seed']})" if path == "bench/recipe.json" else ""
        rows.append([f"{config_label(a['train_params'])}{seed}, `{path}`", *cells,
                     f"{pct(a['final_test_acc'])} after {num(a['train_seconds'])} s"])
    table(["config", "≥ 90 %", "≥ 92 %", "≥ 93 %", "≥ 94 %", "final test accuracy"], rows)
    out(["", "Seconds of training until the test accuracy reached each level (blank: that run did not track it)."])


def seeds_table(path: str) -> None:
    """A `bench train --seeds N --precisions ...` run: each precision over its seeds, and against its peak."""
    b = load(path)
    rows = []
    for s in b["summary"]:
        t94 = s["to_test_acc"].get("0.94")
        rows.append([f"`{s['precision_asked']}` ({s['precision']})", ", ".join(pct(a) for a in s["final_test_acc"]),
                     f"**{pct(s['mean_test_acc'])}**", pct(s["min_test_acc"]), f"{s['spread_test_acc'] * 100:.2f}",
                     num(s["images_per_second_median"], 0),
                     "" if t94 is None else "not reached" if t94["median_seconds"] is None else
                     f"{num(t94['median_seconds'])} s ({t94['seeds_reached']} of {len(s['seeds'])})"])
    table(["precision", "test accuracy per seed", "mean", "lowest", "spread (points)", "images/s (median)",
           "time to 94 % (median)"], rows)
    rows_peak = b.get("peak", [])[1 if "throughput" in b else 0:]  # the throughput part's row comes first
    peaks = [f"{e['precision']}: {e['engine_gflops']:.1f} GFLOP/s, " + (
                 f"{100 * e['fraction_of_peak']:.1f} % of its matmul peak "
                 f"({e['matmul_peak_gflops'][e['precision']]:.0f} GFLOP/s)"
                 if e["precision"] == "float32" or e["native_bf16"] else "no native bf16, so no bf16 peak to compare")
             for e, s in zip(rows_peak, b["summary"], strict=True) if not s.get("same_runs_as")]
    tp = b["accuracy"]["train_params"]
    size = f" on {b['train_size']:,} training images" if b.get("train_size") else ""
    out(["", f"{config_label(tp)}{size}, seeds {b['summary'][0]['seeds']}, {b['accuracy']['device']}; "
             f"the engine against the peak of the precision it ran in: {'; '.join(peaks)}."])


def kept_epoch() -> None:
    """The runs of the default recipe in bench/ whose best validation epoch came before the last, and what that
    epoch scored on the test set against the last (the one the train stage keeps); indented for a list item."""
    paths = ("bench/recipe.json", *NATIVE_BF16_BENCHES, "bench/gpu_recipe.json", "bench/gpu_fp32.json")
    runs = [r for path in paths for r in load(path)["runs"] if len(r.get("epochs", [])) > 1]
    earlier = []
    for r in runs:
        best = max(r["epochs"], key=lambda e: e["val_acc"])  # the first of equals, as the stage counts
        if best["epoch"] != r["epochs"][-1]["epoch"]:
            earlier.append(100 * (best["test_acc"] - r["epochs"][-1]["test_acc"]))
    diffs = ", ".join(f"{d:+.2f}".replace("-", "−") for d in earlier)
    out([f"  In {len(earlier)} of the {len(runs)} runs of the `rescnn` recipe in {', '.join(f'`{p}`' for p in paths)}, "
         f"an earlier epoch had the best validation accuracy; against the last epoch's, its test accuracy moved by "
         f"{diffs} points."])


def recipe() -> None:
    seeds_table("bench/recipe.json")


def precisions() -> None:
    seeds_table("bench/precision.json")


def serve_latency() -> None:
    rows = {}
    for r in load("bench/serve.json")["latency"]:
        rows.setdefault(r["engine"], {})[r["batch"]] = f"{r['p50_ms']} / {r['p99_ms']} ms"
    table([f"engine (default model, `{load('bench/serve.json').get('model', 'bncnn')}`)", "batch 1 p50 / p99",
           "batch 64 p50 / p99"],
          [[engine, b.get(1, "—"), b.get(64, "—")] for engine, b in rows.items()])


def serve_service() -> None:
    s = load("bench/serve.json")
    table(["model", "setup", "requests/s", "p50", "p99", "errors"],
          [[r["model"], r["setup"], num(r["requests_per_s"]), f"{r['p50_ms']} ms", f"{r['p99_ms']} ms",
            str(r["errors"])] for r in s["service"]])
    out(["", f"Load generator: {s['load_generator']}. Machine: {machine_line(s['machine'])}."])


def serve_ratios() -> None:
    r, per = load("bench/serve.json")["ratios"], load("bench/serve.json")["onnxruntime_ms_per_image"]
    a = load("bench/serve_avx2.json")
    d, air = per["default"], per["airnet 32×32×3"]
    out([f"- `/predict` {r['predict_over_baseline_rps']}×, `/v2 infer` {r['v2_infer_over_baseline_rps']}×, "
         f"`--workers 2` {r['workers_2_over_baseline_rps']}×, batching off {r['batching_off_over_baseline_rps']}×; "
         f"airnet `/predict` {r['airnet_predict_over_baseline_rps']}× (requests/s against the baseline)",
         f"- onnxruntime per image, batch 1 → 64: default model {d['batch_1']} → {d['batch_64']} ms, airnet "
         f"{air['batch_1']} → {air['batch_64']} ms",
         f"- onnxruntime alone at batch 64 on all the cores, against the baseline: default model "
         f"{r['onnxruntime_batch64_over_baseline_rps']}×, airnet {r['airnet_onnxruntime_batch64_over_baseline_rps']}× "
         "(the most any one-machine server could reach here where inference is all it does)",
         f"- torch eager against onnxruntime fp32, batch-1 p50: {r['torch_over_ort_fp32_batch1_p50']}× slower",
         f"- the same command on {a['machine']['processor']} ({', '.join(a['machine']['cpu_flags'])}, no AVX-512) "
         f"with the earlier default model `{a.get('model', 'bncnn')}`, `bench/serve_avx2.json`: `/predict` "
         f"{a['ratios']['predict_over_baseline_rps']}×, `/v2 infer` {a['ratios']['v2_infer_over_baseline_rps']}×, "
         f"`--workers 2` {a['ratios']['workers_2_over_baseline_rps']}×, airnet "
         f"{a['ratios']['airnet_predict_over_baseline_rps']}×"])


def hostile() -> None:
    rows = []
    for path, label in (("bench/hostile.json", "each attacker pausing 50 ms"),
                        ("bench/hostile_flood.json", "flood (`--pause 0`)")):
        p = load(path)["probe"]
        rows.append([f"{label}, `{path}`", str(p["probes"]), f"{p['p50_ms']} ms", f"{p['p99_ms']} ms",
                     f"{p['max_ms']} ms", str(len(p["failures"]))])
    table(["traffic", "probes", "p50 wait", "p99 wait", "max wait", "failed probes"], rows)
    out(["", f"Machine: {load('bench/hostile.json')['processor']}, as in the serving tables above.", "",
         "Answers per attack (status: count), `bench/hostile.json`:", ""])
    table(["attack", "answers"], [[name, ", ".join(f"{k}: {v:,}" for k, v in counts.items())]
                                  for name, counts in load("bench/hostile.json")["attacks"].items()])


def swap() -> None:
    s = load("bench/swap.json")
    out([f"prod moved from {s['versions'][0]} to {s['versions'][1]} {s['promoted_at_s']:g} s into "
         f"{s['seconds']:g} s of load from {s['clients']} connections; the server (polling every {s['poll_s']} s) "
         f"served the new version {s['follow_s']} s later.", ""])
    table(["window", "requests", "errors", "p50", "p99", "max"],
          [[name, f"{s[name]['requests']:,}", str(s[name]["errors"]), f"{s[name]['p50_ms']} ms",
            f"{s[name]['p99_ms']} ms", f"{s[name]['max_ms']} ms"] for name in ("before", "during", "after")])


def queue() -> None:
    q = load("bench/queue.json")
    table(["run", "wall time", "images/s per process", "threads per process"],
          [[f"`-j {r['jobs']}`" + (f", `train.threads={r['train_threads_param']}`" if r["train_threads_param"] else
                                   ", threads: its share"),
            f"{num(r['wall_seconds'])} s", ", ".join(num(v, 0) for v in r["images_per_second"]),
            ", ".join(threads_text(t).split()[0] for t in r["threads"])] for r in q["rows"]])
    out(["", f"`-j 2` takes {q['ratio_j2_to_j1']:.2f}× the wall time of `-j 1`; with every process on all "
             f"{q['cores']} cores, {q['ratio_j2_all_cores_to_j1']:.2f}×."])


def sweep_arms(sw: dict) -> list[str]:
    """The sweeps of bench/sweep.json in the order run: median pruners by warmup, then none."""
    return [k for k, v in sw.items() if isinstance(v, dict) and "states" in v]


def first_cut(sw: dict, arm: str) -> int:
    """The first epoch after which the arm's median pruner may stop a trial."""
    return sw[arm]["pruner"]["warmup_epochs"] + 1


def is_default(sw: dict, arm: str) -> bool:
    """The arm swept with a sweep file's default pruner for the bench's trials."""
    return arm != "none" and sw[arm]["pruner"]["warmup_epochs"] == sw["default_warmup"]


def pruner_label(sw: dict, arm: str) -> str:
    if arm == "none":
        return "none"
    return f"median, from epoch {first_cut(sw, arm)}" + (" (a sweep file's default)" if is_default(sw, arm) else "")


def sweep() -> None:
    sw = load("bench/sweep.json")
    arms = sweep_arms(sw)
    table(["pruner", "trials: complete / pruned / failed", "epochs run", "the best trial's validation accuracy"],
          [[pruner_label(sw, a), " / ".join(str(sw[a]["states"][k]) for k in ("complete", "pruned", "failed")),
            str(sw[a]["epochs"]), pct(sw[a]["best_val_acc"])] for a in arms])
    lines = []
    for arm in (a for a in arms if a != "none"):
        gap = sw[arm]["best_gap_points"]
        lines.append(f"- The median pruner from epoch {first_cut(sw, arm)}: {sw[arm]['epochs_ratio']:.2f}× the epochs "
                     f"and {sw[arm]['wall_ratio']:.2f}× the wall time of the unpruned sweep; its best trial is "
                     + (f"{abs(gap):.2f} points {'below' if gap > 0 else 'above'}" if gap else "the same as")
                     + " the unpruned sweep's best." + missed_best(sw, arm))
    out(["", *lines])


def missed_best(sw: dict, arm: str) -> str:
    """Where a median pruner stopped the trial that ended best unpruned: when, and how far behind it was."""
    def drawn(row: dict) -> dict:
        return {k: v for k, v in row.items() if k.startswith("train.")}

    best = max((r for r in sw["none"]["trials"] if r["state"] == "complete"), key=lambda r: r["val_acc"])
    same = next((r for r in sw[arm]["trials"] if drawn(r) == drawn(best)), None)
    if same is None or same["state"] != "pruned":
        return ""
    params = ", ".join(f"`{k}` {v:.2g}" for k, v in drawn(best).items())
    return (f" That trial ({params}) was pruned after {same['epochs']} of its {best['epochs']} epochs, at "
            f"{pct(same['val_acc'])} validation accuracy: the median pruner compares trials epoch by epoch, and "
            f"under the one-cycle schedule a high learning rate's trial is still behind early on and can end ahead.")


# --- the GPU section (bench/gpu_*.json) ----------------------------------------------------------------------

def gpu_machine_text(m: dict) -> str:
    return (f"{m['gpu']} ({m['gpu_memory_gib']:g} GiB, driver {m['driver']}), CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
            f"torch {m['torch']}; host {m['processor']}, {m['cpus']} CPUs, Python {m['python']}")


def gpu_summary(path: str) -> dict:
    return load(path)["summary"][0]


def gpu_rows() -> list[list[str]]:
    """README: the GPU recipe over seeds, and airnet's throughput against airbench94's."""
    path = "bench/gpu_airnet_fmnist.json"
    s, d = gpu_summary(path), load("bench/gpu_airnet_cifar_shape.json")
    t94, syn = s["to_test_acc"]["0.94"], d["synthetic"]
    off = off_note(load(path)["runs"][0]["train_params"])
    return [[f"the GPU recipe (`airnet`, 8 epochs{off}) on one {load(path)['machine']['gpu']}, seeds "
             f"{', '.join(map(str, s['seeds']))}",
             f"test accuracy mean {pct(s['mean_test_acc'])}, lowest {pct(s['min_test_acc'])}; 94 % after "
             f"{num(t94['median_seconds'])} s of training (median); `airnet` on CIFAR-10-shaped data "
             f"{syn['ratio_to_airbench94_a100']:.2f}× airbench94's A100 images/s",
             f"`{path}`, `bench/gpu_airnet_cifar_shape.json`"]]


def gpu() -> None:
    """docs/benchmarks.md: the GPU machine, time to accuracy per config, the loop, airnet, the pipeline."""
    rec = load("bench/gpu_recipe.json")
    out([f"Measured on {gpu_machine_text(rec['machine'])}.", ""])
    rows = []
    for path in ("bench/gpu_recipe.json", "bench/gpu_fp32.json", "bench/gpu_compile.json",
                 "bench/gpu_airnet_fmnist.json"):
        b = load(path)
        runs = b.get("runs") or [b["accuracy"]]
        tp = runs[0]["train_params"]
        cells = []
        for t in ("0.90", "0.92", "0.93", "0.94"):
            secs = sorted(r["seconds_to_test_acc"][t] for r in runs if r["seconds_to_test_acc"][t] is not None)
            cells.append("not reached" if not secs else f"{num(secs[len(secs) // 2])} s"
                         + (f" ({len(secs)} of {len(runs)})" if len(runs) > 1 else ""))
        accs = [r["final_test_acc"] for r in runs]
        flags = [f"model={tp['model']}", f"epochs={tp['epochs']}", f"batch_size={tp['batch_size']}"]
        flags += (["compile=true"] if tp["compile"] else []) + off_recipe(tp)
        rows.append([f"`{' '.join(flags)}`, {runs[0]['precision']}, `{path}`",
                     str(len(runs)), *cells, ", ".join(pct(a) for a in accs),
                     num(sorted(r["images_per_second"] for r in runs)[len(runs) // 2], 0)])
    table(["config", "seeds", "≥ 90 %", "≥ 92 %", "≥ 93 %", "≥ 94 %", "final test accuracy", "images/s"], rows)
    t = rec["throughput"]
    s = load("bench/gpu_airnet_cifar_shape.json")["synthetic"]
    st = load("bench/gpu_pipeline.json")["stages"]
    providers = rec["machine"]["onnxruntime_providers"]
    tri, q = st["train.info"], st["quantize.info"]
    out(["", "Seconds of training until the test accuracy reached each level: the median over the seeds that "
             "reached it (how many, in brackets); the first epoch carries cuDNN's autotuning and any compile.", "",
         f"- **Tutorial loop against the engine** (LeNet, batch {t['batch']}, {t['steps']} steps, "
         f"{t['repeats']} repeats): {num(t['tutorial_loop_median'])} against {num(t['engine_median'])} images/s, "
         f"**{t['ratio_of_medians']}×**.",
         f"- **`airnet` on CIFAR-10-shaped random data** (batch {s['train_params']['batch_size']}, "
         f"{s['precision']}): {num(s['steady_images_per_second'], 0)} images/s steady; airbench94's published A100 "
         f"rate is {num(s['airbench94_a100_images_per_second'], 0)} (9.9 epochs of 50,000 images in 3.83 s), so "
         f"**{s['ratio_to_airbench94_a100']:.2f}×** it, on an {rec['machine']['gpu']} rather than an A100 and without "
         f"airbench's "
         f"whitening stem, lookahead or multi-crop evaluation.",
         f"- **The default pipeline on the GPU** (train → quantize, `device: auto`): training "
         f"{num(st['train']['sec'])} s at {num(tri['images_per_second'], 0)} images/s ({tri['precision']}); test "
         f"accuracy {pct(st['eval']['acc'])}; ONNX against PyTorch: agreement {pct(st['export']['agree'], 1)}, max "
         f"abs diff {st['export.info']['max_abs_diff']:.1e}; int8 {pct(q['int8']['accuracy'])} against fp32 "
         f"{pct(q['fp32']['accuracy'])} (`bench/gpu_pipeline.json`).",
         f"- **onnxruntime on that machine** had the providers {', '.join(providers)}"
         + ("" if "CUDAExecutionProvider" in providers else ": no CUDA provider, so serving there was not measured")
         + "."])


def precision_native(path: str) -> None:
    """docs/benchmarks.md: auto against forced fp32 on a CPU with native bf16, over seeds."""
    b = load(path)
    m = b["machine"]
    auto, fp32 = auto_and_fp32(b)
    native = [f for f in m["cpu_flags"] if f in ("amx_bf16", "avx512_bf16")]
    code = f", code at `{m['source_revision']}`" if m.get("source_revision") else ""
    out([f"On {m['processor']} ({m['cpus']} CPUs, with {' and '.join(native)}), torch {m['torch']}{code}, "
         f"`{b['command']}`:", ""])
    seeds_table(path)
    peak = b["peak"][0]["matmul_peak_gflops"]
    out(["", f"This CPU's bf16 matmul peak is {peak['bfloat16'] / peak['float32']:.1f}× its fp32 one."])
    gap = (auto["mean_test_acc"] - fp32["mean_test_acc"]) * 100
    chose = sorted({x["precision"] for x in b["runs"] if x["train_params"]["precision"] == "auto"})
    which = f"chose {' or '.join(chose)} by seed" if len(chose) > 1 else f"chose {auto['precision']} on every seed"
    out(["", f"Default training (`auto`, which {which}) ran at "
             f"**{speedup(b):.2f}×** the images/s of forced "
             f"fp32, with a mean test accuracy {abs(gap):.2f} points {'above' if gap >= 0 else 'below'} it."])


def speedup(b: dict) -> float:
    """auto's images/s over forced fp32's in a `bench train --precisions auto,fp32` file."""
    auto, fp32 = auto_and_fp32(b)
    return auto["images_per_second_median"] / fp32["images_per_second_median"]


def make_run_probe(path: str, bench: str) -> None:
    """docs/benchmarks.md: a fresh clone's `make run` on a CPU with native bf16: its probe against the bench of
    the same CPU kind over whole epochs."""
    r = load(path)
    probe = r["train"]["precision_choice"]["probe_images_per_s"]
    gain, whole = probe["bf16"] / probe["fp32"], speedup(load(bench))
    right = (r["train"]["precision_choice"]["chose"] == "bf16") == (whole > 1)
    minutes, seconds = divmod(round(r["wall_seconds"]), 60)
    made = f", from `{r['script']}`" if r.get("script") else ""
    made += off_note(train_params_at(r["machine"].get("source_revision") or "unknown"))
    out([f"On that machine a fresh clone's `make run` (`{path}`{made}) took {minutes} min {seconds} s, trained in "
         f"{r['train']['precision']} at {num(r['train']['images_per_second'], 0)} images/s and reached "
         f"{pct(r['eval']['acc'])} test accuracy. Its probe measured bf16 at {num(probe['bf16'], 0)} images/s "
         f"against fp32's {num(probe['fp32'], 0)} ({gain:.2f}×), against {whole:.2f}× over whole epochs in "
         f"`{bench}`: a probe of a few steps on one batch is a rough measure (this one "
         f"{'overstated' if gain > whole else 'understated'} bf16's lead), though it "
         f"{'made the right choice' if right else 'chose the slower precision'}."])


def head_grad(path: str) -> None:
    """docs/benchmarks.md: training steps with the head's gradient handed back channels-last against as flatten
    returns it, side by side in one run."""
    b = load(path)
    m = b["machine"]
    rows = []
    for r in b["runs"]:
        t, k = r["step_ms_median"], r["kernel_self_ms_per_step"]
        on, off = k["channels_last_grad"], k["as_flatten_returns"]
        rows.append([r["precision"], f"{t['as_flatten_returns']:.1f} ms", f"{t['channels_last_grad']:.1f} ms",
                     f"**{r['speedup']:.2f}×**",
                     f"{sum(off.values()):.1f} ms → {sum(on.values()):.1f} ms"])
    out([f"`{b['command']}` on {m['processor']} ({m['cpus']} CPUs), `{b['model']}`, batch {b['batch']}, "
         f"median of {b['rounds']} interleaved rounds of {b['steps_per_round']} steps:", ""])
    table(["precision", "step, gradient as flatten returns it", "step, gradient channels-last", "speedup",
           "GELU and batch-norm backward per step"], rows)
