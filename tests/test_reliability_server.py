"""Many users of one server, and safe server defaults (docs/reliability.md, items 5 and 6).

Every server here listens on 127.0.0.1 (port chosen by the OS) and every client loop is bounded.
The concurrency test drives page loads, progress API calls and chat requests from many threads
while one training job runs, then checks the job logged every step exactly once and nothing failed.
"""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import need

gr = need("gradio", "the web UI needs gradio: pip install -e '.[ui]'")
httpx = need("httpx", "the server tests talk HTTP through httpx (a gradio dependency)")
torch = pytest.importorskip("torch")

from orpo_local import TrainConfig  # noqa: E402
from orpo_local.runs import read_json, read_metrics  # noqa: E402
from orpo_local.ui.app import UnsafeServer, check_server, is_loopback, launch, read_auth  # noqa: E402
from orpo_local.ui.engine import Engine  # noqa: E402

REPO = Path(__file__).parent.parent
PAGE_LOADS, STATUS_CALLS, CHATS = 24, 24, 6


def config(tiny, arith, runs, **over) -> TrainConfig:
    base = {"model.name": str(tiny), "model.backend": "torch", "data.path": str(arith), "run.runs_dir": str(runs),
            "optim.max_steps": 400, "optim.batch_size": 2, "data.max_length": 128, "data.max_prompt_length": 64,
            "run.save_every": 2, "run.eval_every": 0, "data.val_fraction": 0.0}
    return TrainConfig().with_overrides({**base, **over})


def call(client: httpx.Client, url: str, api: str, data: list) -> list:
    """One Gradio API call (POST, then read its event stream); the outputs of its last event."""
    posted = client.post(f"{url}gradio_api/call/{api}", json={"data": data})
    posted.raise_for_status()
    stream = client.get(f"{url}gradio_api/call/{api}/{posted.json()['event_id']}")
    stream.raise_for_status()
    events = re.findall(r"event: (\w+)\ndata: (.*)", stream.text)
    assert events and events[-1][0] == "complete", stream.text[-500:]
    return json.loads(events[-1][1])


def api_of(app, elem_id: str, event: str = "click") -> str:
    block = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == elem_id)
    return next(f.api_name for f in app.fns.values() if (block._id, event) in [tuple(t) for t in f.targets])


@pytest.fixture
def server(tmp_path):
    app, engine = launch(port=None, lang="en", runs_dir=tmp_path / "runs", prevent_thread_lock=True, quiet=True)
    assert app.local_url.startswith("http://127.0.0.1:")
    yield app, engine
    engine.runner.stop()
    engine.runner.wait(60)
    app.close()


