"""The web UI in a real headless browser (Playwright driving Debian's chromium), plus its runner.

The browser test opens the page, checks the data, trains a tiny model on the bundled Chinese
sample, watches progress and the plots update, reloads the page mid-run (it re-attaches),
is refused a second job, stops, resumes and stops again, chats (alone and side by side with the base model), evaluates and
exports from the Runs tab, and switches the language. Errors along the way must show as messages.

Screenshots of every tab go to $ORPO_LOCAL_SCREENSHOTS when set (the README's come from
`make screenshots`, which runs this test on the bundled model); set ORPO_LOCAL_UI_MODEL to train
another model than the tiny one.
"""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import need

gr = need("gradio", "the web UI needs gradio: pip install -e '.[ui]'")
pytest.importorskip("torch")

from orpo_local.ui.locales import EN, ZH  # noqa: E402
from orpo_local.ui.runner import Runner, explain  # noqa: E402

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


def find_chromium() -> str | None:
    return os.environ.get("ORPO_LOCAL_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


# ------------------------------------------------------------------ the runner, without a browser

def test_runner_reports_failures_as_messages_and_accepts_the_next_job(monkeypatch):
    import orpo_local.ui.runner as runner_module

    calls = []

    def fake_train(config, resume=None, on_event=None, stop=None, progress=True, download_bar=None):
        calls.append(config)
        if config == "oom":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if config == "slow":
            while not stop.is_set():
                time.sleep(0.01)

    monkeypatch.setattr(runner_module, "train", fake_train)
    runner = Runner()
    assert runner.start("oom")
    runner.wait(5)
    snap = runner.snapshot()
    assert snap["status"] == "failed" and "out of memory" in snap["error"] and "lower the batch size" in snap["error"]
    assert runner.start("slow")
    assert not runner.start("second"), "one job at a time"
    assert runner.stop()
    runner.wait(5)
    assert calls == ["oom", "slow"] and not runner.busy and not runner.stop()


def test_explain_keeps_plain_messages():
    assert explain(ValueError("data.jsonl: no valid preference pairs")) == "data.jsonl: no valid preference pairs"
    assert "MemoryError" in explain(MemoryError()) and "smaller model" in explain(MemoryError())


def test_uploads_get_safe_unique_names(tmp_path):
    from orpo_local.ui.engine import Engine

    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads")
    src = tmp_path / "偏好 数据;rm -rf.jsonl"
    src.write_text("{}\n", encoding="utf-8")
    first, second = engine.save_upload(str(src)), engine.save_upload(str(src))
    assert first.parent == tmp_path / "uploads" and first.name == "rm_-rf.jsonl" and second.name == "rm_-rf-2.jsonl"
    (tmp_path / "x.exe").write_text("")
    with pytest.raises(ValueError, match="unsupported file type .exe"):
        engine.save_upload(str(tmp_path / "x.exe"))


def test_config_from_form_values_uses_the_config_validation(tmp_path):
    from orpo_local.config import ConfigError
    from orpo_local.ui.engine import Engine

    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en")
    with gr.Blocks():
        rate, steps, targets = engine.field("optim.learning_rate"), engine.field("optim.max_steps"), engine.field("lora.target_modules")
    config = engine.config_from({rate: 1e-4, steps: 12.0, targets: ["q_proj"]})
    assert config.optim.learning_rate == 1e-4 and config.optim.max_steps == 12 and config.lora.target_modules == ["q_proj"]
    assert config.run.runs_dir == str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="learning_rate must be > 0"):
        engine.config_from({rate: -1.0, steps: 12})
    assert steps.label == "Max steps" and "optimiser steps" in steps.info


# ------------------------------------------------------------------ the browser

