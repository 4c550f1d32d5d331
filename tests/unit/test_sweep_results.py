"""A trial counts with the validation accuracy of the model it keeps: the train stage keeps the last epoch's
weights (with early stopping, the best epoch's) and records that epoch's accuracy with every report, so a sweep
ranks trials by the model each one saved, not by an epoch that validated better and was not kept."""

from __future__ import annotations

import optuna

from cnnpipe.mlops.sweep import best_row, conclude, rows


def reported(study: optuna.Study, accuracies: list[float], pruned: bool = False,
             kept: float | None = None) -> int:
    trial = study.ask()
    for epoch, acc in enumerate(accuracies, 1):
        trial.report(acc, epoch)
    if kept is not None:  # as the train stage records it
        trial.set_user_attr("kept_val_acc", kept)
    if pruned:
        trial.set_user_attr("pruned_after_epoch", len(accuracies))
    return trial.number


def test_trials_count_with_the_epoch_their_model_keeps():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    peaked = reported(study, [0.80, 0.95, 0.85])  # its model is the third epoch's
    steady = reported(study, [0.80, 0.88, 0.90])
    cut = reported(study, [0.75, 0.70], pruned=True)
    stopped = reported(study, [0.80, 0.89, 0.86, 0.84], kept=0.89)  # early stopping kept the second epoch
    assert [conclude(study, n, True) for n in (peaked, steady, cut, stopped)] == ["complete"] * 2 + ["pruned",
                                                                                                    "complete"]
    table = {r["trial"]: r for r in rows(study)}
    assert [table[n]["val_acc"] for n in (peaked, steady, cut, stopped)] == [0.85, 0.90, 0.70, 0.89]
    assert best_row(list(table.values()))["trial"] == steady
    assert study.best_trial.number == steady  # what TPE learns from, too
    assert study.trials[stopped].value == 0.89
