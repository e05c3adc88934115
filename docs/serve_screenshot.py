"""Make docs/serve.png, the README's picture of the `textcl serve` page, in headless Chromium.

    textcl index MODEL --corpus textcl/demo/data/speeches.tsv --out /tmp/demo-index
    python docs/serve_screenshot.py /tmp/demo-index "taxes and the economy"

Starts `textcl serve INDEX --port 0` on 127.0.0.1, types the query, saves the page as a 64-colour PNG.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait


def main(index: str, query: str, out: str = "docs/serve.png") -> None:
    server = subprocess.Popen([sys.executable, "-m", "textcl", "serve", index, "--port", "0", "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = next(match.group(0) for line in server.stdout if (match := re.search(r"http://127\.0\.0\.1:\d+", line)))
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--window-size=900,640",
                     "--disable-background-networking", f"--user-data-dir={tempfile.mkdtemp()}"]:
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
        try:
            browser.get(url)
            WebDriverWait(browser, 30).until(lambda b: "documents" in b.find_element(By.ID, "health").text)
            k = browser.find_element(By.ID, "k")
            k.clear()
            k.send_keys("4")
            browser.find_element(By.ID, "query").send_keys(query, Keys.ENTER)
            WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#results .hit"))
            browser.save_screenshot(out)
        finally:
            browser.quit()
    finally:
        server.terminate()
        server.wait(30)
    Image.open(out).convert("RGB").quantize(64).save(out, optimize=True)
    print(f"wrote {out} ({Path(out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
