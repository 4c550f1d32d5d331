"""A sweep spread over machines: trials as Prefect flow runs of the `sweep_trial/trial` deployment, taken by
any number of process workers on any number of hosts (`make sweep-worker` in each host's own clone).

    python pipeline/sweeps.py sweeps/example.yaml --storage /shared/sweeps.journal   # or a database URL

The `sweep` flow (run here, in the checkout that holds the sweep file) pushes its commit to the git remote
(refs/cnnpipe/sweeps/<name>) and the data the trials need to the DVC remote, then keeps `parallel` trials in
flight with run_deployment. Each `sweep_trial` run, in the clone of the worker that took it, checks out that
commit, pulls the data, runs the trial as a DVC experiment (`dvc exp run --temp`), pushes it (`dvc exp push`:
the git ref and its outputs) and tells the study how it went. The Optuna study lives in storage every host
reaches: a journal file on a shared disk, or a database URL. Stopped and started again, the sweep keeps its
finished trials. `dvc exp pull origin <name>` brings any trial's results to any clone.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.deployments import run_deployment

from cnnpipe.core import trial as trialmod
from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.fsutil import write_json
from cnnpipe.mlops import sweep as sw
from cnnpipe.mlops.dvcops import checked as sh
from cnnpipe.mlops.dvcops import dvc_checked as dvc
from cnnpipe.mlops.dvcops import run_experiment

PROJECT = Path(__file__).resolve().parents[1]
FINAL = {"COMPLETED": "Success", "FAILED": "Failed", "CRASHED": "Failed", "CANCELLED": "Failed"}


@flow(name="sweep_trial", log_prints=True)
def sweep_trial(name: str, study: str, storage: str, trial_id: int, params: dict[str, Any], stage: str = "train",
                ref: str = "", commit: str = "", pruner: dict[str, Any] | None = None,
                remote: str = "origin") -> str:
    """One trial of a sweep, in this worker's clone: the sweep's commit, its params, a DVC experiment pushed to
    the remotes.

    Args:
        name: the experiment's name (`<sweep>-<NNN>`).
        study: the Optuna study (the sweep's name).
        storage: the study's storage: a journal file on a shared disk or a database URL.
        trial_id: the trial's id in the study.
        params: params.yaml keys and the values this trial runs with.
        stage: the trial runs the DAG up to this stage.
        ref: the git ref on the remote that holds the sweep's commit.
        commit: the sweep's commit.
        pruner: the sweep's pruner settings.
        remote: the git remote (also the DVC remote's owner: `dvc exp push` pushes to both).
    """
    import optuna

    clone = Path.cwd()
    logger = get_run_logger()
    if ref:
        sh(clone, "git", "fetch", "-q", remote, f"+{ref}:{ref}")
        sh(clone, "git", "checkout", "-q", "--detach", commit or ref)
    dvc(clone, "pull", "--allow-missing")
    the_study = optuna.load_study(study_name=study, storage=trialmod.open_storage(storage))
    number = the_study._storage.get_trial(trial_id).number
    the_study._storage.set_trial_user_attr(trial_id, "worker", f"{socket.gethostname()}:{clone}")
    write_json(trialmod.ticket_path(clone, name), {"study": study, "storage": storage, "trial_id": trial_id,
                                                   "pruner": pruner or {}})
    try:
        run_experiment(clone, name, {**params, "train.tag": name}, logger.info, targets=[stage])
        dvc(clone, "exp", "push", remote, name)
    except CnnpipeError as e:
        sw.conclude(the_study, number, False, str(e))
        raise
    finally:
        trialmod.ticket_path(clone, name).unlink(missing_ok=True)
    state = sw.conclude(the_study, number, True)
    logger.info("trial %d %s: experiment %s pushed to %s", number, state, name, remote)
    return state


class WorkPool:
    """Trials as flow runs of a deployment; its work pool's workers take them, wherever they run."""

    where = "prefect flow-run logs"

    def __init__(self, deployment: str, spec: sw.Spec, storage: str, ref: str, commit: str, remote: str):
        self.deployment, self.spec, self.storage = deployment, spec, storage
        self.ref, self.commit, self.remote = ref, commit, remote

    def submit(self, trial, name: str) -> None:
        from prefect.exceptions import ObjectNotFound

        try:
            run = run_deployment(self.deployment, timeout=0, as_subflow=False, parameters={
            "name": name, "study": self.spec.name, "storage": self.storage, "trial_id": trial._trial_id,
                "params": trial.params, "stage": self.spec.stage, "ref": self.ref, "commit": self.commit,
                "pruner": self.spec.pruner, "remote": self.remote})
        except ObjectNotFound:
            raise CnnpipeError(f"no deployment {self.deployment} on the Prefect server; run `make deploy` "
                               "(and `make sweep-worker` on the hosts that take trials)") from None
        trial.set_user_attr("flow_run", str(run.id))

    def tick(self) -> None:
        pass

    def finished(self, name: str) -> None:
        pass  # the trial's own run removed its ticket in its clone

    def states(self, study) -> dict[str, str]:
        """Experiment name -> Queued | Running | Success | Failed, from the trial's flow run."""
        out = {}
        with get_client(sync_client=True) as client:
            for t in study.trials:
                run_id = t.user_attrs.get("flow_run")
                if run_id and t.state.name == "RUNNING":  # in flight: finished ones are settled in the study
                    state = client.read_flow_run(run_id).state
                    kind = state.type.value if state else "SCHEDULED"
                    out[t.user_attrs["dvc_exp"]] = FINAL.get(kind, "Running" if kind == "RUNNING" else "Queued")
        return out


@flow(name="sweep", log_prints=True)
def sweep(file: str = "sweeps/example.yaml", trials: int | None = None, parallel: int | None = None,
          storage: str | None = None, deployment: str = "sweep_trial/trial", repo: str = str(PROJECT),
          remote: str = "origin", poll: float = 2.0) -> list[dict[str, Any]]:
    """Run a sweep file's trials on a Prefect work pool.

    Args:
        file: the sweep file, relative to the checkout.
        trials: trial budget (default: the file's).
        parallel: trials in flight at once (default: the file's).
        storage: the Optuna study's storage, reachable from every worker: a journal file on a shared disk or a
            database URL (default: a journal file in this checkout, for workers on this host).
        deployment: the trial deployment.
        repo: this checkout.
        remote: the git remote the workers fetch from and push to.
        poll: seconds between looks at the flow runs.
    """
    root = Path(repo).resolve()
    spec = sw.check_budget(sw.load_spec(root / file, root / "params.yaml"), trials, parallel)
    storage = sw.absolute_storage(storage) if storage else sw.default_storage(root, spec)
    if sh(root, "git", "status", "--porcelain", "--untracked-files=no"):
        raise CnnpipeError("the checkout has uncommitted changes the workers would not see; commit them first")
    commit, ref = sh(root, "git", "rev-parse", "HEAD"), f"refs/cnnpipe/sweeps/{spec.name}"
    study = sw.open_study(spec, storage)
    sw.pin_commit(study, spec, commit)  # a resume from another commit is refused before the shared ref moves
    sh(root, "git", "push", "-q", "-f", remote, f"HEAD:{ref}")  # the workers check out exactly this
    dvc(root, "push")  # and find the data the trials need (not -q: it drops DVC's ERROR line)
    sw.drive(spec, study, WorkPool(deployment, spec, storage, ref, commit, remote), poll, print)
    table = sw.rows(study)
    sw.write_results(root, spec, table)
    create_table_artifact(key="cnnpipe-sweep", table=table, description=f"sweep {spec.name}")
    print(sw.summary(spec, table))
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", default="sweeps/example.yaml")
    parser.add_argument("--trials", type=int)
    parser.add_argument("--parallel", type=int)
    parser.add_argument("--storage", help="journal file on a shared disk, or a database URL")
    parser.add_argument("--deployment", default="sweep_trial/trial")
    parser.add_argument("--remote", default="origin")
    args = parser.parse_args(argv)
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        print("sweeps: error: no Prefect API to reach the workers; start `prefect server start` and set "
              "PREFECT_API_URL (prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api)", file=sys.stderr)
        return 1
    try:
        table = sweep(args.file, args.trials, args.parallel, args.storage, args.deployment, remote=args.remote)
    except CnnpipeError as e:
        print(f"sweeps: error: {e}", file=sys.stderr)
        return 1
    return 0 if sw.best_row(table) else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
