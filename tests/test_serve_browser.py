"""The web page of `infdit serve` in a real browser: Debian's Chromium, headless, driven by Playwright.

It picks an image, sees the plan, starts the job, watches the progress move and the preview appear,
downloads the result and checks its size. A screenshot is saved (and to $INFDIT_SCREENSHOT when set:
docs/serve.png is made that way). Skipped where Chromium or Playwright is missing, unless
INFDIT_REQUIRE_BROWSER=1 (CI), where that is a failure.
"""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_serve import Server, image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage"]


def _need_browser():
    try:
        from playwright.sync_api import sync_playwright  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (pip install playwright)"
    else:
        if os.path.exists(CHROMIUM):
            return
        reason = "Chromium is not installed (apt-get install chromium)"
    if os.environ.get("INFDIT_REQUIRE_BROWSER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


def _overflows(page) -> list[str]:
    """What is wider than its box: the document, the header, each section and each job card."""
    return page.evaluate("""() => {
      const out = [];
      const d = document.documentElement;
      if (d.scrollWidth > d.clientWidth) out.push(`document ${d.scrollWidth} > ${d.clientWidth}`);
      for (const e of document.querySelectorAll("header, section, .job, .banner, .fields label")) {
        if (e.scrollWidth > e.clientWidth)
          out.push(`${e.tagName}.${e.className} ${e.scrollWidth} > ${e.clientWidth}`);
      }
      return out;
    }""")


def _placeholder_fits(page, selector: str) -> bool:
    """The input's placeholder fits its content box (measured in its own font)."""
    return page.evaluate("""(sel) => {
      const e = document.querySelector(sel), cs = getComputedStyle(e);
      const ctx = document.createElement("canvas").getContext("2d");
      ctx.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
      const room = e.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
      return ctx.measureText(e.placeholder).width <= room;
    }""", selector)


@pytest.mark.slow
def test_the_page_runs_a_job_in_a_real_browser(tmp_path, tiny_weights, tmp_path_factory):
    _need_browser()
    pytest.importorskip("fastapi")
    from playwright.sync_api import expect, sync_playwright

    src = image(tmp_path / "holiday photo.png", 48, 64, seed=5)
    server = Server(tmp_path / "jobs", tiny_weights, cache=tmp_path_factory.getbasetemp() / "serve-cache")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 390, "height": 1100}, accept_downloads=True)
                errors = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(server.url)
                expect(page.locator("#info")).to_contain_text("cpu float32")
                # the loaded model: its name and kind, and a warning that a random model makes noise
                expect(page.locator("#model")).to_contain_text("tiny.safetensors")
                expect(page.locator("#model .kind")).to_have_text("random test model")
                expect(page.locator("#model-warning")).to_be_visible()
                expect(page.locator("#model-warning")).to_contain_text("noise")
                assert _placeholder_fits(page, "#res"), "the res field's placeholder is cut off at 390 px"
                page.set_input_files("#file", str(src))
                # a plan the server refuses: its one line, in red, and no Start
                page.fill("#res", "not a size")
                error = page.locator("#plan-error")
                expect(error).to_contain_text("not a size")
                assert error.evaluate("e => getComputedStyle(e).color") == "rgb(192, 38, 45)"
                assert "\n" not in error.inner_text()
                expect(page.locator("#start")).to_be_disabled()
                page.fill("#scale", "4")
                page.fill("#steps", "40")
                expect(page.locator("#plan-lines")).to_contain_text(
                    "64x48 -> 256x192: 1 model pass(es), 79 model calls (40 steps)")
                expect(page.locator("#plan")).to_contain_text("256×192")
                page.click("#start")
                job = page.locator(".job").first
                expect(job.locator(".name")).to_have_text("holiday photo.png")
                expect(job.locator("a.download")).to_be_hidden()  # until the job is done
                # A phone-sized page: nothing wider than the screen, nor than its card.
                assert page.evaluate("document.documentElement.scrollWidth") <= 390
                assert _overflows(page) == []
                fractions = set()
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and len(fractions) < 3:
                    value = job.locator("progress").evaluate("p => p.value")
                    if 0 < value < 1:
                        fractions.add(value)
                    if job.locator(".state").inner_text() == "done":
                        break
                    time.sleep(0.05)
                assert len(fractions) >= 2, fractions  # the bar moved while the job ran
                preview = job.locator("img.preview")
                expect(preview).to_be_visible(timeout=60_000)
                page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                       arg=preview.element_handle(), timeout=60_000)
                shot = tmp_path / "serve.png"
                page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("INFDIT_SCREENSHOT"):
                    shutil.copy(shot, os.environ["INFDIT_SCREENSHOT"])
                expect(job.locator(".state")).to_have_text("done", timeout=120_000)
                expect(job.locator("progress")).to_have_js_property("value", 1)
                assert _overflows(page) == []
                shots = {390: tmp_path / "serve-390.png"}
                page.screenshot(path=str(shots[390]), full_page=True)
                # A desktop-sized page: nothing overflows, and the finished job's full bar spans its card
                page.set_viewport_size({"width": 1280, "height": 900})
                assert page.evaluate("document.documentElement.clientWidth") == 1280
                assert _overflows(page) == []
                assert _placeholder_fits(page, "#res")
                bar, inner = job.evaluate("""c => {
                  const cs = getComputedStyle(c);
                  return [c.querySelector("progress").getBoundingClientRect().width,
                          c.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)];
                }""")
                assert bar >= inner - 1, (bar, inner)
                shots[1280] = tmp_path / "serve-1280.png"
                page.screenshot(path=str(shots[1280]), full_page=True)
                if os.environ.get("INFDIT_SCREENSHOTS"):  # a folder: both sizes, to look at
                    for width, shot_ in shots.items():
                        shutil.copy(shot_, Path(os.environ["INFDIT_SCREENSHOTS"]) / f"serve-{width}.png")
                page.set_viewport_size({"width": 390, "height": 1100})
                with page.expect_download() as info:
                    job.locator("a.download").click()
                download = info.value
                assert download.suggested_filename == "holiday photo_infdit.png"
                out = tmp_path / "result.png"
                download.save_as(out)
                with Image.open(out) as im:
                    assert im.size == (256, 192)
                    assert np.asarray(im).std() > 0  # an image, not a blank
                expect(job.locator("button.cancel")).to_be_hidden()
                assert errors == []
            finally:
                browser.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_the_page_carries_the_token(tmp_path, tiny_weights, tmp_path_factory):
    _need_browser()
    pytest.importorskip("fastapi")
    from playwright.sync_api import expect, sync_playwright

    src = image(tmp_path / "a.png", 24, 24)
    server = Server(tmp_path / "jobs", tiny_weights, "--host", "0.0.0.0",
                    cache=tmp_path_factory.getbasetemp() / "serve-cache")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            try:
                page = browser.new_page()
                assert page.goto(server.url).status == 401  # no token, no page
                page.goto(f"{server.url}?token={server.token}")
                expect(page.locator("#info")).to_contain_text("cpu float32")
                page.set_input_files("#file", str(src))
                page.fill("#scale", "2")
                page.fill("#steps", "2")
                page.click("#start")  # the plan, the upload, the event stream and the preview all carry it
                job = page.locator(".job").first
                expect(job.locator(".state")).to_have_text("done", timeout=60_000)
                page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                                       arg=job.locator("img.preview").element_handle(), timeout=30_000)
                assert job.locator("a.download").get_attribute("href").endswith(f"?token={server.token}")
            finally:
                browser.close()
    finally:
        server.stop()


def test_the_model_label_names_the_kind(official_file, tiny_weights, monkeypatch, tmp_path):
    """What the page shows of the model (`/api/info`'s "model"): a registry model is official, a file
    `infdit convert` made is converted, a file with no conversion record is a random test model, warned."""
    from infdit_cli.cli.serve import model_label

    monkeypatch.setenv("INFDIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("INFDIT_WEIGHTS", raising=False)
    assert model_label(None, None) == {"name": "infdit-4x", "kind": "official", "warning": None}
    assert model_label(str(official_file), None) == {"name": "upstream-a.safetensors", "kind": "converted",
                                                     "warning": None}
    random = model_label(str(tiny_weights), None)
    assert random["name"] == "tiny.safetensors" and random["kind"] == "random test model"
    assert "noise" in random["warning"]
