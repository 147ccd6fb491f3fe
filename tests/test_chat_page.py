"""The chat page at / in a real headless Chromium: send a message, watch the reply stream in, screenshot it."""

import os
import shutil

import pytest

import glmtorch
from glmtorch.serve.app import create_app
from glmtorch.serve.server import build_engine
from test_serve import RunningServer

selenium = pytest.importorskip("selenium")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
SCREENSHOT_DIR = os.environ.get("GLMTORCH_SCREENSHOTS", os.path.join(os.path.dirname(__file__), "..", "artifacts"))


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,700"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def ask(driver, server, model_name: str, text: str, before_sending=lambda driver: None) -> None:
    """Open the page, wait for the model's name, send `text`, wait until the reply is complete."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    wait = WebDriverWait(driver, 60)
    wait.until(lambda d: d.find_element(By.ID, "model").text == model_name)
    before_sending(driver)
    driver.find_element(By.ID, "input").send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"))


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install)")
def test_chat_page_streams_a_reply(chat_checkpoint):
    from selenium.webdriver.common.by import By

    _, path = chat_checkpoint
    model = glmtorch.AutoModelForCausalLM.from_pretrained(path)
    tokenizer = glmtorch.AutoTokenizer.from_pretrained(path)
    engine = build_engine(model, tokenizer, max_num_seqs=2, max_queue=8)
    server = RunningServer(create_app(engine, tokenizer, "tiny-glm"))
    driver = browser()
    try:
        def settings(driver):
            driver.find_element(By.ID, "system").send_keys("Answer briefly.")
            driver.find_element(By.ID, "max-tokens").clear()
            driver.find_element(By.ID, "max-tokens").send_keys("24")
            # greedy: a sampled first token can be an end token, which would leave nothing to show
            driver.execute_script("const t = document.getElementById('temperature'); t.value = '0';"
                                  "t.dispatchEvent(new Event('input'));")

        ask(driver, server, "tiny-glm", "Hello, who are you?", settings)
        user = driver.find_element(By.CSS_SELECTOR, ".msg.user .content").text
        reply = driver.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text
        assert user == "Hello, who are you?"
        assert reply and "[error]" not in reply
        os.makedirs(SCREENSHOT_DIR, exist_ok=True)
        assert driver.save_screenshot(os.path.join(SCREENSHOT_DIR, "chat_page.png"))
    finally:
        driver.quit()
        server.close()
        engine.stop()


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver (apt-get install)")
def test_chat_page_folds_the_thinking_above_the_answer(tokenizer_dir):
    """A GLM-Z1 reply: its thinking goes into a folded <details> above the answer, the answer stays the message."""
    from selenium.webdriver.common.by import By

    from glmtorch.chat import default_chat_template
    from test_serve import ScriptedEngine

    tokenizer = glmtorch.GlmTokenizer.from_pretrained(tokenizer_dir, chat_template=default_chat_template("glmz1"))
    server = RunningServer(create_app(ScriptedEngine("Two and two.\n</think>\n\nFour."), tokenizer, "z1"))
    driver = browser()
    try:
        ask(driver, server, "z1", "2+2?")
        assert driver.find_element(By.CSS_SELECTOR, ".msg.assistant .content").text == "Four."
        folded = driver.find_element(By.CSS_SELECTOR, ".msg.assistant details.thinking")
        assert folded.get_attribute("open") is None and folded.find_element(By.TAG_NAME, "summary").text == "Thoughts"
        folded.find_element(By.TAG_NAME, "summary").click()
        assert folded.text.endswith("Two and two.")
        os.makedirs(SCREENSHOT_DIR, exist_ok=True)
        assert driver.save_screenshot(os.path.join(SCREENSHOT_DIR, "chat_page_thinking.png"))
    finally:
        driver.quit()
        server.close()