def test_many_sessions_and_chats_during_one_training_job(server, tiny, arith, tmp_path):
    """48 page loads and progress calls and 6 chat requests from 16 threads while a job trains: every
    request answered, chats told to wait (no model loaded beside the job), delete/resume of the running run
    refused, and the job's metrics hold every step exactly once. ~25 s on 2 cores."""
    from orpo_local.ui import tab_runs, tab_train

    app, engine = server
    url, chat_api = app.local_url, api_of(app, "chat-send")
    assert engine.runner.start(config(tiny, arith, tmp_path / "runs"))
    deadline = time.monotonic() + 120
    while engine.runner.snapshot()["step"] < 2:
        assert time.monotonic() < deadline and engine.runner.snapshot()["status"] != "failed", engine.runner.snapshot()
        time.sleep(0.1)
    run_dir = engine.runner.run_dir
    model = engine.fields["model.name"].value
    results, errors, lock = {"page": [], "status": [], "chat": []}, [], threading.Lock()

    def worker(kind: str, n: int) -> None:
        with httpx.Client(timeout=120) as client:
            for _ in range(n):
                try:
                    if kind == "page":
                        page = client.get(url)
                        answer = (page.status_code, b"orpo_local" in page.content)
                    elif kind == "status":
                        status, progress = call(client, url, "train_status", [])[:2]
                        answer = (int(re.search(r'data-step="(\d+)"', progress).group(1)), status)
                    else:
                        answer = call(client, url, chat_api, ["你好", [], [], f"model:{model}", False, "", 0.7, 0.9, 8, model])
                    with lock:
                        results[kind].append((engine.runner.busy, answer))
                except Exception as e:  # noqa: BLE001 - collected, the test fails on any
                    with lock:
                        errors.append(f"{kind}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(kind, n)) for kind, n, k in
               (("page", PAGE_LOADS // 6, 6), ("status", STATUS_CALLS // 6, 6), ("chat", CHATS // 3, 3)) for _ in range(k)]
    for t in threads:
        t.start()
    refused = [tab_runs.delete(engine, run_dir, True)[0], tab_train.resume(engine, run_dir)]
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert engine.runner.busy, "the job ended before the requests did: it must run through them"
    engine.runner.stop()
    engine.runner.wait(120)

    assert errors == []
    assert [len(results[k]) for k in ("page", "status", "chat")] == [PAGE_LOADS, STATUS_CALLS, CHATS]
    assert all(answer == (200, True) for _, answer in results["page"])
    steps = [step for _, (step, _) in results["status"]]
    assert all(busy for busy, _ in results["status"]) and min(steps) >= 2
    assert all("Training" in status or "training" in status for _, (_, status) in results["status"])
    for _, (bot, base, message, _) in results["chat"]:  # nothing generated: the message stays in its box
        assert bot == [] and base == [] and message == "你好"
    assert engine.chatter.chatter._loaded == {}, "no model was loaded next to the training job"
    assert refused[0] == engine.t("runs.active") and refused[1].startswith("⚠️")
    assert Path(run_dir).exists()

    snap = engine.runner.snapshot()
    assert snap["status"] == "stopped" and not snap["error"]
    logged = [r["step"] for r in read_metrics(run_dir, "train")]
    assert logged == list(range(1, snap["step"] + 1)), "every step exactly once"
    assert read_json(Path(run_dir) / "run.json")["status"] == "stopped"
    print(f"served {PAGE_LOADS} page loads, {STATUS_CALLS} progress calls and {CHATS} chat requests "
          f"during steps {min(steps)}-{max(steps)} of the job")


def test_chat_is_refused_while_a_job_trains_and_works_after(tmp_path, monkeypatch):
    """The chatter the tabs use says it must wait while the runner is busy, and is itself again after."""
    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en")
    release = threading.Event()
    import orpo_local.ui.runner as runner_module

    monkeypatch.setattr(runner_module, "train", lambda *a, **k: release.wait(30))
    assert engine.runner.start("cfg")
    with pytest.raises(RuntimeError, match="A training job is already running"):
        engine.chatter.stream("model:x", [], "hi")
    with pytest.raises(RuntimeError, match="one job at a time"):
        engine.chatter.stream_pair(("model:x", "model:y"), ([], []), "hi")
    release.set()
    engine.runner.wait(30)
    with pytest.raises(ValueError, match="unknown chat target"):  # reaches the real chatter now
        list(engine.chatter.stream("nonsense", [], "hi"))


def test_exporting_the_running_run_is_refused(tmp_path, tiny, arith):
    from orpo_local.export import export_adapter
    from orpo_local.runs import RunBusy, lock_run

    run = tmp_path / "r"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    config(tiny, arith, tmp_path).to_yaml(run / "config.yaml")
    with lock_run(run), pytest.raises(RunBusy):
        export_adapter(run)


# ------------------------------------------------------------------ safe defaults

def test_only_loopback_serves_without_a_login():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert is_loopback(host) and check_server(host) == ""
    for host in ("0.0.0.0", "::", "192.168.1.20", "my-laptop.lan", "example.org"):
        assert not is_loopback(host)
        with pytest.raises(UnsafeServer, match="without a login.*--auth USER:PASSWORD.*--insecure"):
            check_server(host)
        assert "login required" in check_server(host, auth=[("u", "p")])
        assert "NO LOGIN" in check_server(host, insecure=True)
    with pytest.raises(UnsafeServer, match="gradio.live"):
        check_server("127.0.0.1", share=True)  # a share link is public too


def test_logins_from_flags_and_a_file(tmp_path):
    path = tmp_path / "logins"
    path.write_text("# who may use it\nalice:s3cret:with:colons\n\nbob:pw\n", encoding="utf-8")
    assert read_auth(["carol:x"], path) == [("carol", "x"), ("alice", "s3cret:with:colons"), ("bob", "pw")]
    with pytest.raises(ValueError, match="--auth 1.*USER:PASSWORD"):
        read_auth(["nocolon"])
    path.write_text("ok:1\nuser:\n", encoding="utf-8")
    with pytest.raises(ValueError, match="logins: line 2"):
        read_auth([], path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_ui_refuses_to_listen_on_every_interface_without_a_login(tmp_path):
    """`orpo-local ui --host 0.0.0.0` exits with the reason before it listens (it would serve forever)."""
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "orpo_local.cli", "ui", "--host", "0.0.0.0", "--port", str(port),
                          "--runs-dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert out.returncode == 2 and "refusing to serve on 0.0.0.0" in out.stderr and "--auth" in out.stderr
    assert "orpo-local UI on" not in out.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "nothing listens"


def test_a_login_guards_pages_and_api_and_uploads_are_capped_and_sanitised(tmp_path, monkeypatch):
    app, engine = launch(port=None, runs_dir=tmp_path / "runs", prevent_thread_lock=True, quiet=True,
                         auth=[("alice", "s3cret")], max_upload_mb=1 / 1024)  # 1 KiB uploads
    try:
        url = app.local_url
        assert app.share is False
        with httpx.Client(timeout=60) as client:
            assert client.get(f"{url}config").status_code == 401
            assert client.post(f"{url}gradio_api/call/train_status", json={"data": []}).status_code == 401
            assert client.post(f"{url}login", data={"username": "alice", "password": "wrong"}).status_code == 400
            assert client.post(f"{url}login", data={"username": "alice", "password": "s3cret"}).status_code == 200
            assert client.get(f"{url}config").status_code == 200
            big = client.post(f"{url}gradio_api/upload", files={"files": ("big.jsonl", b"x" * 2048)})
            assert big.status_code == 413
            saved = []
            for name in ("../../evil.jsonl", "/etc/evil.jsonl", "..\\..\\win.jsonl", "...jsonl", ".hidden.jsonl", "偏好;rm -rf ~.jsonl"):
                uploaded = client.post(f"{url}gradio_api/upload", files={"files": (name, b'{"a": 1}\n')})
                assert uploaded.status_code == 200, name
                saved.append(engine.save_upload(uploaded.json()[0]))
        uploads = engine.data_dir.resolve()
        assert uploads == (tmp_path / "uploads").resolve()
        for path in saved:
            assert path.resolve().parent == uploads and not path.name.startswith(".")
            assert re.fullmatch(r"[A-Za-z0-9._-]+\.jsonl", path.name), path.name
        assert [p.name for p in saved] == ["evil.jsonl", "evil-2.jsonl", "win.jsonl", "data.jsonl", "hidden.jsonl", "rm_-rf.jsonl"]
        too_big = tmp_path / "big.jsonl"
        too_big.write_bytes(b"x" * 2048)
        with pytest.raises(ValueError, match=r"big.jsonl: 2.0 KB is over the upload limit of 1.0 KB.*--max-upload-mb"):
            engine.save_upload(str(too_big))  # the copy checks too, whatever reached it
    finally:
        app.close()


def test_share_is_off_and_the_host_is_loopback_unless_asked():
    from orpo_local.cli import build_parser

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1" and args.share is False and args.auth == [] and args.insecure is False
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(launch).parameters.items()}
    assert defaults["host"] == "127.0.0.1" and defaults["share"] is False and defaults["insecure"] is False
