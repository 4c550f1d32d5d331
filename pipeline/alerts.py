"""Prefect automations that watch the nightly deployment: a notification when a run fails or crashes, and when
no run has completed for 26 hours (a proactive trigger: it fires on the absence of the event).

    python pipeline/alerts.py https://hooks.slack.com/services/...   # against PREFECT_API_URL

The webhook is saved as the Slack webhook block `cnnpipe-alerts` (any Apprise-backed notification block of
Prefect works the same way); running the script again replaces both automations.
"""

from __future__ import annotations

import sys
from datetime import timedelta

DEPLOYMENT = "train_pipeline/nightly"
NAMES = ("cnnpipe: nightly run failed or crashed", "cnnpipe: no completed nightly run in 26 hours")


def automations(deployment_id: str, block_id) -> list:
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    related = {"prefect.resource.id": f"prefect.deployment.{deployment_id}"}
    failed = Automation(
        name=NAMES[0],
        trigger=EventTrigger(expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}, match_related=related,
                             posture=Posture.Reactive, threshold=1, within=timedelta(0)),
        actions=[SendNotification(block_document_id=block_id, subject="cnnpipe: nightly run {{ flow_run.name }} "
                                  "{{ flow_run.state.name }}", body="{{ flow_run.state.message }}")])
    silent = Automation(
        name=NAMES[1],
        trigger=EventTrigger(expect={"prefect.flow-run.Completed"}, match_related=related,
                             posture=Posture.Proactive, threshold=1, within=timedelta(hours=26)),
        actions=[SendNotification(block_document_id=block_id, subject="cnnpipe: no nightly run completed",
                                  body="No run of train_pipeline/nightly completed in the last 26 hours.")])
    return [failed, silent]


def create(webhook_url: str) -> list:
    from prefect.automations import Automation
    from prefect.blocks.notifications import SlackWebhook
    from prefect.client.orchestration import get_client

    block_id = SlackWebhook(url=webhook_url).save("cnnpipe-alerts", overwrite=True)
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
    for name in NAMES:  # replace, not duplicate
        try:
            Automation.read(name=name).delete()
        except ValueError:
            pass
    return [a.create() for a in automations(str(deployment.id), block_id)]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python pipeline/alerts.py WEBHOOK_URL", file=sys.stderr)
        sys.exit(2)
    for automation in create(sys.argv[1]):
        print(f"created automation {automation.name!r} ({automation.id})")
