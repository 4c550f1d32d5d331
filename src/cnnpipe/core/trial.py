"""The train stage's side of a sweep (cnnpipe sweep): report validation accuracy after every epoch to the
trial's Optuna study and stop early when its pruner says so.

A sweep runs each trial as a DVC experiment; DVC gives the stage the experiment's name (DVC_EXP_NAME) and
the repository it was started from (DVC_ROOT). The sweep leaves a ticket for that name under
.dvc/tmp/cnnpipe-trials/ (the study's storage, name and pruner, the trial's id). No ticket: no reporting,
and training runs as it always does. Optuna is imported only when there is a ticket.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TICKETS = Path(".dvc/tmp/cnnpipe-trials")

# (epoch, its val_acc, the val_acc of the epoch the model keeps if the run ends now, last epoch?) -> stop now?
Reporter = Callable[[int, float, float, bool], bool]


def ticket_path(repo: str | Path, exp_name: str) -> Path:
    return Path(repo) / TICKETS / f"{exp_name}.json"


def open_storage(url: str):
    """An Optuna storage: a database URL (sqlite:///..., postgresql://...) or a journal file path, which many
    processes and hosts may share (file locks; a shared disk for several hosts)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if "://" in url:
        return optuna.storages.RDBStorage(url)
    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(url)))


def make_pruner(spec: dict[str, Any]):
    """{"kind": "median" | "none", "startup_trials": N, "warmup_epochs": M}: from epoch M + 1 on, a trial whose
    validation accuracy is below the median of the complete trials' at that epoch stops, once N are complete."""
    import optuna

    if spec.get("kind", "median") == "none":
        return optuna.pruners.NopPruner()
    # Optuna prunes once step >= n_warmup_steps; steps are epochs from 1: warmup_epochs are never pruned.
    return optuna.pruners.MedianPruner(n_startup_trials=int(spec.get("startup_trials", 4)),
                                       n_warmup_steps=int(spec.get("warmup_epochs", 0)) + 1)


def reporter_from_env(env: dict[str, str] | None = None) -> Reporter | None:
    """The reporter of the trial this process trains, or None outside a sweep."""
    env = os.environ if env is None else env
    name, root = env.get("DVC_EXP_NAME"), env.get("DVC_ROOT")
    if not name or not root or not ticket_path(root, name).is_file():
        return None
    ticket = json.loads(ticket_path(root, name).read_text())
    import optuna

    study = optuna.load_study(study_name=ticket["study"], storage=open_storage(ticket["storage"]),
                              pruner=make_pruner(ticket["pruner"]))
    trial = optuna.trial.Trial(study, ticket["trial_id"])

    def report(epoch: int, val_acc: float, kept_val_acc: float, last: bool) -> bool:
        try:
            trial.report(val_acc, epoch)  # what the pruner compares, epoch by epoch
            trial.set_user_attr("kept_val_acc", kept_val_acc)  # what the trial counts with when it ends
            if last or not trial.should_prune():
                return False
            trial.set_user_attr("pruned_after_epoch", epoch)
            return True
        except Exception as e:  # the study is unreachable or the trial was closed: train on, unreported
            log.warning("sweep: could not report epoch %d to the study (%s); training goes on", epoch, e)
            return False

    return report
