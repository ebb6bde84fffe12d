"""The explanation page (`dconnx serve` at `/`, `dconnx view`) in a real browser: headless Chromium
driven by selenium against a live server on 127.0.0.1.

The page keeps what it last received in `window.dconnxLast` (raw map values, g, h, f); the tests
compare it with `Explainer.maps` for the same image, class and alpha, and the pixels it draws with
`dconnx.viz.overlay`. Without chromium and chromedriver the tests fail and say how to install them.
Screenshots go under pytest's tmp dir and, when DCONNX_ARTIFACTS is set, into that folder.
"""
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

import dconnx
from dconnx.images import ImageInput
from dconnx.runtime import Explainer
from dconnx.serve.page import EXAMPLES, example_images
from dconnx.viz import MapStyle, overlay

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "models" / "fixture_cnn.onnx"
METHODS = "splitgrad,splitcam,splitlrp"
LAYER = "10"      # the 48x16x16 feature map entering the third MaxPool (as `make demo`)
CHROMIUM = os.environ.get("DCONNX_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("DCONNX_CHROMEDRIVER", "/usr/bin/chromedriver")
HOW_TO_INSTALL = ("install them with `sudo apt-get install -y chromium chromium-driver` (Debian/Ubuntu; "
                  ".ci/run does this) or point DCONNX_CHROMIUM / DCONNX_CHROMEDRIVER at a Chromium and its "
                  "chromedriver")
WINDOW = (1200, 720)


def _require_browser() -> None:
    """Fail (never skip) when the browser or its driver is missing, saying how to install them."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(f"the browser tests need {' and '.join(missing)}: {HOW_TO_INSTALL}", pytrace=False)
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("the browser tests need selenium: pip install -e '.[test]'", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"no answer from {url} in {timeout_s} s:\n{log.read_text()}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def start_server(model: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dconnx", "serve", str(model), "--host", "127.0.0.1",
                                 "--port", str(port), "--log-level", "warning"], stdout=out,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, log)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


def make_driver(downloads: Path | None = None, window: tuple = WINDOW):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={window[0]},{window[1]}", "--force-device-scale-factor=1",
                "--force-color-profile=srgb"):
        opts.add_argument(arg)
    if downloads is not None:
        opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                               "download.prompt_for_download": False})
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


def wait_js(driver, condition: str, timeout_s: float = 15.0):
    """Poll a JS expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return ({condition});")
        if value:
            return value
        time.sleep(0.02)
    errors = driver.execute_script("return window.dconnxErrors")
    raise AssertionError(f"timed out waiting for {condition}; errors shown on the page: {errors}")


def save_screenshot(driver, path: Path) -> Path:
    driver.save_screenshot(str(path))
    extra = os.environ.get("DCONNX_ARTIFACTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(extra) / path.name)
    return path


def page_maps(driver) -> dict:
    return driver.execute_script(
        "const L = window.dconnxLast, out = {};"
        "for (const [m, v] of Object.entries(L.maps)) out[m] = {shape: v.shape, data: Array.from(v.data)};"
        "return out;")


def canvas_pixels(driver, method: str) -> np.ndarray:
    """The RGB pixels of a method's overlay canvas, [H, W, 3] uint8."""
    got = driver.execute_script(
        "const c = document.querySelector(`figure[data-method='${arguments[0]}'] canvas.overlay`);"
        "return {h: c.height, w: c.width,"
        " data: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)};", method)
    return np.asarray(got["data"], dtype=np.uint8).reshape(got["h"], got["w"], 4)[..., :3]


# -- fixtures ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("page") / "fixture.dc.onnx"
    dconnx.convert(FIXTURE, out, methods=METHODS, layer=LAYER)
    return out


@pytest.fixture(scope="module")
def ex(converted) -> Explainer:
    return Explainer(converted)     # the providers the server picks too: the same numbers


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    _require_browser()
    proc, url = start_server(converted, tmp_path_factory.mktemp("page-log") / "serve.log")
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(server, downloads):
    driver = make_driver(downloads)
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, server):
    browser.get(server + "/")
    wait_js(browser, "window.dconnxReady")
    return browser


def upload(driver, path: Path) -> None:
    from selenium.webdriver.common.by import By
    before = driver.execute_script("return window.dconnxUpdates + window.dconnxErrors.length")
    driver.find_element(By.ID, "file").send_keys(str(path))
    wait_js(driver, f"window.dconnxUpdates + window.dconnxErrors.length > {before}")


def assert_maps_equal(got: dict, want, label: str) -> None:
    assert sorted(got) == sorted(want), label
    for m, v in got.items():
        ref = np.asarray(want[m][0], dtype=np.float64)
        arr = np.asarray(v["data"], dtype=np.float64).reshape(v["shape"])
        assert arr.shape == ref.shape, (label, m)
        scale = max(float(np.abs(ref).max()), 1e-30)
        np.testing.assert_allclose(arr, ref, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{label}: {m}")


# -- tests ------------------------------------------------------------------------
def test_examples_are_the_generated_ones():
    """The shipped example images are what `write_examples` draws (python -m dconnx.serve.page)."""
    from PIL import Image
    images = example_images()
    assert sorted(p.name for p in EXAMPLES.glob("*.png")) == sorted(images)
    for name, rgb in images.items():
        shipped = np.asarray(Image.open(EXAMPLES / name).convert("RGB"))
        np.testing.assert_array_equal(shipped, rgb, err_msg=name)


def test_page_maps_equal_explainer_and_follow_alpha_and_class(page, ex, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    # everything the page loads comes from the server itself (no CDN, no network)
    origins = page.execute_script(
        "return Array.from(document.querySelectorAll('script[src], link[href], img[src]'))"
        ".map(e => e.src || e.href)")
    assert origins and all(u.startswith(page.current_url.rstrip("/")) or u.startswith("data:") for u in origins), \
        origins
    # every control has an accessible name
    unnamed = page.execute_script(
        "return Array.from(document.querySelectorAll('input, button, [tabindex]')).filter(e =>"
        " !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.getAttribute('aria-describedby')"
        " && !e.textContent.trim() && !(e.querySelector('img[alt]'))).map(e => e.outerHTML)")
    assert not unnamed, unnamed

    image = EXAMPLES / "checker.png"
    upload(page, image)
    assert page.execute_script("return window.dconnxErrors") == []
    images = ImageInput.from_explainer(ex)
    x, rgb = images.load(image.read_bytes())
    alpha0 = ex.options["alpha_default"]
    last = page.execute_script("return {target: window.dconnxLast.target, alpha: window.dconnxLast.alpha,"
                               " f: window.dconnxLast.f, g: window.dconnxLast.g, h: window.dconnxLast.h,"
                               " ms: window.dconnxLast.ms, logits: window.dconnxLast.logits}")
    want = ex.maps(x[None], target=None, alpha=alpha0)
    assert last["target"] == int(want.target[0]) == 2        # the checker is recognized
    assert last["alpha"] == pytest.approx(alpha0)
    assert_maps_equal(page_maps(page), want, "argmax class, default alpha")
    out = ex(x[None], alpha=alpha0)
    t = last["target"]
    np.testing.assert_allclose([last["g"], last["h"], last["f"]],
                               [out["g"][0, t], out["h"][0, t], out["logits"][0, t]], rtol=1e-6, atol=1e-6)
    assert last["g"] - last["h"] == pytest.approx(last["f"], abs=1e-4)
    shown = page.find_element(By.ID, "streams").text
    assert f"{last['f']:.3g}".lstrip("-") in shown and "g" in shown and "h" in shown
    # top classes: all four classes, by logit, the explained one pressed, with names
    buttons = page.find_elements(By.CSS_SELECTOR, "#classes button")
    order = [int(b.get_attribute("data-cls")) for b in buttons]
    assert order == list(np.argsort(-np.asarray(last["logits"]))[:5])
    assert buttons[0].get_attribute("aria-pressed") == "true" and "checker" in buttons[0].text

    # the overlay pixels are dconnx.viz.overlay's, with the method's own colormap and range
    maps_now = page_maps(page)
    for m in ("splitgrad", "splitcam"):
        heat = np.asarray(maps_now[m]["data"], np.float32).reshape(maps_now[m]["shape"])
        ref = overlay(rgb, heat, 0.65, MapStyle.of(m, heat, warn=False))
        diff = np.abs(canvas_pixels(page, m).astype(int) - ref.astype(int))
        assert diff.max() <= 1, (m, diff.max())

    # alpha by keyboard: five arrow presses, debounced into one request
    requests = page.execute_script("return window.dconnxRequests")
    updates = page.execute_script("return window.dconnxUpdates")
    slider = page.find_element(By.ID, "alpha")
    slider.send_keys(Keys.ARROW_LEFT * 5)
    wait_js(page, f"window.dconnxUpdates > {updates}")
    time.sleep(0.3)      # a second (late) request would have been sent by now
    assert page.execute_script("return window.dconnxRequests") == requests + 1
    alpha1 = page.execute_script("return window.dconnxLast.alpha")
    assert alpha1 == pytest.approx(alpha0 - 0.05)
    want1 = ex.maps(x[None], target=None, alpha=alpha1)
    assert_maps_equal(page_maps(page), want1, f"alpha {alpha1}")
    assert not np.allclose(want1["splitgrad"], want["splitgrad"])    # alpha reaches the maps here
    ms = page.execute_script("return window.dconnxLast.ms")
    assert ms < 1500, f"one alpha update took {ms} ms"
    # a drag: five changes 20 ms apart, inside the debounce window, make one request
    requests = page.execute_script("return window.dconnxRequests")
    updates = page.execute_script("return window.dconnxUpdates")
    page.execute_async_script(
        "const done = arguments[arguments.length - 1], s = document.getElementById('alpha');"
        "let v = 0.2;"
        "const step = () => { s.value = String(v); s.dispatchEvent(new Event('input'));"
        " v += 0.01; if (v < 0.245) setTimeout(step, 20); else done(); };"
        "step();")
    wait_js(page, f"window.dconnxUpdates > {updates}")
    time.sleep(0.3)
    assert page.execute_script("return window.dconnxRequests") == requests + 1
    alpha1 = page.execute_script("return window.dconnxLast.alpha")
    assert alpha1 == pytest.approx(0.24)
    assert_maps_equal(page_maps(page), ex.maps(x[None], target=None, alpha=alpha1), f"alpha {alpha1}")

    # another class, chosen with the keyboard
    ring = page.find_element(By.CSS_SELECTOR, "#classes button[data-cls='1']")
    updates = page.execute_script("return window.dconnxUpdates")
    ring.send_keys(Keys.ENTER)
    wait_js(page, f"window.dconnxUpdates > {updates}")
    assert page.execute_script("return window.dconnxLast.target") == 1
    assert_maps_equal(page_maps(page), ex.maps(x[None], target=1, alpha=alpha1), "class 1")
    assert page.find_element(By.CSS_SELECTOR, "#classes button[aria-pressed='true']").get_attribute(
        "data-cls") == "1"

    # the overlay strength redraws locally, without a request
    requests = page.execute_script("return window.dconnxRequests")
    page.execute_script("const s = document.getElementById('strength'); s.value = '0.3';"
                        "s.dispatchEvent(new Event('input'));")
    time.sleep(0.2)
    assert page.execute_script("return window.dconnxRequests") == requests
    heat = np.asarray(page_maps(page)["splitcam"]["data"], np.float32).reshape(64, 64)
    ref = overlay(rgb, heat, 0.3, MapStyle.of("splitcam", heat, warn=False))
    assert np.abs(canvas_pixels(page, "splitcam").astype(int) - ref.astype(int)).max() <= 1
    shot = save_screenshot(page, tmp_path / "page_explained.png")
    assert shot.stat().st_size > 10_000


def test_page_shows_server_error_for_a_bad_file(page, tmp_path):
    from selenium.webdriver.common.by import By
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not an image\n")
    upload(page, bad)
    box = page.find_element(By.ID, "error")
    assert box.get_attribute("role") == "alert" and box.is_displayed()
    assert "server error 400" in box.text and "not an image file" in box.text, box.text
    save_screenshot(page, tmp_path / "page_error.png")
    # a good image afterwards clears the error
    upload(page, EXAMPLES / "ring.png")
    assert not box.is_displayed() and page.execute_script("return window.dconnxLast.target") == 1


def test_page_keyboard_and_drop(page):
    """Tab reaches every control in reading order; Enter on the drop zone opens the file chooser;
    an image dropped onto it is explained."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    upload(page, EXAMPLES / "ring.png")          # so that the class buttons exist
    page.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
    from selenium.webdriver.common.action_chains import ActionChains
    seen = []
    for _ in range(20):
        ActionChains(page).send_keys(Keys.TAB).perform()     # keys to the page, as a user presses them
        el = page.switch_to.active_element
        seen.append(el.get_attribute("id") or el.get_attribute("data-example") or
                    f"class{el.get_attribute('data-cls')}")
    want = ["drop", "file", "checker.png", "cross.png", "ring.png", "class1", "alpha", "strength",
            "download-panel", "download-maps"]
    positions = [seen.index(w) for w in want]
    assert positions == sorted(positions), seen
    page.execute_script("window.chooserOpened = 0;"
                        "document.getElementById('file').click = () => { window.chooserOpened += 1; };")
    page.find_element(By.ID, "drop").send_keys(Keys.ENTER)
    page.find_element(By.ID, "drop").send_keys(" ")
    assert page.execute_script("return window.chooserOpened") == 2
    updates = page.execute_script("return window.dconnxUpdates")
    page.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));"
        "document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true,"
        " cancelable: true}));", __import__("base64").b64encode((EXAMPLES / "cross.png").read_bytes()).decode())
    wait_js(page, f"window.dconnxUpdates > {updates}")
    assert page.execute_script("return [window.dconnxLast.image, window.dconnxLast.target]") == ["dropped.png", 0]


def test_page_downloads_panel_png_and_raw_maps(page, ex, downloads):
    from PIL import Image
    from selenium.webdriver.common.by import By
    from dconnx.viz import panel
    upload(page, EXAMPLES / "cross.png")
    page.find_element(By.ID, "download-maps").click()
    page.find_element(By.ID, "download-panel").click()
    deadline = time.monotonic() + 15
    names = {"cross.maps.json", "cross.panel.png"}
    while time.monotonic() < deadline and not all((downloads / n).is_file() for n in names):
        time.sleep(0.05)
    assert all((downloads / n).is_file() for n in names), sorted(p.name for p in downloads.iterdir())
    doc = json.loads((downloads / "cross.maps.json").read_text())
    x, rgb = ImageInput.from_explainer(ex).load((EXAMPLES / "cross.png").read_bytes())
    want = ex.maps(x[None], alpha=doc["alpha"])
    assert doc["target"] == int(want.target[0]) == 0 and doc["class_name"] == "cross"
    assert_maps_equal({m: {"shape": v["shape"], "data": v["values"]} for m, v in doc["maps"].items()}, want,
                      "downloaded maps")
    got = np.asarray(Image.open(downloads / "cross.panel.png").convert("RGB"))
    maps = {m: want[m][0] for m in ex.methods}
    title = f"class 0 'cross', logit {float(want.logits[0, 0]):.3g}, alpha {doc['alpha']:g}"
    ref = panel(rgb, maps, title, strength=0.65)
    assert got.shape == ref.shape
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_view_opens_the_page_in_the_browser(browser, tmp_path):
    """`dconnx view` prints the URL and hands it to the browser ($BROWSER, as `webbrowser` reads it).
    Its model keeps the maps at the layer's 16x16 (--no-upsample): the page resizes them to the
    picture as `dconnx explain` does."""
    converted = dconnx.convert(FIXTURE, tmp_path / "small_maps.dc.onnx", methods="splitgrad,splitcam",
                               layer=LAYER, upsample=False).path
    opened = tmp_path / "opened.txt"
    script = tmp_path / "browser.sh"
    script.write_text(f"#!/bin/sh\necho \"$1\" > {opened}.part && mv {opened}.part {opened}\n")
    script.chmod(0o755)
    port = free_port()
    log = tmp_path / "view.log"
    env = dict(os.environ, BROWSER=str(script), DISPLAY="")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dconnx", "view", str(converted), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not opened.is_file():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        assert opened.read_text().strip() == url
        assert url in log.read_text()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert b"/static/page.js" in r.read()
        browser.get(url)
        wait_js(browser, "window.dconnxReady")
        upload(browser, EXAMPLES / "cross.png")
        _, rgb = ImageInput.from_explainer(Explainer(converted)).load((EXAMPLES / "cross.png").read_bytes())
        maps = page_maps(browser)
        for m in ("splitgrad", "splitcam"):
            heat = np.asarray(maps[m]["data"], np.float32).reshape(maps[m]["shape"])
            assert heat.shape == (16, 16)
            ref = overlay(rgb, heat, 0.65, MapStyle.of(m, heat, warn=False))    # bilinear to 64x64 inside
            diff = np.abs(canvas_pixels(browser, m).astype(int) - ref.astype(int))
            assert diff.max() <= 1, (m, diff.max())
    finally:
        stop(proc)


def test_view_refuses_a_missing_model_and_a_busy_port(converted, tmp_path, capsys):
    from dconnx.cli import main
    assert main(["view", str(tmp_path / "missing.onnx"), "--no-browser"]) == 2
    assert "dconnx: error: no converted model" in capsys.readouterr().err
    with socket.socket() as taken:       # a port in use: exit 2 before loading the model
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["view", str(converted), "--no-browser", "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on" in capsys.readouterr().err


# -- a dense (segmentation) model: the region box ------------------------------------
SEG_SIZE = 16      # the U-Net of tests/test_segmentation.py: input and output 16x16


@pytest.fixture(scope="module")
def unet_model(tmp_path_factory) -> Path:
    """The U-Net of tests/test_segmentation.py (random weights, randomized BatchNorm), converted
    with three methods: output [batch, 4, 16, 16], a `region` input."""
    from test_segmentation import converted_unet_file
    return converted_unet_file(tmp_path_factory.mktemp("page-unet"), SEG_SIZE, METHODS)


@pytest.fixture(scope="module")
def unet_page(unet_model, tmp_path_factory):
    _require_browser()
    proc, url = start_server(unet_model, tmp_path_factory.mktemp("page-unet-log") / "serve.log")
    driver = make_driver(window=(1200, 1100))     # the region box and the class list in the screenshot
    try:
        driver.get(url + "/")
        wait_js(driver, "window.dconnxReady")
        yield driver
    finally:
        driver.quit()
        stop(proc)


def box_mask(box) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros((SEG_SIZE, SEG_SIZE), np.float32)
    m[y0:y1, x0:x1] = 1
    return m


def settle(driver, updates: int) -> None:
    wait_js(driver, f"window.dconnxUpdates > {updates}")
    time.sleep(0.3)          # a debounced request still on its way would land by now


def test_page_region_box_on_a_segmentation_model(unet_page, unet_model, tmp_path):
    """A dense model gets the region box: dragged on the image, typed in the number inputs and
    cleared; every request carries it, the maps the page receives are Explainer.maps for that
    box (and differ from the full-image maps), the classes are ranked by their region sum."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    page = unet_page
    ex = Explainer(unet_model)
    assert page.find_element(By.ID, "region-box").is_displayed()
    unnamed = page.execute_script(     # the region's inputs and button have accessible names too
        "return Array.from(document.querySelectorAll('#region-box input, #region-box button')).filter(e =>"
        " !(e.labels && e.labels.length) && !e.textContent.trim()).map(e => e.outerHTML)")
    assert not unnamed, unnamed
    rgb = (np.random.RandomState(3).rand(SEG_SIZE, SEG_SIZE, 3) * 255).astype(np.uint8)
    image = tmp_path / "street.png"
    Image.fromarray(rgb).save(image)
    x, _ = ImageInput.from_explainer(ex).load(image.read_bytes())
    alpha = ex.options["alpha_default"]

    upload(page, image)
    assert page.execute_script("return window.dconnxErrors") == []
    full = ex.maps(x[None], alpha=alpha)
    assert page.execute_script("return window.dconnxLast.requested.region") is None
    assert page.execute_script("return window.dconnxLast.target") == int(full.target[0])
    assert_maps_equal(page_maps(page), full, "every position")

    # drag from pixel (3, 2) to pixel (11, 8): the box 3,2,12,9 (columns 3..11, rows 2..8)
    canvas = page.find_element(By.ID, "picture")
    side = canvas.size["width"]
    assert canvas.size["height"] == side
    step = side / SEG_SIZE

    def offset(px, py):      # selenium's offsets are from the element's centre
        return int((px + 0.5) * step - side / 2), int((py + 0.5) * step - side / 2)
    updates = page.execute_script("return window.dconnxUpdates")
    ActionChains(page).move_to_element_with_offset(canvas, *offset(3, 2)).click_and_hold() \
        .move_to_element_with_offset(canvas, *offset(7, 5)) \
        .move_to_element_with_offset(canvas, *offset(11, 8)).release().perform()
    settle(page, updates)
    assert page.execute_script("return window.dconnxErrors") == []
    box = [3, 2, 12, 9]
    last = page.execute_script("return {region: window.dconnxLast.requested.region, target: "
                               "window.dconnxLast.target, scores: window.dconnxLast.scores, "
                               "sent: window.dconnxLast.region, f: window.dconnxLast.f}")
    assert last["region"] == box and last["sent"]["kind"] == "box" and last["sent"]["box"] == box
    assert [int(page.find_element(By.ID, f"region-{k}").get_attribute("value"))
            for k in ("x0", "y0", "x1", "y1")] == box
    want = ex.maps(x[None], alpha=alpha, region=box_mask(box))
    assert last["target"] == int(want.target[0])
    assert_maps_equal(page_maps(page), want, "box 3,2,12,9")
    for m in ex.methods:     # the box reaches the maps: they are not the full-image ones
        assert not np.allclose(want[m], full[m], rtol=1e-3, atol=1e-6 * np.abs(full[m]).max()), m
    np.testing.assert_allclose(last["scores"], want.scores[0], rtol=1e-5, atol=1e-5)
    assert last["f"] == pytest.approx(float(want.scores[0, last["target"]]), rel=1e-5, abs=1e-5)
    order = [int(b.get_attribute("data-cls")) for b in page.find_elements(By.CSS_SELECTOR, "#classes button")]
    assert order == list(np.argsort(-want.scores[0], kind="stable")[:5])
    assert "region sum" in page.find_element(By.ID, "classes").text
    # the box is drawn over the image (and over each map) where it is
    rect = page.find_element(By.ID, "region-rect")
    assert rect.is_displayed()
    pic = canvas.rect
    got = rect.rect
    assert abs(got["x"] - (pic["x"] + 3 * step)) <= 1 and abs(got["y"] - (pic["y"] + 2 * step)) <= 1
    assert abs(got["width"] - 9 * step) <= 1 and abs(got["height"] - 7 * step) <= 1
    assert len(page.find_elements(By.CSS_SELECTOR, "#maps .region-rect")) == len(ex.methods)
    save_screenshot(page, tmp_path / "page_region_box.png")
    shot = tmp_path / "page_region_box.png"
    assert shot.stat().st_size > 5_000

    # the keyboard: another class, then x1 typed and y0 stepped with the arrow keys
    pick = next(k for k in order if k != last["target"])
    updates = page.execute_script("return window.dconnxUpdates")
    page.find_element(By.CSS_SELECTOR, f"#classes button[data-cls='{pick}']").send_keys(Keys.ENTER)
    settle(page, updates)
    assert_maps_equal(page_maps(page), ex.maps(x[None], target=pick, alpha=alpha, region=box_mask(box)),
                      f"class {pick}, box {box}")
    updates = page.execute_script("return window.dconnxUpdates")
    x1 = page.find_element(By.ID, "region-x1")
    x1.send_keys(Keys.CONTROL, "a")
    x1.send_keys("8")
    page.find_element(By.ID, "region-y0").send_keys(Keys.ARROW_UP * 3)
    settle(page, updates)
    box = [3, 5, 8, 9]
    assert page.execute_script("return window.dconnxLast.requested.region") == box
    assert page.execute_script("return window.dconnxLast.target") == pick      # the chosen class stays
    assert_maps_equal(page_maps(page), ex.maps(x[None], target=pick, alpha=alpha, region=box_mask(box)),
                      f"class {pick}, typed box {box}")
    # an impossible box is not sent; the inputs say so
    requests = page.execute_script("return window.dconnxRequests")
    x0 = page.find_element(By.ID, "region-x0")
    x0.send_keys(Keys.CONTROL, "a")
    x0.send_keys("9")
    time.sleep(0.4)
    assert page.execute_script("return window.dconnxRequests") == requests
    assert x0.get_attribute("aria-invalid") == "true"
    assert "not a box" in page.find_element(By.ID, "region-state").text
    # Clear: every position again
    updates = page.execute_script("return window.dconnxUpdates")
    page.find_element(By.ID, "region-clear").send_keys(Keys.ENTER)
    settle(page, updates)
    assert page.execute_script("return window.dconnxLast.requested.region") is None
    assert not page.find_element(By.ID, "region-rect").is_displayed()
    assert_maps_equal(page_maps(page), ex.maps(x[None], target=pick, alpha=alpha), f"class {pick}, cleared")
    assert page.execute_script("return window.dconnxErrors") == []


def test_page_has_no_region_box_for_a_classifier(page):
    from selenium.webdriver.common.by import By
    upload(page, EXAMPLES / "ring.png")
    assert not page.find_element(By.ID, "region-box").is_displayed()
    assert page.execute_script("return window.dconnxLast.requested.region") is None


def take_docs_screenshot(out: Path) -> Path:
    """The README's screenshot: the fixture with three methods, the checker example explained."""
    from selenium.webdriver.common.by import By
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model = dconnx.convert(FIXTURE, Path(tmp) / "fixture_cnn.dc.onnx", methods=METHODS, layer=LAYER).path
        proc, url = start_server(model, Path(tmp) / "serve.log")
        driver = make_driver(window=(1200, 860))
        try:
            driver.get(url + "/")
            wait_js(driver, "window.dconnxReady")
            driver.find_element(By.CSS_SELECTOR, "#examples button[data-example='checker.png']").click()
            wait_js(driver, "window.dconnxUpdates > 0")
            png = driver.get_screenshot_as_png()
        finally:
            driver.quit()
            stop(proc)
    from PIL import Image
    im = Image.open(io.BytesIO(png)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    im.save(out, format="PNG", optimize=True)
    return out


if __name__ == "__main__":      # python tests/test_page_browser.py docs/images/view_page.png
    print(take_docs_screenshot(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/view_page.png")))
