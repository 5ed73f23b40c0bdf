"""Training in several processes from the web UI: where the Train tab offers "processes", the runner's
job in other processes (followed through its run folder, stopped, resumed, failed), and the backend
with its processes in the runs list (`orpo-local runs` and the Runs tab)."""

import json
import time

import pytest
from conftest import need

need("gradio", "the web UI needs gradio: pip install -e '.[ui]'")

from orpo_local.config import TrainConfig  # noqa: E402
from orpo_local.events import Evaluated, Failed, Finished, Started, Step, Verdict  # noqa: E402
from orpo_local.runs import backend_text, checkpoints, list_runs, read_json, read_metrics, status_text  # noqa: E402
from orpo_local.ui.runner import Runner, RunFollower, cuda_devices, max_processes  # noqa: E402


# ------------------------------------------------------------------ where "processes" shows

@pytest.mark.parametrize("backend, launchers, gpus, cpus, most", [
    ("torch", {"torchrun"}, 0, 8, 8),  # gloo on the CPU: a process a core
    ("torch", {"torchrun"}, 4, 16, 4),  # NCCL: a GPU a process
    ("torch", {"torchrun"}, 1, 16, 1),  # one GPU takes one process: the control stays hidden
    ("torch", {"torchrun"}, 0, 1, 1),
    ("torch", set(), 0, 8, 1),
    ("mlx", {"torchrun"}, 0, 8, 1),  # torchrun does not start MLX processes
    ("mlx", {"mlx.launch"}, 0, 8, 8),
])
def test_max_processes(backend, launchers, gpus, cpus, most):
    assert max_processes(backend, launchers, gpus, cpus) == most


