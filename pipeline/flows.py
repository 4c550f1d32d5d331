"""Prefect flow that drives the DVC pipeline: one task per dvc.yaml stage, in dependency order.

dvc.yaml stays the single source of truth: the stage list is read from DVC at run time and each task
runs `dvc repro --single-item <stage>`, so DVC decides whether the stage is stale. Prefect adds
schedules, retries, logs, the UI and a record of every run's metrics (artifacts).

    python pipeline/flows.py                       # one run (ephemeral API unless PREFECT_API_URL is set)
    python pipeline/flows.py '{"train.epochs": 3}'   # with param overrides, as `dvc exp run -S`
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from cnnpipe.dvcops import apply_overrides, metrics_diff_markdown, metrics_table, run_stage, stage_order
from cnnpipe.errors import CnnpipeError
from cnnpipe.params import load_section

PROJECT = Path(__file__).resolve().parents[1]
RETRIES = {"download": 2}  # network stages retry transient failures; the others fail fast


@task(cache_policy=NO_CACHE)
def dvc_stage(repo: str, stage: str) -> str:
    """Run one stage through DVC; returns 'ran' or 'skipped'."""
    logger = get_run_logger()
    result = run_stage(repo, stage, log=logger.info)
    status = "ran" if result.ran else "skipped"
    logger.info("stage %s %s", stage, status)
    return status


@task(cache_policy=NO_CACHE)
def publish_metrics(repo: str, baseline: str) -> list[dict[str, Any]]:
    rows = metrics_table(repo)
    create_table_artifact(key="cnnpipe-metrics", table=rows, description="dvc metrics show")
    create_markdown_artifact(key="cnnpipe-metrics-diff", markdown=metrics_diff_markdown(repo, baseline),
                             description=f"dvc metrics diff {baseline}")
    return rows


def production_commit(repo: str) -> str | None:
    """The commit of the model now in the promote stage, or None while nothing is in production."""
    from cnnpipe import registry

    current = registry.in_stage(repo, registry.MODEL, load_section("promote", Path(repo) / "params.yaml").stage)
    return current.commit if current else None


@task(cache_policy=NO_CACHE)
def promote_run(repo: str, run_name: str) -> dict[str, Any]:
    """The gate: promote the run if params.yaml's promote rules pass; the decision becomes an artifact."""
    from cnnpipe.promote import promote

    decision = promote(repo, load_section("promote", Path(repo) / "params.yaml"), run_name=run_name)
    head = (f"**Promoted** as `{decision.version}`" if decision.version else "**Refused**: production unchanged")
    before = decision.production or "nothing"
    markdown = "\n".join([f"{head} (production before: {before})", "", "| rule check |", "|---|",
                          *(f"| `{r}` |" for r in decision.reasons)])
    create_markdown_artifact(key="cnnpipe-promotion", markdown=markdown, description=f"cnnpipe promote ({run_name})")
    get_run_logger().info("promotion: %s", decision.summary().replace("\n", "; "))
    return {"promoted": decision.promote, "version": decision.version, "production_before": decision.production,
            "reasons": decision.reasons}


@flow(name="train_pipeline", log_prints=True)
def train_pipeline(overrides: dict[str, Any] | None = None, repo: str = str(PROJECT),
                   baseline: str = "prod", promote: bool = False) -> dict[str, str]:
    """Reproduce the DVC pipeline of `repo`, applying `overrides` ({"train.epochs": 5}) to params.yaml first.
    The metrics diff compares with `baseline`: "prod" (the production model's commit; HEAD while nothing is in
    production) or any Git revision. With `promote`, the run then goes through the promotion gate."""
    logger = get_run_logger()
    if overrides:
        applied = apply_overrides(Path(repo) / "params.yaml", overrides)  # refused before any stage runs
        logger.info("params overridden: %s", applied)
    statuses: dict[str, str] = {}
    for stage in stage_order(repo):
        stage_task = dvc_stage.with_options(name=f"dvc-{stage}", retries=RETRIES.get(stage, 0),
                                            retry_delay_seconds=10)
        statuses[stage] = stage_task(repo, stage)
    if baseline == "prod":
        baseline = production_commit(repo) or "HEAD"
    publish_metrics(repo, baseline)
    if promote:
        from prefect.runtime import flow_run

        decision = promote_run(repo, flow_run.get_name() or "manual")
        statuses["promote"] = f"promoted {decision['version']}" if decision["promoted"] else "refused"
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
