"""XQuant's batch-1 claim on measured kernels: on Llama-2-7B shapes at batch 1, rebuilding K and V from 2-bit X
costs nothing while the step is bound by reading the weights, and starts to cost where the layer turns
compute-bound. Reads the H200's measured 2-layer CUDA-graph steps (`kernel_roofline.py --paper`: fp16 and XQuant-2
fused, remat and absorb_v, contexts 256..32k) and puts them beside the analytic model at the h200 profile's spec
rates, fused. For each XQuant strategy it states two contexts:

- measured: the grid interval where the measured step first rises 10% above its flat floor (its two shortest
  contexts);
- model: the context where the model's step turns compute-bound (its compute time passes its memory time), and
  where the model's step rises 10% above its own floor.

    python benchmarks/paper_claim.py [--data measurements/h200/remat/paper/kernel_roofline.json]

Writes paper_claim.json and paper_claim.png beside the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from xqsim import loading  # noqa: E402
from xqsim.estimate import estimate  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from kernel_roofline import PAPER_CONFIGS, as_run  # noqa: E402  (imports torch, as the measurement did)

RISE = 1.10  # a step "grows with context" from the first context where it is 10% above its floor
CONFIGS = {lab: as_run(c) for lab, c in PAPER_CONFIGS}  # the measured labels, fused as the Triton engine ran them


def model_step(hw, model, cfg, T: int) -> dict:
    e = estimate(hw, model, cfg, 1, T, "spec")
    return {"step_s": e["step_time_s"], "compute_s": e["t_compute_s"], "mem_s": e["t_mem_s"]}


def first_context(pred, lo: int = 1, hi: int = 1 << 22) -> int | None:
    """The smallest integer context in [lo, hi] where pred holds (pred monotone in context), else None."""
    if not pred(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pred(mid) else (mid + 1, hi)
    return lo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("measurements/h200/remat/paper/kernel_roofline.json"))
    a = ap.parse_args()
    data = json.loads(a.data.read_text())
    rows = [r for r in data["rows"] if r.get("part") == "step" and r.get("step_time_graph_s")]
    hw = loading.load_hardware(data["device"]["spec_profile"])
    model = loading.load_model(data["device"]["model"]).model_copy(update={"n_layers": rows[0]["layers"]})
    out, fig = {"device": data["device"], "rise": RISE, "schemes": {}}, plt.figure(figsize=(7.5, 4.6))
    ax = fig.add_subplot()
    for (label, cfg), color in zip(CONFIGS.items(), ("#555555", "#1f77b4", "#ff7f0e"), strict=True):
        mine = sorted((r["context"], r["step_time_graph_s"]) for r in rows if r["scheme"] == label)
        if not mine:
            continue
        ts, meas = [t for t, _ in mine], [s for _, s in mine]
        floor = min(meas[:2])
        up = next((i for i, s in enumerate(meas) if s > RISE * floor), None)
        pred = [model_step(hw, model, cfg, t)["step_s"] for t in ts]
        m_floor = model_step(hw, model, cfg, ts[0])["step_s"]
        turn = first_context(lambda t, c=cfg: (m := model_step(hw, model, c, t))["compute_s"] > m["mem_s"])
        rise = first_context(lambda t, c=cfg, f=m_floor: model_step(hw, model, c, t)["step_s"] > RISE * f, lo=ts[0])
        out["schemes"][label] = {
            "contexts": ts, "measured_step_s": meas, "model_step_s": pred,
            "measured_rise_between": [ts[up - 1], ts[up]] if up else None,
            "model_compute_bound_from": turn, "model_rise_from": rise}
        ax.plot(ts, [s * 1e3 for s in meas], "o-", color=color, label=f"{label}, measured")
        ax.plot(ts, [s * 1e3 for s in pred], "--", color=color, alpha=0.8, label=f"{label}, model (spec rates)")
        if label != "fp16" and turn:
            ax.axvline(turn, color=color, ls=":", lw=1)
        if label != "fp16" and up:
            ax.axvspan(ts[up - 1], ts[up], color=color, alpha=0.08)
        print(f"{label}: measured step {meas[0] * 1e3:.2f} ms at {ts[0]} tokens; rises >10% between "
              f"{ts[up - 1] if up else '-'} and {ts[up] if up else '-'} tokens; model compute-bound from "
              f"{turn} tokens, model rises >10% from {rise}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ts, [f"{t // 1024}k" if t >= 1024 else str(t) for t in ts])
    ax.set_xlabel("context (tokens), batch 1")
    ax.set_ylabel("2-layer decode step (ms)")
    ax.set_title(f"{model.name} shapes on {data['device']['device']}: measured (Triton engine, CUDA graph) vs "
                 "model\nshaded: where the measured step starts to grow; dotted: where the model turns "
                 "compute-bound", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(a.data.parent / "paper_claim.png", dpi=120)
    (a.data.parent / "paper_claim.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