def test_cuda_devices_follow_cuda_visible_devices_and_need_no_framework(monkeypatch, tmp_path):
    for visible, n in (("0,1", 2), ("", 0), ("-1", 0), ("2,-1,3", 1), ("GPU-5d1e,GPU-77ab", 2)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        assert cuda_devices() == n, visible
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi: no GPU
    assert cuda_devices() == 0


# ------------------------------------------------------------------ the runs list

def test_runs_list_shows_backend_world_size_and_launcher(tmp_path, capsys):
    from orpo_local.cli import main
    from orpo_local.ui.engine import Engine
    from orpo_local.ui.tab_runs import runs_table

    runs = {"a-two": {"backend": "torch", "world_size": 2, "launcher": "torchrun"},
            "b-one": {"backend": "mlx", "world_size": 1, "launcher": "none"},
            "c-old": {"backend": "torch"},  # from before run.json recorded processes
            "d-mlx": {"backend": "mlx", "world_size": 4, "launcher": "mlx.launch"}}
    for name, info in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps({"status": "finished", "step": 4, "total_steps": 4, **info}))
    want = {"a-two": "torch × 2 (torchrun)", "b-one": "mlx", "c-old": "torch", "d-mlx": "mlx × 4 (mlx.launch)"}
    assert {r["run_dir"].rsplit("/", 1)[1]: backend_text(r) for r in list_runs(tmp_path / "runs")} == want
    assert backend_text({"backend": "torch", "world_size": 2, "launcher": "env"}) == "torch × 2 (env)"

    assert main(["runs", "--runs-dir", str(tmp_path / "runs")]) == 0
    printed = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    for name, text in want.items():
        assert f" {text} " in printed[name], printed[name]

    table = runs_table(Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en"))
    assert dict(zip(table["run"], table["backend"])) == want


# ------------------------------------------------------------------ following a run folder

def write_json(path, data):
    path.write_text(json.dumps(data), encoding="utf-8")


def append(path, *rows):
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


METRICS = {"loss": 1.0, "nll_loss": 0.8, "rewards/accuracies": 0.5, "rewards/margins": 0.1, "pairs_per_s": 9.0,
           "logps/chosen": -1.0, "logps/rejected": -1.2}


def test_follower_turns_a_new_run_folder_into_events(tmp_path):
    """The folder that appears with the job's config is the job's (not one with another config); run.json's
    total_steps starts it; every new metrics record is one event; the end is what run.json says."""
    runs = tmp_path / "runs"
    (runs / "earlier").mkdir(parents=True)
    config = TrainConfig().with_overrides({"run.runs_dir": str(runs), "optim.max_steps": 2})
    follower = RunFollower(runs, config=config)
    other = runs / "other"
    other.mkdir()
    (other / "config.yaml").write_text(config.with_overrides({"optim.max_steps": 3}).to_yaml())
    write_json(other / "run.json", {"status": "running", "total_steps": 3})
    assert follower.poll() == [] and follower.run_dir is None

    run = runs / "mine"
    run.mkdir()
    (run / "config.yaml").write_text(config.to_yaml())
    write_json(run / "run.json", {"status": "running", "step": 0})  # written before the model loads
    assert follower.poll() == [] and follower.run_dir == run
    write_json(run / "run.json", {"status": "running", "step": 0, "total_steps": 2, "backend": "torch", "device": "cpu",
                                  "data": {"train_pairs": 36, "val_pairs": 4}, "world_size": 2})
    append(run / "metrics.jsonl", {"step": 0, "split": "eval", **METRICS}, {"step": 1, "split": "train", **METRICS, "elapsed_s": 2.0})
    started, evaluated, step = follower.poll()
    assert isinstance(started, Started) and (started.run_dir, started.total_steps, started.start_step) == (str(run), 2, 0)
    assert (started.n_train, started.n_val, started.model["device"]) == (36, 4, "cpu")
    assert isinstance(evaluated, Evaluated) and evaluated.step == 0 and evaluated.metrics == METRICS
    assert isinstance(step, Step) and (step.step, step.total_steps, step.elapsed_s, step.eta_s) == (1, 2, 2.0, 2.0)
    assert step.metrics == METRICS
    assert follower.poll() == []

    append(run / "metrics.jsonl", {"step": 2, "split": "train", **METRICS, "elapsed_s": 4.0}, {"step": 2, "split": "eval", **METRICS})
    verdict = {"text": "better", "better": True, "step": 2, "base": {}, "tuned": {}, "best": None}
    write_json(run / "run.json", {**read_json(run / "run.json"), "status": "finished", "step": 2, "verdict": verdict, "error": None})
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    write_json(run / "checkpoints" / "step-2" / "trainer_state.json", {"step": 2})
    step, evaluated, judged, finished = follower.finish(0, False, "")
    assert (step.step, evaluated.step) == (2, 2) and isinstance(judged, Verdict) and judged.text == "better"
    assert isinstance(finished, Finished) and (finished.status, finished.step) == ("finished", 2)


def resumable_run(tmp_path, status: str, **info):
    """A run folder with checkpoint step-2, as it is before a resume: metrics up to step 3."""
    run = tmp_path / "runs" / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    write_json(run / "checkpoints" / "step-2" / "trainer_state.json", {"step": 2})
    (run / "config.yaml").write_text(TrainConfig().to_yaml())
    write_json(run / "run.json", {"status": status, "step": 2, "total_steps": 6, **info})
    append(run / "metrics.jsonl", *({"step": s, "split": "train", **METRICS, "elapsed_s": s} for s in (1, 2, 3)))
    return run


def test_follower_of_a_resume_starts_when_the_job_rewrites_run_json(tmp_path):
    run = resumable_run(tmp_path, "running")  # an interrupted run: run.json already says running
    follower = RunFollower(tmp_path / "runs", resume=run)
    assert follower.poll() == [], "run.json as it was at the launch is not the job's"
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "train", **METRICS, "elapsed_s": s}) + "\n" for s in (1, 2)))
    write_json(run / "run.json", {"status": "running", "step": 2, "total_steps": 6, "error": None})
    append(run / "metrics.jsonl", {"step": 3, "split": "train", **METRICS, "elapsed_s": 1.0})
    started, step = follower.poll()
    assert started.start_step == 2 and step.step == 3 and step.eta_s == pytest.approx(3.0)


def test_follower_of_killed_processes_says_the_run_is_resumable(tmp_path):
    """run.json still says running and nobody holds the run: killed. Without Stop it is a failure naming the
    checkpoint; after Stop it is a stop at that checkpoint."""
    for stopping, kind in ((False, Failed), (True, Finished)):
        run = resumable_run(tmp_path / kind.__name__, "stopped")
        follower = RunFollower(run.parent, resume=run)
        write_json(run / "run.json", {"status": "running", "step": 2, "total_steps": 6, "error": None})  # the job began
        append(run / "metrics.jsonl", {"step": 4, "split": "train", **METRICS, "elapsed_s": 1.0})
        events = follower.finish(-9, stopping, "error: something the CLI said\n")
        assert isinstance(events[-1], kind)
        if kind is Failed:
            assert events[-1].error == "something the CLI said; it can resume from its last checkpoint, step-2"
        else:
            assert (events[-1].status, events[-1].step) == ("stopped", 2)
            assert "steps 3-4 came after the last checkpoint" in events[-2].text


# ------------------------------------------------------------------ real jobs in two processes

