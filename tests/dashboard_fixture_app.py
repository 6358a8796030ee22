"""The dashboard on the test fixtures' accuracy results (tests/data/dashboard/accuracy: invented numbers), for the
browser test: streamlit run tests/dashboard_fixture_app.py."""

from pathlib import Path

from xqsim.dashboard.page import MEASUREMENTS, main

main(MEASUREMENTS, Path(__file__).parent / "data" / "dashboard" / "accuracy")
