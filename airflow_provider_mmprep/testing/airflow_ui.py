"""Airflow's web UI driven like a person would, in headless Chromium through Selenium.

Uses the system's Chromium and its matching driver (Debian: ``apt-get install -y chromium chromium-driver``);
nothing is downloaded (Selenium Manager is bypassed by naming both binaries). Selectors are Airflow 3.3's:
the login form's ``username``/``password`` fields, ``[data-testid=trigger-dag-button]``, Param fields
``element_<param>``, ``[data-testid=trigger-dag-submit]``, the mapped-instances page
``/dags/{dag}/runs/{run}/tasks/{task}/mapped/{index}`` with its clear button (``aria-label`` "Press
shift+c to clear") opening the "Clear Task Instance" dialog (Downstream selected by default) and Confirm. Waits are for
elements, never for network idle (the SPA keeps polling).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .browser import find_chromium

DRIVER_NAMES = ("chromedriver", "chromium-driver")


def find_chromedriver() -> str | None:
    for name in DRIVER_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/lib/chromium/chromedriver" if Path("/usr/lib/chromium/chromedriver").is_file() else None


def ui_available() -> str | None:
    """None when the UI can be driven here, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    if find_chromium() is None:
        return "chromium not found (Debian: apt-get install -y chromium)"
    if find_chromedriver() is None:
        return "chromedriver not found (Debian: apt-get install -y chromium-driver)"
    return None


class AirflowUI:
    """One headless browser session on ``base_url``; a context manager that quits the browser."""

    def __init__(self, base_url: str, username: str, password: str, width: int = 1600, height: int = 1000,
                 timeout: float = 90) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.base_url = base_url.rstrip("/")
        self.username, self.password = username, password
        self.timeout = timeout
        self._profile = tempfile.mkdtemp(prefix="mmprep-ui-")
        options = webdriver.ChromeOptions()
        options.binary_location = find_chromium() or "chromium"
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update",
                     "--disable-sync", f"--window-size={width},{height}", f"--user-data-dir={self._profile}"):
            options.add_argument(flag)
        self.driver = webdriver.Chrome(service=Service(find_chromedriver()), options=options)

    def __enter__(self) -> "AirflowUI":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    # ---- helpers -----------------------------------------------------------------------------------------
    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float | None = None) -> Any:
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout or self.timeout, poll_frequency=0.25).until(condition)
        except TimeoutException:
            raise TimeoutError(f"UI: timed out waiting for {what} on {self.driver.current_url}") from None

    def element(self, css: str, clickable: bool = False, timeout: float | None = None) -> Any:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ec

        locate = ec.element_to_be_clickable if clickable else ec.visibility_of_element_located
        return self.wait(locate((By.CSS_SELECTOR, css)), css, timeout)

    def button_with_text(self, text: str, timeout: float | None = None) -> Any:
        from selenium.webdriver.common.by import By

        def find(driver: Any) -> Any:
            for button in driver.find_elements(By.XPATH, f"//button[normalize-space()={text!r}] | "
                                                         f"//button[@aria-label={text!r}]"):
                if button.is_displayed() and button.is_enabled():
                    return button
            return None

        return self.wait(find, f"a button {text!r}", timeout)

    def type_into(self, element: Any, value: str, attempts: int = 4) -> None:
        """Replace a React-controlled field's text by typing (``clear()`` bypasses React). A re-render while
        keys arrive can drop one (seen with Airflow's Params form), so the text is read back and retyped,
        a line at a time, until it is exact."""
        from selenium.webdriver.common.keys import Keys

        for _ in range(attempts):
            element.click()
            element.send_keys(Keys.CONTROL, "a")
            element.send_keys(Keys.DELETE)
            for number, line in enumerate(value.split("\n")):
                if number:
                    element.send_keys(Keys.SHIFT, Keys.ENTER) if element.tag_name == "input" else \
                        element.send_keys(Keys.ENTER)
                if line:
                    element.send_keys(line)
                time.sleep(0.05)
            time.sleep(0.2)
            if (element.get_attribute("value") or "") == value:
                return
        raise RuntimeError(f"UI: could not type {value!r} into {element.get_attribute('name')!r}: it shows "
                           f"{element.get_attribute('value')!r}")

    def screenshot(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    # ---- what a person does ------------------------------------------------------------------------------
    def login(self) -> None:
        self.driver.get(f"{self.base_url}/auth/login")
        self.type_into(self.element("input[name=username]"), self.username)
        self.type_into(self.element("input[name=password]"), self.password)
        self.element("button[type=submit]", clickable=True).click()
        self.wait(lambda d: "/auth/login" not in d.current_url, "the login to finish")

    def trigger(self, dag_id: str, params: dict[str, str | list[str]]) -> str:
        """Open the DAG, click Trigger, fill the Params form (lists: one item per line), submit; returns the
        new run's id (the UI opens the run's page)."""
        from urllib.parse import unquote

        self.driver.get(f"{self.base_url}/dags/{dag_id}")
        self.element("[data-testid=trigger-dag-button]", clickable=True).click()
        for name, value in params.items():
            text = "\n".join(value) if isinstance(value, list) else str(value)
            self.type_into(self.element(f"[name=element_{name}]"), text)
        submit = self.element("[data-testid=trigger-dag-submit]", clickable=True)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", submit)
        time.sleep(0.5)  # the form validates on change; let it settle before submitting
        self.element("[data-testid=trigger-dag-submit]", clickable=True).click()
        prefix = f"{self.base_url}/dags/{dag_id}/runs/"
        url = self.wait(lambda d: d.current_url if d.current_url.startswith(prefix) else None,
                        "the new run's page")
        return unquote(url[len(prefix):].split("/")[0].split("?")[0])

    def open_run_grid(self, dag_id: str, run_id: str) -> None:
        self.driver.get(f"{self.base_url}/dags/{dag_id}/runs/{run_id}")
        self.element("[data-testid=trigger-dag-button]")
        time.sleep(1)  # let the grid's task rows render

    def clear_mapped_instance(self, dag_id: str, run_id: str, task_id: str, map_index: int) -> None:
        """Open the mapped instance, click its clear button ("Press shift+c to clear"), keep the dialog's
        defaults (Downstream selected: later stages and the report rerun too), confirm."""
        self.driver.get(f"{self.base_url}/dags/{dag_id}/runs/{run_id}/tasks/{task_id}/mapped/{map_index}")
        self.element('button[aria-label*="to clear"]', clickable=True).click()
        self.button_with_text("Confirm").click()
        self.wait(lambda d: not d.find_elements("xpath", "//button[normalize-space()='Confirm']"),
                  "the clear dialog to close")
