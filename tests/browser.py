"""Headless Chromium for tests that look at a page as a person would.

Debian's `chromium` and `chromium-driver` (installed by `make test`), driven by Selenium with the
driver's path given, so nothing is downloaded; a fresh profile per browser, every background
network feature off. Use the `browser` fixture of tests/conftest.py; `skip_reason()` says why
there is no browser (the tests then skip with that message).
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# The project's machines have no network: nothing may try to reach one.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1000,900")
TIMEOUT = 60.0  # seconds for the driver to start, a page to load, a script to finish


def executables() -> tuple[str | None, str | None]:
    """Paths of chromium and chromedriver, None where missing."""
    return shutil.which("chromium"), shutil.which("chromedriver")


def skip_reason() -> str | None:
    """Why no browser can run here (a message naming the fix), or None."""
    chromium, driver = executables()
    if chromium is None or driver is None:
        return ("no chromium/chromedriver on PATH: `apt-get install chromium chromium-driver` "
                "(make test does) to run the page tests")
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed: pip install -e '.[test]'"
    return None


@contextlib.contextmanager
def chromium(profile: Path, downloads: Path) -> Iterator[Any]:
    """A Selenium WebDriver of headless Chromium with a fresh profile in `profile`; files it
    downloads land in `downloads`. Quits the browser on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = executables()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # driver.get_log("browser")
    downloads.mkdir(parents=True, exist_ok=True)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False,
        "safebrowsing.enabled": False})
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.set_page_load_timeout(TIMEOUT)
        driver.set_script_timeout(TIMEOUT)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(downloads)})
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.2) -> Any:
    """Polls condition() until it returns something truthy (returned); AssertionError naming
    `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def wait_for_download(folder: Path, name: str, timeout: float) -> Path:
    """The file `name` in `folder` once Chromium has finished writing it."""
    path = folder / name

    def finished() -> bool:
        return path.is_file() and not (folder / f"{name}.crdownload").exists()

    wait_for(finished, timeout, f"the download of {name} into {folder}")
    return path