def tiny_config(tiny, data, runs_dir, **over) -> TrainConfig:
    return TrainConfig().with_overrides({"model.name": str(tiny), "data.path": str(data), "model.backend": "torch",
                                         "model.dtype": "float32", "optim.batch_size": 2, "data.val_min_pairs": 4,
                                         "lora.dropout": 0.0, "run.runs_dir": str(runs_dir), **over})


def recorded(runner: Runner) -> list:
    """The events the runner hands its snapshot, in order."""
    events, on_event = [], runner._on_event

    def record(event):
        events.append(event)
        on_event(event)

    runner._on_event = record
    return events


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


@pytest.fixture
def two_processes(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on a shared CPU


def test_a_job_in_two_processes_that_fails_shows_why_and_the_output(two_processes, tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "chosen": "a"}\n', encoding="utf-8")
    runner = Runner()
    assert runner.start(tiny_config(tiny, bad, tmp_path / "runs", **{"optim.max_steps": 2}), nproc=2)
    runner.wait(120)
    snap = runner.snapshot()
    assert snap["status"] == "failed" and "no valid preference pairs" in snap["error"]
    assert any("output of the processes" in line and "no valid preference pairs" in line for line in snap["log"])
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir()), "no run folder for a job that never began"


@pytest.mark.slow
def test_two_processes_through_the_runner_train_stop_and_resume(two_processes, tiny, arith, tmp_path):
    """A 2-process torchrun job started, followed, stopped (SIGINT) and resumed by the runner: its events reach
    the last step, one run folder with world_size 2, the stop leaves it resumable from a checkpoint, and the
    resumed job logs every step once."""
    runs = tmp_path / "runs"
    runner = Runner()
    events = recorded(runner)
    # save_every 1000: the one checkpoint is the one every process saves after the step the stop reached them at
    assert runner.start(tiny_config(tiny, arith, runs, **{"optim.max_steps": 400, "run.save_every": 1000}), nproc=2)
    wait_until(lambda: runner.snapshot()["step"] >= 3, 120, "step 3")
    assert runner.snapshot()["status"] == "running" and not runner.start(TrainConfig()), "one job at a time"
    assert runner.stop()
    runner.wait(120)
    assert not runner.busy
    (run_dir,) = runs.iterdir()
    snap, kept = runner.snapshot(), checkpoints(run_dir)[-1][0]
    assert snap["status"] == "stopped" and snap["run_dir"] == str(run_dir) and 2 <= kept == snap["step"] < 400
    (listed,) = list_runs(runs)
    assert status_text(listed) == "stopped, resumable"
    info = read_json(run_dir / "run.json")
    assert (info["world_size"], info["launcher"]) == (2, "torchrun")
    steps = [e.step for e in events if isinstance(e, Step)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3

    events.clear()
    resumed = TrainConfig.from_yaml(run_dir / "config.yaml").with_overrides({"optim.max_steps": kept + 2})
    assert runner.start(resumed, resume=run_dir, nproc=2)
    runner.wait(180)
    snap = runner.snapshot()
    assert snap["status"] == "finished", snap["log"][-30:]
    assert snap["step"] == snap["total"] == kept + 2 and snap["verdict"] is not None
    assert [e.step for e in events if isinstance(e, Step)] == [kept + 1, kept + 2]
    assert [type(e) for e in events if isinstance(e, (Started, Finished))] == [Started, Finished]
    assert [p.name for p in runs.iterdir()] == [run_dir.name]
    assert [r["step"] for r in read_metrics(run_dir, "train")] == list(range(1, kept + 3)), "every step once"
    assert read_json(run_dir / "run.json")["world_size"] == 2


# ------------------------------------------------------------------ the Train tab

def test_train_tab_offers_processes_where_they_can_train_in_both_languages(tmp_path):
    import gradio as gr

    from orpo_local.ui import tab_train
    from orpo_local.ui.engine import Engine
    from orpo_local.ui.runner import local_max_processes

    engine = Engine(runs_dir=tmp_path / "runs", data_dir=tmp_path / "uploads", lang="en")
    with gr.Blocks() as page:
        tab_train.build(engine)
    (control,) = [b for b in page.blocks.values() if getattr(b, "elem_id", None) == "train-processes"]
    most = local_max_processes()
    assert control.visible == (most > 1) and control.label == "Processes" and "global batch" in control.info
    assert control.maximum == max(2, most)
    (update,) = [u for u, (c, _, _) in zip(engine.relabel("zh"), engine.texts) if c is control]
    assert update["label"] == "进程数" and "全局批大小" in update["info"]

    engine.lang = "en"
    refused = tab_train.launch(engine, "torch", most + 1, config=TrainConfig())
    assert refused.startswith("⚠️") and f"{most + 1} processes: torch trains in at most {most} here" in refused
    assert not engine.runner.busy
