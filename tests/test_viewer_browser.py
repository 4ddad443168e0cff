"""nerfstudio's viewer in a real browser: the Level of detail slider changes what renders and what it costs.

Trains a small `vqad` run on the demo scene, starts `ns-viewer` on it (viser serves its web client from the
installed package: nothing is downloaded), opens it in headless Chromium through Selenium, waits for a rendered
frame, moves **Level of detail** from the finest level to 0 and checks that the rendered image changes and that
**Stored size at LOD** shows a smaller size than at the finest level. The two screenshots are written to
``$VQAD_TEST_ARTIFACTS`` (default: the test's tmp directory).

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``, ``/usr/bin/chromedriver``) and the
``selenium`` package (the ``dev`` extra); skipped otherwise. Selenium is given the driver's path, so it never
fetches a browser or a driver.

Settings: ``VQAD_VIEWER_TEST_CONFIG`` opens an existing run's config.yml instead of training one (the README's
screenshots come from the quick start's run); ``VQAD_VIEWER_TEST_FULL_RES=1`` keeps the viewer's default 512 px
render resolution (the test lowers it to 64 px, which a CPU renders in a fraction of a second), and
``VQAD_VIEWER_TEST_SETTLE_S`` how long a frame must stay unchanged to count as rendered (default 2 s; a CPU takes
longer than that to render 512 px, so raise it with full resolution).
"""

from __future__ import annotations

import copy
import io
import os
import re
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="headless browser test: needs Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)",
    ),
    pytest.mark.skipif(not HAVE_SELENIUM, reason="headless browser test: needs selenium (pip install -e '.[dev]')"),
]

