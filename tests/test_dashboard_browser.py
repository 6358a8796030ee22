"""The dashboard in a real browser: `streamlit run app.py` served on localhost, Debian's chromium (headless) driven by
Playwright. Skipped unless pytest is given --browser (it needs the browser extra and `apt-get install chromium`);
--shots DIR keeps the screenshots (README: docs/dashboard/).

    pytest -m browser --browser --shots docs/dashboard
"""

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data" / "dashboard"
CHROMIUM = os.environ.get("XQSIM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Flags for a sandboxed machine with no network beyond localhost (the background services fail and retry).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWS = ["crossovers", "capacity", "roofline", "compare", "calibration", "accuracy"]


@contextlib.contextmanager
def serve(app: Path):
    """`streamlit run app` on a free localhost port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(app), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"streamlit did not start: {proc.stdout.read().decode()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("streamlit")
    with serve(ROOT / "app.py") as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM}: apt-get install chromium (or set XQSIM_CHROMIUM)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        # a laptop screen's width; tall enough to hold a whole view in one screenshot
        pg = browser.new_page(viewport={"width": 1440, "height": 2000}, accept_downloads=True)
        pg.set_default_timeout(60_000)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def shots(request, tmp_path_factory) -> Path:
    d = Path(request.config.getoption("--shots") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def crossover_text(page) -> str:
    return page.locator("[data-testid=stMarkdownContainer]", has_text="passes").first.inner_text()


def expected_crossover(batch: int) -> float:
    """The step-time crossover on the B200 of the default page, computed by the library at this batch."""
    from xqsim import loading, specs
    from xqsim.dashboard import data

    cfgs = [specs.SchemeConfig(scheme="fp16"), specs.SchemeConfig(scheme="kivi", bits=2, fused=True),
            specs.SchemeConfig(scheme="xquant_gqa", bits=2, strategy="absorb_v", fused=True)]
    hws, model = [loading.load_hardware("h100_sxm"), loading.load_hardware("b200")], loading.load_model("llama-3.1-8b")
    df, _ = data.sweep_frame(hws, model, cfgs, batch, data.context_grid(1024, 2**20))
    cr = data.context_crossovers(df, data.exact_crossovers(df, hws, model, cfgs, batch, ("step_time_s",)),
                                 "step_time_s")
    return float(cr[cr["hardware"] == "b200"]["crossover_context"].iloc[0])


def tokens(text: str) -> float:
    m = re.search(r"at ([\d,]+) tokens", text)
    assert m, text
    return float(m.group(1).replace(",", ""))


def test_change_batch_read_crossover_download_and_upload(page, server, shots):
    page.goto(f"{server}/?view=crossovers")
    page.get_by_text("passes", exact=False).first.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    first = crossover_text(page)
    assert first.startswith("b200: kivi-2b-fused passes fp16 in step time at"), first
    assert tokens(first) == round(expected_crossover(16)), first
    page.screenshot(path=shots / "browser_batch16.png")

    box = page.get_by_role("spinbutton", name="Batch [sequences]")
    box.fill("4")
    box.press("Enter")
    page.get_by_text("Step time vs context: llama-3.1-8b, batch 4").wait_for()
    expected = f"at {round(expected_crossover(4)):,} tokens"
    try:  # the rerun replaces the page's elements one by one: wait until the new crossover is shown
        page.wait_for_function("t => [...document.querySelectorAll('[data-testid=stMarkdownContainer]')]"
                               ".some(e => e.innerText.includes(t))", arg=expected, timeout=30_000)
    except Exception:
        pytest.fail(f"the page never showed the crossover '{expected}'; it shows: {crossover_text(page)}")
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    text = crossover_text(page)
    assert text.startswith("b200: kivi-2b-fused passes fp16") and expected in text, (first, text)
    page.wait_for_function("() => location.search.includes('batch=4&')", timeout=10_000)
    assert "batch=4&" in page.url, page.url  # the state is in the URL: this view can be shared
    page.screenshot(path=shots / "browser_batch4.png")

    with page.expect_download() as dl:
        page.get_by_role("button", name="Chart (SVG)").first.click()
    svg = Path(dl.value.path()).read_text()
    assert dl.value.suggested_filename == "crossovers.svg"
    assert svg.startswith("<svg") and "llama-3.1-8b, batch 4: step time [ms] per scheme" in svg

    page.locator("[data-testid=stFileUploaderDropzoneInput]").set_input_files(str(DATA / "bad_gpu.yaml"))
    error = page.locator("[data-testid=stAlert]", has_text="bad_gpu.yaml")
    error.wait_for()
    assert error.inner_text().strip() == \
        "bad_gpu.yaml: field 'mem_bytes_per_s.value': Input should be greater than 0 (got -1.0)"
    assert tokens(crossover_text(page)) == tokens(text)  # the page keeps working
    page.screenshot(path=shots / "browser_bad_upload.png")


@pytest.mark.parametrize("view", VIEWS)
def test_every_view_draws_a_chart(page, server, shots, view):
    page.goto(f"{server}/?view={view}&hw=h100_sxm,b200,a100_80gb")
    drawn = "[data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg.marks"
    if view == "accuracy" and not list((ROOT / "measurements" / "accuracy").glob("*.csv")):
        drawn = "[data-testid=stAlert]:has-text('No accuracy results yet')"  # a checkout without results
    page.locator(drawn).first.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    time.sleep(1.5)  # let Vega finish drawing
    assert page.locator("[data-testid=stException]").count() == 0
    page.screenshot(path=shots / f"{view}.png")


def test_accuracy_view_with_fixture_results(page, shots):
    """The accuracy view on tests/data/dashboard/accuracy (invented numbers)."""
    with serve(Path(__file__).parent / "dashboard_fixture_app.py") as url:
        page.goto(f"{url}/?view=accuracy")
        page.locator("[data-testid=stVegaLiteChart] canvas, [data-testid=stVegaLiteChart] svg.marks").first.wait_for()
        page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
        time.sleep(1.5)
        assert page.get_by_text("Pareto front: 3 of 6 results").count() == 1
        page.screenshot(path=shots / "accuracy_fixture.png")


@pytest.mark.parametrize("query,verdict", [
    ("batch=16&at=32k&dppl=50", "h100_sxm: serve with kivi-2b-fused: 1,659 tokens/s at batch 16 (2.89x fp16"),
    ("batch=16&at=32k", "h100_sxm: serve with kivi-4b-fused: 1,311 tokens/s at batch 16 (2.29x fp16"),
    ("batch=1&at=1k", "h100_sxm: serve with fp16: 155 tokens/s at batch 1 (the baseline"),
])
def test_verdict_in_the_browser(page, server, shots, query, verdict):
    """The verdict on top of the page, from the committed accuracy results: KIVI-2 fused where its quality is
    allowed, KIVI-4 fused under the default 5% limit, fp16 where nothing beats it."""
    page.goto(f"{server}/?hw=h100_sxm&spec=1&schemes=fp16,kivi-2b-fused,kivi-4b-fused&{query}")
    box = page.locator("[data-testid=stAlert]:has-text('Verdict')").first
    box.wait_for()
    page.wait_for_function("() => !document.querySelector('[data-testid=stStatusWidget]')")
    assert verdict in box.inner_text(), box.inner_text()
