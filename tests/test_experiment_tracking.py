"""Tests for utils.training.tracking: mode resolution without prompts, no-op trackers, wandb failures never raise."""

from __future__ import annotations

import logging

import pytest

from utils.config.experiment import WandbConfig
from utils.training.tracking import build_tracker, explain_wandb_mode, resolve_wandb_mode


@pytest.fixture
def quiet_home(tmp_path, monkeypatch):
    """A fake home with no credentials; wandb's own settings and caches go under it."""
    home = tmp_path / "home"
    home.mkdir()
    for name in ("WANDB_MODE", "WANDB_API_KEY", "NETRC", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    for name, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(home / sub))
    return home


def test_auto_mode_is_offline_without_a_key(tmp_path):
    mode, reason = explain_wandb_mode("auto", environ={}, home=tmp_path)
    assert mode == "offline" and "no wandb API key" in reason


def test_auto_mode_is_online_with_a_key_in_the_environment_or_netrc(tmp_path):
    assert resolve_wandb_mode("auto", environ={"WANDB_API_KEY": "x" * 40}, home=tmp_path) == "online"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert resolve_wandb_mode("auto", environ={}, home=tmp_path) == "online"
    assert resolve_wandb_mode("auto", environ={"WANDB_BASE_URL": "https://wandb.example.org"}, home=tmp_path) \
        == "offline"


def test_environment_wins_over_config(tmp_path):
    assert resolve_wandb_mode("online", environ={"WANDB_MODE": "disabled"}, home=tmp_path) == "disabled"
    assert resolve_wandb_mode("auto", environ={"WANDB_MODE": "dryrun", "WANDB_API_KEY": "x"}, home=tmp_path) \
        == "offline"
    assert resolve_wandb_mode("offline", environ={}, home=tmp_path) == "offline"
    assert resolve_wandb_mode("online", environ={"WANDB_MODE": ""}, home=tmp_path) == "online"
    with pytest.raises(ValueError, match="WANDB_MODE must be one of"):
        resolve_wandb_mode("auto", environ={"WANDB_MODE": "sometimes"}, home=tmp_path)


def test_disabled_tracker_is_a_no_op(tmp_path):
    for tracker in (build_tracker(WandbConfig()), build_tracker(WandbConfig(enabled=True), is_main_process=False),
                    build_tracker(WandbConfig(enabled=True), enabled_override=False)):
        assert not tracker.enabled
        tracker.start({"a": 1}, tmp_path, "run", resume_id="abc123")
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
        assert tracker.run_id == "abc123" and not tracker.active
    assert list(tmp_path.iterdir()) == []
    assert build_tracker(WandbConfig(), enabled_override=True).enabled


def test_wandb_mode_disabled_is_respected(tmp_path, quiet_home, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = build_tracker(WandbConfig(enabled=True, mode="offline"))
    tracker.start({"a": 1}, tmp_path / "run", "run")
    tracker.log({"loss": 1.0}, step=1)
    tracker.finish()
    assert not tracker.active and tracker.run_id is None and not (tmp_path / "run" / "wandb").exists()


def test_failing_wandb_warns_once_and_never_raises(tmp_path, quiet_home, monkeypatch, caplog):
    import wandb

    def broken_init(*args, **kwargs):
        raise RuntimeError("service not reachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = build_tracker(WandbConfig(enabled=True, mode="offline"))
    with caplog.at_level(logging.WARNING, logger="utils.training.tracking"):
        tracker.start({"a": 1}, tmp_path, "run", resume_id="abc123")
        tracker.log({"loss": 1.0}, step=1)
        tracker.finish()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["wandb failed: RuntimeError: service not reachable; training continues without it"]
    assert not tracker.active and tracker.run_id == "abc123"


def test_start_twice_is_a_programming_error(tmp_path):
    tracker = build_tracker(WandbConfig())
    tracker.start({}, tmp_path, "run")
    with pytest.raises(RuntimeError, match="already called"):
        tracker.start({}, tmp_path, "run")


def test_offline_run_logs_into_the_run_folder(tmp_path, quiet_home, caplog):
    run_folder = tmp_path / "resunet3d_run"
    tracker = build_tracker(WandbConfig(enabled=True, tags=("test",)))  # auto, no key: offline
    with caplog.at_level(logging.INFO, logger="utils.training.tracking"):
        tracker.start({"model": {"channels": (8, 16)}}, run_folder, run_folder.name)
        assert tracker.active and tracker.run_id
        for epoch in (1, 2, 3):
            tracker.log({"train_loss": 1.0 / epoch, "val_loss": float("nan")}, step=epoch)
        tracker.finish()
    assert not tracker.active
    offline_runs = list((run_folder / "wandb").glob(f"offline-run-*-{tracker.run_id}"))
    assert len(offline_runs) == 1 and (offline_runs[0] / f"run-{tracker.run_id}.wandb").is_file()
    hints = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(hints) == 1 and "no wandb API key found" in hints[0] and str(offline_runs[0]) in hints[0]


def test_online_without_credentials_falls_back_to_offline_without_prompting(tmp_path, quiet_home, caplog):
    tracker = build_tracker(WandbConfig(enabled=True, mode="online"))
    with caplog.at_level(logging.INFO, logger="utils.training.tracking"):
        tracker.start({}, tmp_path, "run")
        tracker.finish()
    messages = [r.getMessage() for r in caplog.records]
    assert any("no credentials found" in m for m in messages) and any("wandb sync" in m for m in messages)
    assert list((tmp_path / "wandb").glob("offline-run-*"))