@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    need(path is not None, "no chromium: apt-get install chromium (make test installs it as root), or set ORPO_LOCAL_CHROMIUM")
    sync_api = need("playwright.sync_api", "the browser test needs playwright: pip install -e '.[test]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=BROWSER_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny):
    from orpo_local.ui.app import launch

    root = tmp_path_factory.mktemp("ui")
    app, engine = launch(port=None, lang="zh", runs_dir=root / "runs", prevent_thread_lock=True, quiet=True)
    yield app.local_url, engine
    engine.runner.stop()
    engine.runner.wait(60)
    app.close()


def test_train_stop_chat_evaluate_export_in_a_browser(browser, server, tiny, tmp_path):
    shots = Path(os.environ.get("ORPO_LOCAL_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    model = os.environ.get("ORPO_LOCAL_UI_MODEL") or str(tiny)
    page.set_default_timeout(120_000 if model == str(tiny) else 600_000)  # a real model takes seconds a step on a CPU
    try:
        browse(page, *server, model, tmp_path, shots)
    except Exception:
        page.screenshot(path=str(shots / "failure.png"), full_page=True)
        print(f"screenshot of the failure: {shots / 'failure.png'}; runner: {server[1].runner.snapshot()}")
        raise
    finally:
        page.close()


def browse(page, url, engine, model, tmp_path, shots):
    page.goto(url)
    summary = page.locator("#model-summary")
    summary.get_by_text("134,515,008").wait_for()  # the bundled model is sized from its files before any load

    def tab(key: str):
        page.get_by_role("tab", name=ZH[key]).click()

    def fill(elem_id: str, value) -> None:
        box = page.locator(f"#{elem_id} input").first if page.locator(f"#{elem_id} input").count() else page.locator(f"#{elem_id} textarea")
        box.fill(str(value))
        box.press("Enter")

    def shoot(name: str) -> None:
        page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

    fill("model-name", model)
    if "smollm2" not in model:
        summary.get_by_text("2 层").wait_for()
    shoot("model")

    # Data: a missing file is a message, then the bundled sample is checked and previewed
    tab("tab.data")
    fill("data-path", str(tmp_path / "nope.jsonl"))
    page.locator("#data-check").click()
    page.locator("#data-summary").get_by_text("nope.jsonl").wait_for()
    assert "出错了" in page.locator("#data-summary").inner_text()
    fill("data-path", "zh-sample")
    page.locator("#data-check").click()
    page.locator("#data-summary").get_by_text("共 320 行").wait_for()
    preview = page.locator("#data-preview")
    assert preview.locator(".pair").count() == 3 and preview.locator(".pair-chosen").count() == 3
    assert "<|im_start|>assistant" in preview.locator(".pair-prompt").first.inner_text()
    shoot("data")

    # Train: a bad dataset fails with a readable message and the page keeps working
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n', encoding="utf-8")
    fill("data-path", str(bad))
    tab("tab.train")
    page.locator("#train-start").click()
    page.locator("#train-status").get_by_text("❌").wait_for()
    assert "no valid preference pairs" in page.locator("#train-status").inner_text()

    tab("tab.data")
    fill("data-path", "zh-sample")
    tab("tab.train")
    for elem_id, value in (("optim-max_steps", 500), ("optim-batch_size", 2), ("run-eval_every", 2), ("data-max_length", 384),
                           ("optim-learning_rate", 1e-3), ("run-save_every", 1000)):
        fill(elem_id, value)
    page.locator("#train-start").click()
    bar = page.locator("#train-progress-bar")
    page.wait_for_function("() => +document.querySelector('#train-progress-bar')?.dataset.step >= 2")
    assert bar.get_attribute("data-status") == "running" and bar.get_attribute("data-total") == "500"
    page.locator("#train-plot-loss canvas, #train-plot-loss svg").first.wait_for()
    drawn = page.locator("#train-plot-loss").screenshot()
    page.wait_for_function("() => +document.querySelector('#train-progress-bar')?.dataset.step >= 4")
    page.wait_for_timeout(1500)
    assert page.locator("#train-plot-loss").screenshot() != drawn, "the loss plot redraws as steps arrive"

    page.locator("#train-start").click()  # a second job is refused, the first goes on
    page.locator("#train-notice").get_by_text("已有训练任务在运行").wait_for()

    page.reload()  # a reloaded page re-attaches to the running job
    tab("tab.train")
    page.wait_for_function("() => document.querySelector('#train-progress-bar')?.dataset.status === 'running'")
    assert "正在训练" in page.locator("#train-status").inner_text()
    page.wait_for_function("() => document.querySelector('#optim-max_steps input').value === '500'")  # its settings too
    shoot("train")

    page.locator("#train-stop").click()
    page.wait_for_function("() => document.querySelector('#train-progress-bar')?.dataset.status === 'stopped'")
    run_dir = Path(engine.runner.run_dir)
    stopped_at = int(bar.get_attribute("data-step"))
    assert 4 <= stopped_at < 500 and (run_dir / "adapter").exists()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    assert "已停止" in page.locator("#train-status").inner_text()

    # Resume: pick the stopped run, it goes on from its checkpoint, stop it again
    page.locator("#train-resume-pick input").click()
    page.get_by_role("option", name=run_dir.name).click()
    page.locator("#train-resume").click()
    page.wait_for_function(f"() => +document.querySelector('#train-progress-bar')?.dataset.step > {stopped_at}"
                           " && document.querySelector('#train-progress-bar').dataset.status === 'running'")
    assert engine.runner.run_dir == str(run_dir)
    page.locator("#train-stop").click()
    page.wait_for_function("() => document.querySelector('#train-progress-bar')?.dataset.status === 'stopped'")
    resumed_at = int(bar.get_attribute("data-step"))
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    assert resumed_at > stopped_at and steps == list(range(1, resumed_at + 1)), "one continuous run, no step twice"

    # Chat: the newest run is selected on entering the tab; a reply streams in, then side by side
    tab("tab.chat")
    page.wait_for_function(f"() => document.querySelector('#chat-target input')?.value.includes({json.dumps(run_dir.name)})")
    fill("chat-max-tokens", 24)
    def replies(where: str, n: int) -> None:
        """Wait for the n-th bot message in chatbot `where` and for Send to be enabled again (the stream ended)."""
        page.wait_for_function(f"() => document.querySelectorAll('#{where} [data-testid=bot]').length >= {n}"
                               " && !document.querySelector('#chat-send').disabled")

    page.locator("#chat-message textarea").fill("用一句话介绍长城。")
    page.locator("#chat-send").click()
    replies("chat-main", 1)
    bot = page.locator("#chat-main [data-testid='bot']")
    assert bot.count() == 1 and bot.last.inner_text().strip(), "the tuned model replied"
    page.locator("#chat-compare input").check()
    page.locator("#chat-base").wait_for()
    page.locator("#chat-message textarea").fill("你好")
    page.locator("#chat-send").click()
    replies("chat-base", 1)
    replies("chat-main", 2)
    base = page.locator("#chat-base [data-testid='bot']")
    assert bot.count() == 2 and base.count() == 1 and base.last.inner_text().strip(), "both models replied"
    shoot("chat")

    # Runs: the run is listed as stopped; evaluate base vs tuned on its validation pairs; export the adapter
    tab("tab.runs")
    page.wait_for_function(f"() => document.querySelector('#runs-table').innerText.includes({json.dumps(run_dir.name)})")
    page.locator("#runs-config").get_by_text("lambda_").first.wait_for()
    fill("runs-eval-pairs", 8)
    page.locator("#runs-evaluate").click()
    page.locator("#runs-eval-note").get_by_text("eval.json").wait_for()
    table = page.locator("#runs-eval-table").inner_text()
    assert "accuracy" in table and "tuned" in table
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["base"]["pairs"] == 8 and set(saved["tuned"]) >= {"accuracy", "margin", "NLL chosen"}
    page.locator("#runs-export-adapter").click()
    link = page.locator("#runs-download [data-testid=download-link]")
    link.wait_for()
    assert link.get_attribute("download") == f"{run_dir.name}-adapter.zip"
    assert page.request.get(link.get_attribute("href")).body()[:2] == b"PK", "the page serves the zip"
    assert (run_dir / "exports" / f"{run_dir.name}-adapter.zip").exists()
    shoot("runs")

    # English, switchable in the page
    page.locator("#lang input").click()
    page.get_by_role("option", name="English").click()
    page.get_by_role("tab", name=EN["tab.train"]).wait_for()
    page.get_by_role("tab", name=EN["tab.train"]).click()
    page.get_by_text(EN["train.start"], exact=True).wait_for()


# ------------------------------------------------------------------ the listening socket

def listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on."""
    psutil = need("psutil", "the bind-address tests read sockets through psutil: pip install psutil")
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_orpo_local_ui_listens_on_127_0_0_1_only_by_default(tmp_path):
    """The real `orpo-local ui` process with its default --host: every socket it listens on is loopback."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as s:  # a free port (what the app binds next is its own business)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "ui.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}  # no traffic beyond 127.0.0.1
    with log.open("w") as out:
        app = subprocess.Popen([sys.executable, "-m", "orpo_local.cli", "ui", "--port", str(port), "--runs-dir", str(tmp_path / "runs")],
                               env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not any(p == port for _, p in listening(app.pid)):
            assert app.poll() is None, f"orpo-local ui exited with {app.returncode}: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "orpo-local ui did not listen within 120 s"
            time.sleep(0.2)
        assert listening(app.pid) == {("127.0.0.1", port)}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert page.status == 200 and b"orpo_local" in page.read()
    finally:
        app.terminate()
        try:
            app.wait(30)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait(30)


def test_launch_listens_on_127_0_0_1_only_by_default(server):
    """`launch()` called without a host, as the browser test's server is (in this process)."""
    url, _ = server
    port = int(url.rstrip("/").rsplit(":", 1)[1])
    assert {address for address, p in listening(os.getpid()) if p == port} == {"127.0.0.1"}
