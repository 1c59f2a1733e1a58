"""The walkthrough's web page in a real browser: headless Chromium (Debian's package) driven by
Playwright. Skipped where either is missing; CI installs both.

    python tests/test_browser.py PAGE.html PICTURE.png     # the README's screenshot, by this code
"""

import io
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.walkthrough import main as walk_main  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or sync_playwright is None,
    reason='needs Chromium and Playwright: apt-get install chromium fonts-noto-cjk; pip install -e ".[browser]"')


class Page:
    """A page open in headless Chromium, with what it logged and asked the network for."""

    def __init__(self, browser, path):
        self.errors, self.requests = [], []
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(Path(path).resolve().as_uri())
        self.page.wait_for_timeout(200)

    def show(self, step):
        """Scroll step n (1-based) into view and wait until its heatmap is drawn."""
        canvas = self.page.locator(f"#step-{step} canvas")
        canvas.scroll_into_view_if_needed()
        self.page.wait_for_function(f"document.querySelector('#step-{step} canvas').dataset.drawn === '1'")
        return canvas

    def hover_cell(self, step, row, col):
        """The value the tooltip shows for one cell of step n's heatmap."""
        canvas = self.show(step)
        box, d = canvas.bounding_box(), canvas.evaluate("c => c.dataset")
        cell = float(d["cell"])
        self.page.mouse.move(box["x"] + float(d["left"]) + cell * (col + 0.5), box["y"] + float(d["top"]) + cell * (row + 0.5))
        return self.page.locator("#tooltip").evaluate("t => t.dataset.value")


def open_browser(play):
    return play.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def capture(page_path, png_path, step=11):
    """A screenshot of the page at step n: the README's picture."""
    with sync_playwright() as play:
        browser = open_browser(play)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(Path(page_path).resolve().as_uri() + f"#step-{step}")
        page.wait_for_timeout(400)
        page.screenshot(path=str(png_path))
        browser.close()


@pytest.fixture(scope="module")
def sorter_page(trained_sort, tmp_path_factory):
    base, _ = trained_sort
    folder = tmp_path_factory.mktemp("page")
    args = [f"--out_dir={base / 'out' / 'sort'}", "--start=CBABBC"]
    assert walk_main(args + ["--format=html", f"--output={folder / 'sort.html'}"]) == 0
    return folder / "sort.html", args


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or sync_playwright is None:
        pytest.skip('needs Chromium and Playwright: apt-get install chromium fonts-noto-cjk; pip install -e ".[browser]"')
    with sync_playwright() as play:
        b = open_browser(play)
        yield b
        b.close()


def run_walk(args, capsys):
    assert walk_main(args) == 0
    return capsys.readouterr().out


@needs_browser
def test_the_page_has_every_step_and_asks_the_network_for_nothing(sorter_page, browser, capsys):
    path, args = sorter_page
    text = run_walk(args, capsys)
    page = Page(browser, path)
    assert page.page.locator("section.step").count() == len(re.findall(r"^\[\d+\] ", text, flags=re.M)) == 105
    assert page.page.locator("nav a").count() == 105, "a link per step"
    for step in (1, 10, 34, 105):
        if step != 105:
            page.show(step)
    assert page.errors == [], f"console errors: {page.errors}"
    assert page.requests == [path.resolve().as_uri()], f"requests beyond the page itself: {page.requests}"
    assert path.stat().st_size < 1_000_000, "a sorter's page is under 1 MB"
    html = path.read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and "@import" not in html and "<link" not in html


@needs_browser
def test_hovered_values_are_the_json_formats_numbers(sorter_page, browser, capsys):
    path, args = sorter_page
    steps = json.loads(run_walk(args + ["--format=json"], capsys))["steps"]
    page = Page(browser, path)
    for step, row, col in ((1, 0, 0), (1, 5, 47), (10, 5, 2), (10, 0, 3), (11, 4, 1), (33, 2, 60)):
        shown = page.hover_cell(step, row, col)
        expected = steps[step - 1]["values"][row][col]
        assert shown == ("-inf (masked)" if expected is None else str(expected)) or float(shown) == expected, \
            f"step {step} cell ({row}, {col}): page shows {shown}, the JSON format says {expected}"
    assert page.errors == []


@needs_browser
def test_arrow_keys_and_j_k_move_the_current_step(sorter_page, browser):
    path, _ = sorter_page
    page = Page(browser, path)
    current = lambda: int(page.page.evaluate("document.body.dataset.current"))  # noqa: E731
    assert current() == 1
    for key, expected in (("ArrowRight", 2), ("j", 3), ("ArrowRight", 4), ("ArrowLeft", 3), ("k", 2)):
        page.page.keyboard.press(key)
        assert current() == expected, f"after {key}: step {current()}"
    assert page.page.url.endswith("#step-2") and page.page.locator("section.step.current").get_attribute("id") == "step-2"
    page.page.locator('nav a[href="#step-40"]').click()
    settle = lambda n: page.page.wait_for_function(f"document.body.dataset.current === '{n}'", timeout=5000)  # noqa: E731
    settle(40)  # hashchange arrives after the click returns: a loaded machine showed the race
    assert current() == 40, "a step's link makes it the current step"
    page.page.go_back()
    settle(2)
    assert current() == 2, "and Back returns to the one before"


@needs_browser
def test_heatmaps_are_drawn_in_many_colours(sorter_page, browser, tmp_path):
    from PIL import Image
    path, _ = sorter_page
    page = Page(browser, path)
    shot = page.show(33).screenshot()  # the feed-forward layer: 6 x 192 values
    colours = Image.open(io.BytesIO(shot)).convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50, f"the heatmap has {len(colours)} colours: blank?"
    masked = Image.open(io.BytesIO(page.show(10).screenshot())).convert("RGB")
    assert (198, 201, 207) in {c for _, c in masked.getcolors(maxcolors=1 << 20)}, "masked cells are hatched grey"


@needs_browser
def test_a_chinese_page_opens_cleanly(trained_chinese, browser, tmp_path):
    base, _ = trained_chinese
    assert walk_main([f"--out_dir={base / 'out' / 'chinese'}", "--start=天行健", "--format=html",
                      f"--output={tmp_path / 'zh.html'}"]) == 0
    page = Page(browser, tmp_path / "zh.html")
    assert page.page.locator("section.step").count() > 10 and page.errors == []
    assert "天0" in page.page.locator("#walk-data").text_content()


@needs_browser
def test_a_chat_models_page_shows_its_template_and_loss(trained_numerals, browser, tmp_path):
    out, _ = trained_numerals
    assert walk_main([f"--out_dir={out}", "--start=305", "--reply=三百零五", "--format=html",
                      f"--output={tmp_path / 'chat.html'}"]) == 0
    page = Page(browser, tmp_path / "chat.html")
    shown = page.page.locator("#template").text_content()
    assert "<|end|> ends a turn" in shown and "the predictions of 三6 百7 零8 五9 <|end|>10" in shown
    assert page.errors == []


def test_html_is_written_beside_the_checkpoint_by_default(trained_sort, capsys):
    base, _ = trained_sort
    assert walk_main([f"--out_dir={base / 'out' / 'sort'}", "--start=CBABBC", "--format=html"]) == 0
    written = Path(capsys.readouterr().out.strip())
    assert written == base / "out" / "sort" / "walkthrough.html" and written.read_text().startswith("<!doctype html>")


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[2])
