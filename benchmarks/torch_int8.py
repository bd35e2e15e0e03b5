"""Benchmark: real int8 in PyTorch (`st.compile`) on the MNIST CNN (W8A8 static) and all-MiniLM-L6-v2
(dynamic int8, and int4 weight-only), beside fp32 eager, torch.ao and torchao, all in one run.

    flock /tmp/shrink-bench.lock .venv/bin/python benchmarks/torch_int8.py
    .venv/bin/python benchmarks/torch_int8.py --compile-only   # compiles (fills inductor's cache), no timing

Contenders, each built from the same calibration data:
- CNN: fp32 eager and compiled; ours simulated (st.quantize, eager) and compiled (st.compile); torch.ao FX
  (`prepare_fx` / `convert_fx`, x86 qconfig mapping) and eager mode (QuantWrapper, conv+ReLU fused, x86
  qconfig); torchao PT2E (X86InductorQuantizer, torch.compile with freezing) where torchao imports.
- MiniLM (batch 32 x 32 tokens): fp32 eager and compiled; ours dynamic int8 per token, simulated and
  compiled; torch.ao `quantize_dynamic` (eager, per-tensor); torchao `Int8DynamicActivationInt8WeightConfig`
  compiled with freezing, as it comes and with the inductor setting st.compile uses
  (`realize_opcount_threshold`); ours int4 g32 weight-only, simulated and compiled. Every contender runs
  the same model object's attention (transformers' sdpa).
Latency: median of interleaved rounds, and paired ratios (alternated blocks, measure.latency.paired_ratio)
for the head-to-head pairs. Fidelity: MNIST top-1 accuracy and agreement with the simulated model;
MiniLM mean cosine of the sentence embeddings to fp32 and to our simulated model. Compile time: the
first call of each compiled model (inductor's on-disk cache as the previous run left it).
torchao comes from `.venv/torchao-extra` (docs/dependencies.md); rows drop out when it does not import.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import shrinktunnel as st  # noqa: E402
from shrinktunnel import assets  # noqa: E402
from shrinktunnel.core import data as D  # noqa: E402
from shrinktunnel.measure.latency import paired_ratio, time_fn  # noqa: E402
from shrinktunnel.quant.torch_int8 import REALIZE_OPCOUNT  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS_DIR, git_state, machine_info, today, write_results  # noqa: E402

NAME = "torch_int8"
TORCHAO_REALIZE = f"torchao int8 dynamic compiled, realize_opcount_threshold={REALIZE_OPCOUNT}"
THREADS = 2
TORCHAO_EXTRA = REPO / ".venv" / "torchao-extra"
CNN_BATCH, CNN_EVAL = 64, 2048  # fidelity on the first 2,048 MNIST test images: whole batches, one shape
MINILM_BATCH, TOKENS, HELD_OUT, OFFSET = 32, 32, 256, 1000
ROUNDS, RUNS = 2, 15
PAIRS, BLOCK = 10, 3
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")


def cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [f for f in CPU_FLAGS if f in flags]


def torchao():
    """torchao, from its own folder; None when it is absent or does not import beside this torch."""
    if TORCHAO_EXTRA.is_dir() and str(TORCHAO_EXTRA) not in sys.path:
        sys.path.append(str(TORCHAO_EXTRA))
    try:
        import torchao as ao  # noqa: F401

        return ao
    except Exception:  # any import failure: the rows drop out, the reason is printed
        traceback.print_exc()
        return None


def freezing_compile(model: nn.Module, **options: Any) -> Callable:
    """torch.compile with inductor's freezing (and `options`) on at every call (what torchao's CPU
    recipes ask for)."""
    from torch._inductor import config as inductor_config

    compiled = torch.compile(model)

    def run(*args, **kwargs):
        with torch.no_grad(), inductor_config.patch(freezing=True, **options):
            return compiled(*args, **kwargs)
    return run


def first_call(fn: Callable, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args, **kwargs)
    return time.perf_counter() - t0


# -- MNIST CNN ------------------------------------------------------------------------------------
def cnn_contenders(ao) -> tuple[dict[str, Callable], dict[str, float], dict[str, Any]]:
    """{label: model callable}, {label: compile seconds}, notes."""
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qconfig, get_default_qconfig_mapping
    from torch.ao.quantization import convert, prepare
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    fp32 = assets.mnist_cnn()
    calib = assets.mnist_calibration()
    x = calib[0][0]
    models: dict[str, Callable] = {"fp32 eager": fp32}
    compile_s: dict[str, float] = {}
    notes: dict[str, Any] = {}
    sim = st.quantize(fp32, st.QuantConfig(), data=calib, progress=False)
    models["ours simulated (st.quantize)"] = sim
    ours = st.compile(sim)
    compile_s["ours st.compile"] = first_call(ours, x)
    notes["ours_plan"] = ours.plan
    notes["ours_int8_matched"], notes["ours_int8_unmatched"] = ours.int8_matched, ours.int8_unmatched
    models["ours st.compile"] = ours
    f32c = freezing_compile(copy.deepcopy(fp32))
    compile_s["fp32 torch.compile"] = first_call(f32c, x)
    models["fp32 torch.compile"] = f32c
    torch.backends.quantized.engine = "x86"
    # torch.ao's quantized convs return channels-last tensors, on which the model's `x.view(N, -1)`
    # fails (every engine: x86, fbgemm, onednn; FX and eager). Each torch.ao contender gets the usual
    # workaround: FX, the converted graph's `view` made `reshape`; eager, the forward rebuilt as a
    # Sequential with nn.Flatten. st.compile runs the model's own forward unchanged.
    notes["torch_ao_workaround"] = "x.view -> reshape (FX graph) / nn.Flatten (eager Sequential)"
    with torch.no_grad():
        fx = prepare_fx(copy.deepcopy(fp32).eval(), get_default_qconfig_mapping("x86"), (x,))
        for xb, _ in calib:
            fx(xb)
        fx = convert_fx(fx)
        for node in fx.graph.nodes:
            if node.op == "call_method" and node.target == "view":
                node.target = "reshape"
        fx.recompile()
        models["torch.ao FX x86"] = fx
        base = copy.deepcopy(fp32).eval()
        eager = nn.Sequential(QuantStub(), base.conv_layers, nn.Flatten(), base.fc_layers, DeQuantStub()).eval()
        torch.ao.quantization.fuse_modules(eager, [["1.0", "1.1"], ["1.3", "1.4"], ["1.6", "1.7"], ["3.0", "3.1"]],
                                           inplace=True)
        eager.qconfig = get_default_qconfig("x86")
        prepare(eager, inplace=True)
        for xb, _ in calib:
            eager(xb)
        models["torch.ao eager x86"] = convert(eager)
    if ao is not None:
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

            quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
            with torch.no_grad():
                gm = torch.export.export(copy.deepcopy(fp32).eval(), (x,)).module()
                gm = prepare_pt2e(gm, quantizer)
                for xb, _ in calib:
                    gm(xb)
                gm = convert_pt2e(gm)
            pt2e = freezing_compile(gm)
            compile_s["torchao PT2E x86 inductor"] = first_call(pt2e, x)
            models["torchao PT2E x86 inductor"] = pt2e
        except Exception as exc:
            traceback.print_exc()
            notes["torchao_pt2e_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return models, compile_s, notes


def cnn_fidelity(models: dict[str, Callable]) -> dict[str, dict[str, float]]:
    test = assets.mnist_split("test", limit=CNN_EVAL, batch_size=CNN_BATCH)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        sim = torch.cat([models["ours simulated (st.quantize)"](xb) for xb, _ in test])
        labels = torch.cat([y for _, y in test])
        for label, m in models.items():
            logits = torch.cat([m(xb) for xb, _ in test])
            out[label] = {"accuracy": float((logits.argmax(1) == labels).float().mean()),
                          "top1_agreement_with_simulated": float((logits.argmax(1) == sim.argmax(1)).float().mean()),
                          "max_abs_diff_to_simulated": float((logits - sim).abs().max())}
    return out


# -- all-MiniLM-L6-v2 -----------------------------------------------------------------------------
def minilm_contenders(ao) -> tuple[dict[str, Callable], dict[str, float], dict[str, Any], list[dict]]:
    fp32 = assets.minilm()
    held = assets.tweet_batches(HELD_OUT, OFFSET, MINILM_BATCH, TOKENS)
    b = held[0]
    models: dict[str, Callable] = {"fp32 eager": fp32}
    compile_s: dict[str, float] = {}
    notes: dict[str, Any] = {"attention": f"{fp32.encoder.config._attn_implementation} for every contender "
                                          "(one model; compiled, all run aten's flash attention for CPU)"}
    dyn = st.quantize(fp32, {"activations": {"dynamic": True}}, progress=False)
    models["ours dynamic int8 simulated"] = dyn
    ours = st.compile(dyn)
    compile_s["ours dynamic int8 st.compile"] = first_call(ours, **b)
    notes["ours_dynamic_kinds"] = sorted(set(ours.plan.values()))
    notes["ours_dynamic_int8_matched"], notes["ours_dynamic_int8_unmatched"] = ours.int8_matched, ours.int8_unmatched
    models["ours dynamic int8 st.compile"] = ours
    f32c = freezing_compile(copy.deepcopy(fp32))
    compile_s["fp32 torch.compile"] = first_call(f32c, **b)
    models["fp32 torch.compile"] = f32c
    torch.backends.quantized.engine = "x86"
    models["torch.ao quantize_dynamic (eager)"] = torch.ao.quantization.quantize_dynamic(
        copy.deepcopy(fp32).eval(), {nn.Linear}, dtype=torch.qint8)
    if ao is not None:
        try:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            m = copy.deepcopy(fp32).eval()
            # set_inductor_config=False: its recommended settings are global (coordinate descent tuning,
            # float32 matmul precision "high") and would change every contender compiled or timed after it
            quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
            c = freezing_compile(m)
            compile_s["torchao int8 dynamic compiled"] = first_call(c, **b)
            models["torchao int8 dynamic compiled"] = c
            # the same model compiled with the inductor setting st.compile uses (realize_opcount_threshold):
            # how much of our speed is that setting, which torchao could use too
            c = freezing_compile(copy.deepcopy(m), realize_opcount_threshold=REALIZE_OPCOUNT)
            compile_s[TORCHAO_REALIZE] = first_call(c, **b)
            models[TORCHAO_REALIZE] = c
        except Exception as exc:
            traceback.print_exc()
            notes["torchao_error"] = f"{type(exc).__name__}: {exc}"[:300]
    int4 = st.quantize(fp32, {"weights": {"bits": 4, "granularity": "per_group", "group_size": 32},
                              "activations": None}, progress=False)
    models["ours int4 g32 weight-only simulated"] = int4
    c4 = st.compile(int4)
    compile_s["ours int4 g32 weight-only st.compile"] = first_call(c4, **b)
    notes["ours_int4_kinds"] = sorted(set(c4.plan.values()))
    models["ours int4 g32 weight-only st.compile"] = c4
    return models, compile_s, notes, held


def embed(model: Callable, batches: list[dict]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([D.first_tensor(model(**bb)) for bb in batches]).float()


def minilm_fidelity(models: dict[str, Callable], held: list[dict]) -> dict[str, dict[str, float]]:
    ref = embed(models["fp32 eager"], held)
    sims = {"dynamic": embed(models["ours dynamic int8 simulated"], held),
            "int4": embed(models["ours int4 g32 weight-only simulated"], held)}
    out = {}
    for label, m in models.items():
        e = embed(m, held)
        row = {"mean_cosine_to_fp32": float(F.cosine_similarity(ref, e, dim=1).mean()),
               "min_cosine_to_fp32": float(F.cosine_similarity(ref, e, dim=1).min())}
        sim = sims["int4"] if "int4" in label else sims["dynamic"] if label.startswith("ours") else None
        if sim is not None:
            row["mean_cosine_to_simulated"] = float(F.cosine_similarity(sim, e, dim=1).mean())
            row["max_abs_diff_to_simulated"] = float((sim - e).abs().max())
        out[label] = row
    return out


# -- timing ---------------------------------------------------------------------------------------
def latencies(models: dict[str, Callable], call: Callable[[Callable], Any]) -> dict[str, float]:
    best: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(ROUNDS):
            for label, m in models.items():
                ms = time_fn(lambda: call(m), warmup=3, runs=RUNS, threads=THREADS).median_ms
                best[label] = min(ms, best.get(label, float("inf")))
    return best


def paired(models: dict[str, Callable], call: Callable[[Callable], Any], pairs: list[tuple[str, str]]) -> dict:
    out = {}
    with torch.inference_mode():
        for a, b in pairs:
            if a in models and b in models:
                out[f"{a} / {b}"] = paired_ratio(lambda: call(models[a]), lambda: call(models[b]),
                                                 pairs=PAIRS, block=BLOCK, warmup=2).to_dict()
    return out


def render(res: dict[str, Any]) -> str:
    lines = [f"Measured {res['date']} on {res['machine']['cpu']} ({', '.join(res['cpu_flags'])}), "
             f"{THREADS} threads, torch {res['machine']['torch']}"
             + (f", torchao {res['torchao']}" if res.get("torchao") else ", torchao absent") + ".", ""]
    for key, title, cols in (
        ("cnn", "MNIST CNN, W8A8 static, batch 64 (fidelity on 2,048 test images)",
         ("accuracy", "top1_agreement_with_simulated", "max_abs_diff_to_simulated")),
        ("minilm", "all-MiniLM-L6-v2, batch 32 x 32 tokens (fidelity on 256 held-out tweets)",
         ("mean_cosine_to_fp32", "mean_cosine_to_simulated", "max_abs_diff_to_simulated")),
    ):
        if key not in res:
            continue
        sec = {"latency_ms": {}, "paired": {}, **res[key]}
        if not sec["latency_ms"]:  # --compile-only: fidelity and compile time, no timing
            sec["latency_ms"] = {label: float("nan") for label in sec["fidelity"]}
        lines += [f"### {title}", "", "| model | latency ms | x fp32 eager | " + " | ".join(cols) + " | compile s |",
                  "|---|---|---|" + "---|" * len(cols) + "---|"]
        base = sec["latency_ms"]["fp32 eager"]
        for label, ms in sec["latency_ms"].items():
            fid = sec["fidelity"].get(label, {})
            vals = [f"{fid[c]:.4f}" if c in fid else "" for c in cols]
            cs = sec["compile_s"].get(label)
            timed = ms == ms  # not NaN
            lines.append(f"| {label} | {f'{ms:.2f}' if timed else '-'} | {f'{base / ms:.2f}x' if timed else '-'} | "
                         + " | ".join(vals)
                         + f" | {'' if cs is None else f'{cs:.1f}'} |")
        notes = {k: v for k, v in sec.get("notes", {}).items() if k != "ours_plan"}
        if "ours_plan" in sec.get("notes", {}):
            kinds = list(sec["notes"]["ours_plan"].values())
            notes["ours_plan"] = {k: kinds.count(k) for k in sorted(set(kinds))}
        lines += ["", "Notes: " + "; ".join(f"{k}: {v}" for k, v in notes.items())]
        lines += ["", "| paired ratio (a / b latency, alternated blocks) | ratio | 95 % interval | a ms | b ms |",
                  "|---|---|---|---|---|"]
        for pair, r in sec["paired"].items():
            lines.append(f"| {pair} | {r['ratio']:.3f} | {r['low']:.3f} - {r['high']:.3f} | {r['a_ms']:.2f} | {r['b_ms']:.2f} |")
        lines.append("")
    lines += ["### Targets", "", "| target | measured | met |", "|---|---|---|"] if res.get("targets") else []
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile-only", action="store_true", help="build and compile every contender, no timing")
    parser.add_argument("--only", choices=("cnn", "minilm"), default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(THREADS)
    # Every compiled MiniLM shares SentenceEncoder.forward's code object, and each compiled instance
    # takes two of dynamo's cache entries for it (no_grad at the first call, inference_mode when timed).
    # Past the default limit of 8 dynamo runs the later models EAGER, silently (seen on 2026-12-08 with
    # five compiled MiniLMs: the last two rows were eager).
    torch._dynamo.config.recompile_limit = 64
    ao = torchao()
    res: dict[str, Any] = {"date": today(), "git": git_state(), "machine": machine_info(THREADS),
                           "cpu_flags": cpu_flags(), "torchao": getattr(ao, "__version__", None)}
    targets = []
    if args.only in (None, "cnn"):
        models, compile_s, notes = cnn_contenders(ao)
        print("cnn compile s:", compile_s, notes, flush=True)
        res["cnn"] = {"compile_s": compile_s, "notes": notes, "fidelity": cnn_fidelity(models)}
        print(res["cnn"]["fidelity"], flush=True)
        if not args.compile_only:
            x = assets.mnist_split("test", limit=CNN_BATCH, batch_size=CNN_BATCH)[0][0]
            call = lambda m: m(x)  # noqa: E731
            res["cnn"]["latency_ms"] = latencies(models, call)
            res["cnn"]["paired"] = paired(models, call, [
                ("ours st.compile", "torch.ao FX x86"), ("ours st.compile", "torchao PT2E x86 inductor"),
                ("ours st.compile", "fp32 eager"), ("ours st.compile", "ours simulated (st.quantize)")])
            r = res["cnn"]["paired"].get("ours st.compile / torch.ao FX x86")
            if r:
                targets.append({"target": "CNN: st.compile <= torch.ao FX x86 latency",
                                "measured": f"ratio {r['ratio']:.3f} ({r['low']:.3f} - {r['high']:.3f})",
                                "met": r["ratio"] <= 1.0})
            print(res["cnn"]["latency_ms"], flush=True)
        del models
    if args.only in (None, "minilm"):
        models, compile_s, notes, held = minilm_contenders(ao)
        print("minilm compile s:", compile_s, notes, flush=True)
        res["minilm"] = {"compile_s": compile_s, "notes": notes, "fidelity": minilm_fidelity(models, held)}
        print(res["minilm"]["fidelity"], flush=True)
        if not args.compile_only:
            b = held[0]
            call = lambda m: m(**b)  # noqa: E731
            res["minilm"]["latency_ms"] = latencies(models, call)
            res["minilm"]["paired"] = paired(models, call, [
                ("ours dynamic int8 st.compile", "torchao int8 dynamic compiled"),
                ("ours dynamic int8 st.compile", TORCHAO_REALIZE),
                ("ours dynamic int8 st.compile", "fp32 eager"),
                ("ours dynamic int8 st.compile", "torch.ao quantize_dynamic (eager)"),
                ("ours int4 g32 weight-only st.compile", "fp32 eager"),
                ("ours int4 g32 weight-only st.compile", "ours int4 g32 weight-only simulated")])
            r = res["minilm"]["paired"].get("ours dynamic int8 st.compile / torchao int8 dynamic compiled")
            fid = res["minilm"]["fidelity"]
            if r:
                ours_cos = fid["ours dynamic int8 st.compile"]["mean_cosine_to_fp32"]
                ao_cos = fid["torchao int8 dynamic compiled"]["mean_cosine_to_fp32"]
                targets.append({"target": "MiniLM: st.compile dynamic int8 <= torchao compiled int8 dynamic latency",
                                "measured": f"ratio {r['ratio']:.3f} ({r['low']:.3f} - {r['high']:.3f}); cosine to "
                                            f"fp32 {ours_cos:.4f} vs torchao {ao_cos:.4f}",
                                "met": r["ratio"] <= 1.0})
            print(res["minilm"]["latency_ms"], flush=True)
    if args.compile_only:  # untimed: written beside the timed figures, never over them
        res["targets"] = []
        write_results(RESULTS_DIR / f"{NAME}_untimed.json", res, render(res))
        print({k: res[k]["compile_s"] for k in ("cnn", "minilm") if k in res})
        return 0
    path = RESULTS_DIR / f"{NAME}.json"
    if args.only is not None and path.is_file():
        # one model per run (the lock held for less time): the other model's figures are kept, with
        # their own date and commit
        previous = json.loads(path.read_text())
        other = "minilm" if args.only == "cnn" else "cnn"
        if other in previous:
            res[other] = {**previous[other], "run": {k: previous.get(k) for k in ("date", "git", "cpu_flags")}}
            targets += [t for t in previous.get("targets", []) if t["target"].lower().startswith(other)]
    res["targets"] = targets
    write_results(path, res, render(res))
    print(render(res))
    return 0 if all(t["met"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
