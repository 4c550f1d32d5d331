"""A trial counts with the validation accuracy of the model it keeps: the train stage keeps the last epoch's
weights, so a sweep ranks trials by their last epoch, not by an earlier one that validated better."""

from __future__ import annotations

import optuna

from cnnpipe.mlops.sweep import best_row, conclude, rows


def reported(study: optuna.Study, accuracies: list[float], pruned: bool = False) -> int:
    trial = study.ask()
    for epoch, acc in enumerate(accuracies, 1):
        trial.report(acc, epoch)
    if pruned:
        trial.set_user_attr("pruned_after_epoch", len(accuracies))
    return trial.number


def test_trials_count_with_their_last_epoch():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    peaked = reported(study, [0.80, 0.95, 0.85])  # its model is the third epoch's
    steady = reported(study, [0.80, 0.88, 0.90])
    cut = reported(study, [0.70, 0.75], pruned=True)
    assert [conclude(study, n, True) for n in (peaked, steady, cut)] == ["complete", "complete", "pruned"]
    table = {r["trial"]: r for r in rows(study)}
    assert table[peaked]["val_acc"] == 0.85 and table[steady]["val_acc"] == 0.90 and table[cut]["val_acc"] == 0.75
    assert best_row(list(table.values()))["trial"] == steady
    assert study.best_trial.number == steady  # what TPE learns from, too
