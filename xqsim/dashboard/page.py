"""The dashboard page: sidebar controls, one view at a time (only the shown view is computed), URL state."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from ..loading import DATA
from . import controls, views

MEASUREMENTS = (DATA / "measurements").resolve()  # the checkout's measurements/ (a link there), or the shipped copy


def main(measurements: Path = MEASUREMENTS, accuracy: Path = MEASUREMENTS / "accuracy") -> None:
    """Draw the page; `measurements` holds one folder of `xqsim measure` JSON files per device and
    `accuracy` the accuracy CSV files."""
    st.set_page_config(page_title="xqsim: KV-cache schemes vs GPUs", layout="wide")
    st.header("xqsim: which KV-cache scheme wins, on which GPU, and where it flips")
    c = controls.sidebar()
    view = controls.view_picker()
    for err in c.errors:
        st.error(err)
    render = {"crossovers": lambda c: views.render_crossovers(c, Path(measurements)),
              "capacity": lambda c: views.render_capacity(c, Path(measurements)),
              "roofline": views.render_roofline, "compare": views.render_compare,
              "calibration": lambda c: views.render_calibration(c, Path(measurements)),
              "accuracy": lambda c: views.render_accuracy(c, Path(accuracy))}
    if view not in ("calibration", "accuracy") and (not c.hws or not c.configs):
        st.warning("Select at least one GPU and one scheme in the sidebar.")
    else:
        if view not in ("calibration", "accuracy"):
            views.render_verdict(c, Path(accuracy))
        render[view](c)
    controls.write_url(c)
