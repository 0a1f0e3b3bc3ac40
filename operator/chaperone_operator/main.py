"""The kopf operator: startup configuration and the handler modules it serves.

Importing this module registers every handler (``handlers/``) in kopf's default registry; the
``chaperone operator`` command (:mod:`.cli`) then runs kopf cluster-wide.

Startup builds the configuration exactly once (:class:`OperatorSettings` and the injection
settings, both from the environment) into a :class:`Runtime` kept in kopf's ``memo``, where every
handler finds it — there are no module-level configuration globals. It also configures kopf:

* **Webhook server**: HTTPS on ``CHAPERONE_WEBHOOK_LISTEN``:``CHAPERONE_WEBHOOK_PORT`` with the
  certificate and key files (in the chart, a mounted Secret; kopf reloads them when they change).
  The chart owns the webhook configurations (like cert-manager does), so kopf's managed mode is
  off; each handler has a fixed ``id`` that is also its URL path (``/approvalrequest-mutate``).
* **Peering and replicas**: kopf peering is not leader election: operators with the same
  priority all pause. Each replica therefore takes a random priority (unless
  ``CHAPERONE_PEERING_PRIORITY`` is set) and the highest live one runs the watch handlers,
  timers and daemons; the others are hot standbys that resume when its keep-alive in the
  ``ClusterKopfPeering`` object lapses (about a minute). Admission is stateless and served by
  *every* replica, paused or not, so the fail-closed webhooks stay available behind the Service
  while one replica is down. Startup creates the peering object when the kopf.dev CRD exists
  (the chart installs it); without it, or with ``CHAPERONE_STANDALONE``, the operator runs
  standalone, which is right for one replica.
* **Finalizer** ``chaperone.dev/operator`` (timers and daemons need one) and Kubernetes Events
  only for warnings from kopf itself; decisions post their own Events.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import kopf

from chaperone_sidecar.api import LABEL_INJECT
from chaperone_sidecar.policy import aws_catalog

from . import handlers, kube  # noqa: F401  (importing handlers registers them)
from .handlers import WEBHOOKS
from .settings import OperatorSettings

__all__ = ["Runtime", "StrictWebhookServer", "on_operator_startup", "on_operator_cleanup",
           "configure_kopf"]

FINALIZER = "chaperone.dev/operator"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class Runtime:
    """What handlers need, built once at startup and kept in ``memo.runtime``."""

    settings: OperatorSettings
    injection: Any  # chaperone_operator.injection.InjectionSettings
    api: Any  # kubernetes.client.ApiClient
    ensure_ca: Callable[[Any, str, dt.datetime], Any] | None = None
    clock: Callable[[], dt.datetime] = field(default=utcnow)

    def now(self) -> dt.datetime:
        return self.clock()


class StrictWebhookServer(kopf.WebhookServer):
    """kopf's HTTPS webhook server, refusing URL paths that name no Chaperone handler.

    kopf answers a request for an unknown handler id with "allowed" (no handler, no objection);
    a 404 instead makes the apiserver apply failurePolicy: Fail, so a mistyped path in a webhook
    configuration fails closed.
    """

    @staticmethod
    async def _serve(fn, request):  # kopf's (private) per-request hook
        if request.match_info.get("id") not in WEBHOOKS:
            raise aiohttp.web.HTTPNotFound(reason="no such Chaperone webhook")
        return await kopf.WebhookServer._serve(fn, request)


def configure_kopf(settings: kopf.OperatorSettings, op: OperatorSettings) -> None:
    """Apply the operator settings to kopf's settings (webhook server, peering, persistence)."""
    settings.admission.server = StrictWebhookServer(
        addr=op.webhook_listen, port=op.webhook_port, host=op.webhook_host,
        certfile=op.webhook_cert_file, pkeyfile=op.webhook_key_file)
    settings.admission.managed = None  # the chart owns the webhook configurations
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.WARNING
    # Only labelled pods are ever followed: filter server-side instead of streaming every pod.
    settings.watching.label_selectors["v1", "pods"] = f"{LABEL_INJECT}=true"
    settings.peering.name = op.peering_name
    settings.peering.mandatory = False
    settings.peering.priority = op.peering_priority if op.peering_priority is not None \
        else random.SystemRandom().randint(1, 1_000_000)
    if op.standalone:
        settings.peering.standalone = True


@kopf.on.startup()
def on_operator_startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger, **_):
    """Build the Runtime once from the environment and configure kopf with it."""
    from .ca import ensure_namespace_ca
    from .injection.settings import InjectionSettings

    try:
        op = OperatorSettings.from_env(os.environ)
        injection = InjectionSettings.from_env(os.environ)
    except ValueError as exc:  # a configuration error: stop instead of retrying forever
        raise kopf.PermanentError(str(exc)) from exc
    api = kube.load_api_client()
    ensure_ca = functools.partial(ensure_namespace_ca, secret_name=injection.ca_secret_name,
                                  bundle_name=injection.trust_bundle_name)
    memo.runtime = Runtime(op, injection, api, ensure_ca)
    # Policy admission checks AWS action names against botocore's models; build the service
    # index now, in the background, so the first AccessPolicy admission does not pay for it.
    threading.Thread(target=aws_catalog.warm_up, name="aws-catalog-warm-up", daemon=True).start()
    configure_kopf(settings, op)
    if not settings.peering.standalone and not kube.ensure_cluster_peering(api, op.peering_name):
        logger.warning("kopf.dev peering CRD not installed: running standalone (one replica only)")
        settings.peering.standalone = True
    logger.info(f"webhooks on https://{op.webhook_listen}:{op.webhook_port}; peering "
                f"{'off' if settings.peering.standalone else op.peering_name} "
                f"(priority {settings.peering.priority})")


@kopf.on.cleanup()
def on_operator_cleanup(memo: kopf.Memo, **_):
    """Close the API client's connection pool."""
    runtime = getattr(memo, "runtime", None)
    if runtime is not None:
        runtime.api.close()
