"""Prefect flow that drives the DVC pipeline: every flow run is a DVC experiment named after it.

dvc.yaml stays the single source of truth: the run is `dvc exp run --temp -n <flow run name> -S ...`, so DVC
decides which stages are stale (or restores them from its run cache), the overrides apply to that experiment
only, and `dvc exp show` lists every run with its params and metrics. Prefect adds schedules, logs, the UI,
artifacts (metrics, the diff against production, the plots and pictures of both, the experiment's name
and commit) and the promotion gate.

    python pipeline/flows.py                       # one run (ephemeral API unless PREFECT_API_URL is set)
    python pipeline/flows.py '{"train.epochs": 3}'   # with param overrides, as `dvc exp run -S`
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cnnpipe.core.errors import CnnpipeError
from cnnpipe.core.params import load_section
from cnnpipe.mlops.dvcops import (
    Experiment,
    check_overrides,
    metrics_at,
    metrics_diff_markdown,
    plots_markdown,
    run_experiment,
    stage_order,
)

PROJECT = Path(__file__).resolve().parents[1]


@task(cache_policy=NO_CACHE)
def experiment(repo: str, name: str, overrides: dict[str, Any]) -> Experiment:
    """The whole DAG as the DVC experiment `name` (`dvc exp run --temp`); its log streams into Prefect's."""
    logger = get_run_logger()
    result = run_experiment(repo, name, overrides, log=logger.info)
    logger.info("experiment %s recorded at %s; stages run: %s", name, result.commit[:10], ", ".join(result.ran) or
                "none (all unchanged or from DVC's run cache)")
    return result


@task(cache_policy=NO_CACHE)
def publish_metrics(repo: str, exp: Experiment, baseline: str) -> list[dict[str, Any]]:
    rows = metrics_at(repo, exp.commit)
    create_table_artifact(key="cnnpipe-metrics", table=rows, description=f"dvc metrics of experiment {exp.name}")
    create_markdown_artifact(key="cnnpipe-metrics-diff", description=f"dvc metrics diff {baseline} {exp.name}",
                             markdown=metrics_diff_markdown(repo, baseline, exp.commit))
    create_markdown_artifact(key="cnnpipe-plots", description=f"dvc plots diff {baseline} {exp.name}",
                             markdown=plots_markdown(repo, baseline, exp.commit, exp.name))
    create_markdown_artifact(key="cnnpipe-experiment", description="the run as a DVC experiment", markdown="\n".join([
        f"DVC experiment **{exp.name}** at commit `{exp.commit}`", "",
        "- see it beside the others: `dvc exp show`", f"- its files in the checkout: `dvc exp apply {exp.name}`",
        f"- a branch of it: `dvc exp branch {exp.name} <branch>`"]))
    return rows


def production_commit(repo: str) -> str | None:
    """The commit of the model now in the promote stage, or None while nothing is in production."""
    from cnnpipe.mlops import registry

    current = registry.in_stage(repo, registry.MODEL, load_section("promote", Path(repo) / "params.yaml").stage)
    return current.commit if current else None


@task(cache_policy=NO_CACHE)
def promote_run(repo: str, exp: Experiment) -> dict[str, Any]:
    """The gate: promote the experiment if params.yaml's promote rules pass; the decision becomes an artifact."""
    from cnnpipe.mlops.promote import promote

    decision = promote(repo, load_section("promote", Path(repo) / "params.yaml"), run_name=exp.name, rev=exp.commit)
    if decision.unchanged:
        head = f"**Unchanged**: the run's model is production's ({decision.production})"
    elif decision.version:
        head = f"**Promoted** as `{decision.version}`"
    else:
        head = "**Refused**: production unchanged"
    before = decision.production or "nothing"
    markdown = "\n".join([f"{head} (production before: {before}; experiment {exp.name})", "", "| rule check |",
                          "|---|", *(f"| `{r}` |" for r in decision.reasons)])
    create_markdown_artifact(key="cnnpipe-promotion", markdown=markdown, description=f"cnnpipe promote ({exp.name})")
    get_run_logger().info("promotion: %s", decision.summary().replace("\n", "; "))
    return {"promoted": decision.promote, "unchanged": decision.unchanged, "version": decision.version,
            "production_before": decision.production, "reasons": decision.reasons}


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(overrides: dict[str, Any] | None = None, repo: str = str(PROJECT),
                   baseline: str = "prod", promote: bool = False, name: str | None = None) -> dict[str, str]:
    """Run the DVC pipeline of `repo` as a DVC experiment named after this flow run; the checkout's params.yaml
    is not touched.

    Args:
        overrides: params.yaml values for this run only, as `dvc exp run -S`: {"train.epochs": 5, "train.lr": 0.01}
        repo: the project checkout to run in
        baseline: what the metrics diff compares with: "prod" (the production model's commit, HEAD while nothing
            is in production) or any Git revision
        promote: send the run through the promotion gate (params.yaml `promote:` rules) afterwards
        name: the experiment's name; default: the flow run's name and the first 8 characters of its id
    """
    from prefect.runtime import flow_run

    applied = check_overrides(Path(repo) / "params.yaml", overrides or {})  # refused before anything runs
    if applied:
        get_run_logger().info("params overridden for this run: %s", applied)
    # Prefect's generated names repeat now and then: the run's id makes the experiment's name unique
    run_id = str(flow_run.get_id() or "")[:8]
    default = f"{flow_run.get_name()}-{run_id}" if flow_run.get_name() else f"run-{int(time.time())}"
    exp = experiment(repo, name or default, applied)
    statuses = {stage: "ran" if stage in exp.ran else "skipped" for stage in stage_order(repo)}
    if baseline == "prod":
        baseline = production_commit(repo) or "HEAD"
    publish_metrics(repo, exp, baseline)
    if promote:
        decision = promote_run(repo, exp)
        statuses["promote"] = ("unchanged" if decision["unchanged"] else
                               f"promoted {decision['version']}" if decision["promoted"] else "refused")
    return statuses


def check_api() -> None:
    """With PREFECT_API_URL set, the API must answer; without it Prefect runs an ephemeral server."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5):
            return
    except OSError as e:
        raise CnnpipeError(
            f"no Prefect API reachable at {url} ({getattr(e, 'reason', e)}); start one with "
            "`prefect server start`, or unset PREFECT_API_URL to use the ephemeral mode"
        ) from e


def main(argv: list[str]) -> int:
    try:
        overrides = json.loads(argv[0]) if argv else None
        if overrides is not None and not isinstance(overrides, dict):
            print(f"train_pipeline: error: overrides must be a JSON object such as '{{\"train.epochs\": 5}}', "
                  f"got a JSON {type(overrides).__name__}", file=sys.stderr)
            return 1
        check_api()
        statuses = train_pipeline(overrides=overrides)
    except CnnpipeError as e:
        print(f"train_pipeline: error: {e}", file=sys.stderr)
        return 1
    except json.JSONDecodeError as e:
        print(f"train_pipeline: error: overrides must be a JSON object ({e})", file=sys.stderr)
        return 1
    print(json.dumps(statuses))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DO_NOT_TRACK", "1")
    sys.exit(main(sys.argv[1:]))
