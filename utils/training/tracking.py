"""Optional Weights & Biases logging that can neither block nor stop a training run.

:func:`build_tracker` gives a :class:`Tracker`; when wandb is disabled (the default, or on any
process but the main one) every method does nothing. When enabled, the mode is chosen before
wandb is initialised (:func:`resolve_wandb_mode`): the ``WANDB_MODE`` environment variable wins,
then ``wandb.mode`` of the config; ``"auto"`` goes online only when an API key is configured
and otherwise logs offline into the run folder, to be uploaded later with ``wandb sync``.
wandb never gets to show its interactive login prompt (which would wait forever under tmux):
an online run first checks for credentials with ``wandb.login(prompt=False)`` and
falls back to offline without them. Any exception raised by wandb is logged once as a warning
and turns the tracker into a no-op.
"""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from utils.config.experiment import WandbConfig

logger = logging.getLogger(__name__)

DEFAULT_WANDB_HOST = "https://api.wandb.ai"
_ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline",
              "disabled": "disabled", "shared": "shared"}


def _netrc_has_key(environ: Mapping[str, str], home: Path) -> bool:
    """Whether the ``.netrc`` file wandb would read has an entry for the wandb host."""
    host = urlparse(environ.get("WANDB_BASE_URL") or DEFAULT_WANDB_HOST).hostname or "api.wandb.ai"
    candidates = [Path(environ["NETRC"]).expanduser()] if environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    for path in candidates:
        if path.is_file():
            try:
                entry = netrc.netrc(str(path)).authenticators(host)
            except (netrc.NetrcParseError, OSError) as error:
                logger.debug("cannot read %s: %s", path, error)
                return False
            return bool(entry and entry[2])
    return False


def explain_wandb_mode(config_mode: str, environ: Mapping[str, str] | None = None,
                       home: str | os.PathLike | None = None) -> tuple[str, str]:
    """The wandb mode to use and why, without importing wandb (rules in :func:`resolve_wandb_mode`).

    Args:
        config_mode, environ, home: as for :func:`resolve_wandb_mode`.

    Returns:
        ``(mode, reason)``, e.g. ``("offline", "no wandb API key found (WANDB_API_KEY or ~/.netrc)")``.
    """
    if config_mode not in ("auto", "online", "offline"):
        raise ValueError(f"config_mode must be one of ['auto', 'online', 'offline'], got {config_mode!r}")
    environ = os.environ if environ is None else environ
    env_mode = environ.get("WANDB_MODE", "").strip().lower()
    if env_mode:
        if env_mode not in _ENV_MODES:
            raise ValueError(f"environment variable WANDB_MODE must be one of {sorted(_ENV_MODES)}, got {env_mode!r}")
        return _ENV_MODES[env_mode], f"WANDB_MODE={env_mode}"
    if config_mode != "auto":
        return config_mode, f"wandb.mode is {config_mode!r} in the config"
    if environ.get("WANDB_API_KEY"):
        return "online", "WANDB_API_KEY is set"
    if _netrc_has_key(environ, Path(home) if home is not None else Path.home()):
        return "online", "an API key is stored in .netrc"
    return "offline", "no wandb API key found (WANDB_API_KEY or ~/.netrc)"


def resolve_wandb_mode(config_mode: str, environ: Mapping[str, str] | None = None,
                       home: str | os.PathLike | None = None) -> str:
    """Choose the wandb mode before wandb is imported.

    Order: the ``WANDB_MODE`` environment variable when set (``"run"`` means online,
    ``"dryrun"`` offline; ``"disabled"`` is respected); else ``config_mode`` when it is
    ``"online"`` or ``"offline"``; else (``"auto"``) ``"online"`` when ``WANDB_API_KEY`` is set
    or the ``.netrc`` file (``$NETRC``, else ``~/.netrc``) has an entry for the wandb host
    (``WANDB_BASE_URL``, default ``api.wandb.ai``), and ``"offline"`` otherwise.

    Args:
        config_mode: ``wandb.mode`` of the config: ``"auto"``, ``"online"`` or ``"offline"``.
        environ: environment variables (default ``os.environ``).
        home: home folder for ``.netrc`` (default the user's home).

    Returns:
        ``"online"``, ``"offline"``, ``"disabled"`` or ``"shared"``.

    Raises:
        ValueError: ``config_mode`` or ``WANDB_MODE`` is not a known mode.
    """
    return explain_wandb_mode(config_mode, environ, home)[0]


