"""The measured decode step of every scheme against fp16 across context, beside the model's: reads the H200's
2-layer CUDA-graph steps of Llama-3.1-8B at batch 8 (`kernel_roofline.py --across`: the Triton engine, each
scheme at 2 bits, the rematerializing ones fused, under remat and absorb_v) and draws, left, the measured steps
and, right, each step over fp16's, measured (solid) and by the model at the h200 profile's spec rates, fused
(dotted). Below 1 a scheme is faster than fp16; absorb_v is dash-dotted.

    python benchmarks/steps_across_context.py [--data measurements/h200/remat/across/kernel_roofline.json]

Writes steps_across_context.png/.svg and .csv beside the data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from xqsim import loading, plots, specs
from xqsim.estimate import estimate


def configs(labels) -> dict[str, specs.SchemeConfig]:
    """The SchemeConfig (fused where it rematerializes) of each measured label (SchemeConfig.label's form)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from kernel_roofline import ACROSS_CONFIGS, as_run  # imports torch, as the measurement did

    known = dict(ACROSS_CONFIGS)
    return {lab: as_run(known[lab]) for lab in labels}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("measurements/h200/remat/across/kernel_roofline.json"))
    a = ap.parse_args()
    data = json.loads(a.data.read_text())
    df = pd.DataFrame([r for r in data["rows"] if r.get("part") == "step" and r.get("step_time_graph_s")])
    hw = loading.load_hardware(data["device"]["spec_profile"])
    model = loading.load_model(data["device"]["model"]).model_copy(update={"n_layers": int(df["layers"].iloc[0])})
    cfgs = configs(df["scheme"].unique())
    df["model_step_s"] = [estimate(hw, model, cfgs[r.scheme], int(r.batch), int(r.context), "spec")
                          ["step_time_s"] for r in df.itertuples()]
    fp16 = df[df["scheme"] == "fp16"].set_index("context")
    df["measured_vs_fp16"] = df["step_time_graph_s"] / df["context"].map(fp16["step_time_graph_s"])
    df["model_vs_fp16"] = df["model_step_s"] / df["context"].map(fp16["model_step_s"])
    styles = {lab: plots._styles([(lab, c.scheme, c.bits, c.strategy, False)])[lab]
              | {"ls": "-." if c.strategy == "absorb_v" else "-", "marker": "s" if c.strategy == "absorb_v" else "o",
                 "ms": 3} for lab, c in cfgs.items()}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for lab, d in df.groupby("scheme", sort=False):
        left.plot(d["context"], d["step_time_graph_s"] * 1e3, **styles[lab])
        right.plot(d["context"], d["measured_vs_fp16"], **styles[lab])
        if lab != "fp16":
            right.plot(d["context"], d["model_vs_fp16"], color=styles[lab]["color"], ls=":", lw=1.2)
    batch = int(df["batch"].iloc[0])
    for ax, ylab in ((left, "measured 2-layer step (ms)"), (right, "step / fp16's step")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ticks = sorted(df["context"].unique())
        ax.set_xticks(ticks, [f"{t // 1024}k" for t in ticks])
        ax.set_xlabel(f"context (tokens), batch {batch}")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3, which="both")
    right.axhline(1.0, color="black", lw=0.8)
    left.set_title("measured (Triton engine, CUDA graph)", fontsize=9)
    right.set_title("against fp16: measured (markers) and model at spec rates, fused (dotted)", fontsize=9)
    fig.suptitle(f"{model.name} shapes, 2 layers, 2-bit caches, on {data['device']['device']} "
                 f"({data['device']['date']})", fontsize=10)
    handles = [plt.Line2D([], [], label=lab, **st) for lab, st in styles.items()]
    handles.append(plt.Line2D([], [], color="grey", ls=":", label="model (right)"))
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.9 / fig.get_figwidth(), 0.97))
    plots.save(fig, a.data.parent / "steps_across_context")
    df.to_csv(a.data.parent / "steps_across_context.csv", index=False)
    last = df[df["context"] == df["context"].max()]
    for r in last.itertuples():
        print(f"{r.scheme} at {r.context} tokens: {r.step_time_graph_s * 1e3:.2f} ms, {r.measured_vs_fp16:.2f}x fp16 "
              f"(model {r.model_vs_fp16:.2f}x)")


if __name__ == "__main__":
    main()