TRAIN_STEPS = 30
VIEWER_START_TIMEOUT_S = 180
FRAME_TIMEOUT_S = 90
SETTLE_S = float(os.environ.get("VQAD_VIEWER_TEST_SETTLE_S", 2.0))
SIZE_TEXT = re.compile(r"([0-9.]+) KiB \(levels 0\.\.(\d+)\)")


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory) -> dict:
    env = dict(os.environ)
    env["TORCH_HOME"] = str(tmp_path_factory.mktemp("empty_torch_home"))
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, offline_env) -> Path:
    """config.yml of a briefly trained vqad run on a small demo scene (or VQAD_VIEWER_TEST_CONFIG)."""
    if os.environ.get("VQAD_VIEWER_TEST_CONFIG"):
        return Path(os.environ["VQAD_VIEWER_TEST_CONFIG"])
    from vqad_nerfstudio.demo.scene import DemoSceneConfig, write_demo_scene

    root = tmp_path_factory.mktemp("viewer_run")
    scene = write_demo_scene(
        root / "demo", DemoSceneConfig(resolution=32, num_train=12, num_eval=1, supersample=1), show_progress=False
    )
    (ep,) = [ep for ep in entry_points(group="nerfstudio.method_configs") if ep.name == "vqad"]
    config = copy.deepcopy(ep.load().config)
    config.machine.device_type = "cpu"
    config.max_num_iterations = TRAIN_STEPS
    config.steps_per_save = TRAIN_STEPS
    config.output_dir = root / "outputs"
    config.vis = "tensorboard"
    config.pipeline.datamanager.data = scene
    config.pipeline.datamanager.train_num_rays_per_batch = 256
    model = config.pipeline.model
    model.num_levels, model.base_resolution, model.dense_resolution = 3, 8, 32
    model.num_samples, model.occupancy_resolution, model.prune_steps = 48, 16, (TRAIN_STEPS // 2,)
    saved = dict(os.environ)
    os.environ.update({k: offline_env[k] for k in ("TORCH_HOME", "HF_HUB_OFFLINE")})
    try:
        config.set_timestamp()
        config.save_config()
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        trainer.train()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    (path,) = config.output_dir.glob("*/vqad/*/config.yml")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def viewer_url(run_config, offline_env, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("viewer_log") / "ns-viewer.log"
    command = [str(Path(sys.executable).with_name("ns-viewer")), "--load-config", str(run_config)]
    command += ["--viewer.websocket-port", str(port), "--viewer.websocket-host", "127.0.0.1"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=offline_env)
    try:
        deadline = time.monotonic() + VIEWER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"ns-viewer exited ({process.returncode}):\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ns-viewer did not listen on {port}:\n{log.read_text()[-3000:]}"
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1000,620",
        "--use-angle=swiftshader",  # WebGL without a GPU
        "--enable-unsafe-swiftshader",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    directory = Path(os.environ.get("VQAD_TEST_ARTIFACTS", tmp_path))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _wait(condition, timeout: float, what: str, poll: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _labelled(driver, label: str, inner_xpath: str):
    """The element matching ``inner_xpath`` in the GUI row labelled ``label``."""
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.XPATH, f"//label[text()='{label}']/ancestor::div[{inner_xpath}][1]")
    return row.find_element(By.XPATH, inner_xpath)


class Viewport:
    """Screenshots of the page, and the part of the 3D canvas that the control panel does not cover."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.driver = driver
        canvas = driver.find_element(By.TAG_NAME, "canvas").rect
        panel_left = driver.find_element(By.XPATH, "//*[text()='Connected']").rect["x"]
        scale = driver.execute_script("return window.devicePixelRatio") or 1.0
        left, top = canvas["x"], canvas["y"]
        right, bottom = min(canvas["x"] + canvas["width"], panel_left - 10), canvas["y"] + canvas["height"]
        self.box = tuple(int(v * scale) for v in (left, top, right, bottom))

    def png(self) -> bytes:
        return self.driver.get_screenshot_as_png()

    def render(self, png: bytes) -> np.ndarray:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB").crop(self.box), dtype=np.float32)

    def settled_frame(self, different_from: np.ndarray | None = None, timeout: float = FRAME_TIMEOUT_S):
        """A screenshot whose render is non-uniform (and differs from ``different_from``) and unchanged for
        SETTLE_S."""
        state = {"last": None, "since": 0.0}

        def settled():
            png = self.png()
            image = self.render(png)
            now = time.monotonic()
            if image.std() < 2.0 or (different_from is not None and _difference(image, different_from) < 1.0):
                state["last"] = None
                return None
            if state["last"] is None or _difference(image, state["last"]) > 0.2:
                state["last"], state["since"] = image, now
                return None
            return (png, image) if now - state["since"] >= SETTLE_S else None

        return _wait(settled, timeout + SETTLE_S, "a settled rendered frame", poll=0.5)


def _difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def _size_text(driver, lod: int) -> float:
    text_input = _labelled(driver, "Stored size at LOD", ".//input")
    seen = []

    def shows_lod():
        seen.append(text_input.get_attribute("value") or "")
        match = SIZE_TEXT.search(seen[-1])
        return match if match and int(match.group(2)) == lod else None

    what = f"'Stored size at LOD' for levels 0..{lod}"
    try:
        return float(_wait(shows_lod, FRAME_TIMEOUT_S, what).group(1))
    except AssertionError as error:
        raise AssertionError(f"{error}; it shows {seen[-1]!r}") from None


def test_lod_slider_changes_render_and_stored_size(viewer_url, browser, artifacts):
    from selenium.webdriver.common.keys import Keys

    browser.get(viewer_url)
    lod_thumb = _wait(
        lambda: (
            browser.find_elements("xpath", "//label[text()='Level of detail']")
            and _labelled(browser, "Level of detail", ".//*[@role='slider']")
        ),
        60,
        "the Level of detail slider",
    )
    finest = int(lod_thumb.get_attribute("aria-valuemax"))
    assert finest >= 1 and int(lod_thumb.get_attribute("aria-valuenow")) == finest
    if os.environ.get("VQAD_VIEWER_TEST_FULL_RES") != "1":
        _labelled(browser, "Max res", ".//*[@role='slider']").send_keys(Keys.HOME)  # 64 px: quick on a CPU
    viewport = Viewport(browser)

    _, render_finest = viewport.settled_frame()

    lod_thumb.send_keys(Keys.HOME)
    assert int(lod_thumb.get_attribute("aria-valuenow")) == 0
    size_lod0 = _size_text(browser, 0)
    png_lod0, render_lod0 = viewport.settled_frame(different_from=render_finest)
    (artifacts / "viewer_lod0.png").write_bytes(png_lod0)
    assert _difference(render_lod0, render_finest) >= 1.0

    lod_thumb.send_keys(Keys.END)  # back to the finest level, which now shows its size too
    size_finest = _size_text(browser, finest)
    assert 0 < size_lod0 < size_finest
    png_finest, render_back = viewport.settled_frame(different_from=render_lod0)
    (artifacts / "viewer_lod_finest.png").write_bytes(png_finest)
    assert _difference(render_back, render_finest) < _difference(render_lod0, render_finest)