class Tracker:
    """One run's wandb logging; a no-op when disabled or after any wandb failure.

    Attributes:
        enabled: whether :meth:`start` will try to use wandb.
        run_id: the wandb run id once started (``None`` before), or the ``resume_id`` given to
            :meth:`start` when wandb is off or failed, so it is not lost from the checkpoints.
    """

    def __init__(self, config: WandbConfig, enabled: bool) -> None:
        """Build a tracker; prefer :func:`build_tracker`.

        Args:
            config: the ``wandb`` section of the experiment config.
            enabled: whether to use wandb at all.
        """
        self.config = config
        self.enabled = bool(enabled)
        self.run_id: str | None = None
        self._run: Any = None
        self._started = False

    @property
    def active(self) -> bool:
        """Whether a wandb run is open and logging."""
        return self._run is not None

    def start(self, config_dict: dict, run_folder: str | os.PathLike, run_name: str,
              resume_id: str | None = None) -> None:
        """Open the wandb run (files under ``run_folder/wandb``); continue run ``resume_id`` if given.

        Args:
            config_dict: the resolved config, sent as the run's config.
            run_folder: the run folder; wandb writes into its ``wandb`` sub-folder.
            run_name: the wandb run name (the run folder's name).
            resume_id: the wandb run id saved in the checkpoint being resumed (``None`` for a
                new run); the run is continued with ``resume="allow"``.

        Raises:
            RuntimeError: :meth:`start` was already called on this tracker.
        """
        if self._started:
            raise RuntimeError("Tracker.start was already called; build a new tracker for another run")
        self._started = True
        self.run_id = resume_id
        if not self.enabled:
            return
        try:
            mode, reason = explain_wandb_mode(self.config.mode)
            if mode == "disabled":
                logger.info("wandb disabled (%s)", reason)
                return
            self._init_run(mode, reason, config_dict, Path(run_folder), run_name, resume_id)
        except Exception as error:  # wandb must never stop training
            self._fail(error)

    def _init_run(self, mode: str, reason: str, config_dict: dict, run_folder: Path, run_name: str,
                  resume_id: str | None) -> None:
        import wandb

        if wandb.run is not None:  # a run left open in this process (e.g. a notebook cell re-run)
            wandb.run.finish()
        if mode == "online" and not wandb.login(prompt=False, verify=False):
            logger.warning("wandb: no credentials found although online mode was asked for (%s); logging "
                           "offline instead of waiting at a login prompt", reason)
            mode, reason = "offline", "no credentials"
        run_folder.mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.config.project, entity=self.config.entity, notes=self.config.notes or None,
            tags=list(self.config.tags) or None, name=run_name, config=config_dict, dir=str(run_folder),
            id=resume_id, resume="allow" if resume_id else None, mode=mode, reinit="finish_previous")
        self.run_id = self._run.id
        if mode == "offline":
            offline_dir = Path(self._run.dir).parent
            logger.info("wandb is offline (%s); logging to %s; upload it later with: wandb sync %s",
                        reason, offline_dir, offline_dir)
        else:
            logger.info("wandb run %s (%s mode): %s", self.run_id, mode, getattr(self._run, "url", None))

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log ``metrics`` at ``step`` (e.g. the optimiser iteration); does nothing when inactive.

        Args:
            metrics: names to numbers (NaN is allowed).
            step: a step that never decreases within a run; wandb drops rows of earlier steps,
                which happens to steps logged again after a resume.
        """
        if self._run is None:
            return
        try:
            self._run.log(dict(metrics), step=int(step))
        except Exception as error:  # wandb must never stop training
            self._fail(error)

    def finish(self, exit_code: int = 0) -> None:
        """Close the wandb run (upload what is left when online); does nothing when inactive.

        Args:
            exit_code: 0 for a finished run, anything else marks the run as failed in wandb.
        """
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as error:  # wandb must never stop training
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        self._run = None
        self.enabled = False
        logger.warning("wandb failed: %s: %s; training continues without it", type(error).__name__, error)


def build_tracker(config: WandbConfig, *, enabled_override: bool | None = None,
                  is_main_process: bool = True) -> Tracker:
    """Build the run's :class:`Tracker` from the ``wandb`` config section.

    Args:
        config: the ``wandb`` section of the experiment config.
        enabled_override: ``True``/``False`` from ``--wandb``/``--no-wandb``; ``None`` keeps
            ``config.enabled``.
        is_main_process: only the main process of a distributed run logs; on the others the
            tracker is disabled.

    Returns:
        A tracker; disabled unless wandb is enabled and this is the main process.

    Raises:
        TypeError: ``config`` is not a :class:`WandbConfig`.
    """
    if not isinstance(config, WandbConfig):
        raise TypeError(f"config must be a WandbConfig, got {type(config).__name__}")
    enabled = config.enabled if enabled_override is None else bool(enabled_override)
    return Tracker(config, enabled=enabled and is_main_process)
