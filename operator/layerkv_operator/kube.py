"""Adapter to the Kubernetes API for the worker Deployments: read replicas, set the scale.

Kopf watches the ServingSLOs itself; this adapter is only the few calls the handlers
make on Deployments, through the official client. Scaling goes through the
``deployments/scale`` subresource (the RBAC grants patch on that, not on whole
Deployments), so the operator can change the replica count and nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import kubernetes.client
import kubernetes.config
from kubernetes.client.exceptions import ApiException


@dataclass(frozen=True)
class DeploymentReplicas:
    replicas: int  # spec.replicas (what was asked for)
    ready_replicas: int | None  # status.readyReplicas (None: no status yet)


def api_client() -> kubernetes.client.ApiClient:
    """In-cluster service account first, else the kubeconfig named by ``$KUBECONFIG``
    (read now, not at import time, so tests and ``kopf run`` agree on the cluster)."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
        )
    return kubernetes.client.ApiClient(configuration)


class DeploymentScaler:
    """Reads and scales Deployments. Methods raise ``ApiException`` on API errors other
    than a missing Deployment."""

    def __init__(self, client: kubernetes.client.ApiClient, *, timeout_s: float = 10.0) -> None:
        self._apps = kubernetes.client.AppsV1Api(client)
        self._timeout_s = timeout_s

    def read(self, namespace: str, name: str) -> DeploymentReplicas | None:
        """The Deployment's replica counts, or None when there is no such Deployment."""
        try:
            deployment = self._apps.read_namespaced_deployment(
                name, namespace, _request_timeout=self._timeout_s
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        replicas = deployment.spec.replicas if deployment.spec else None
        ready = deployment.status.ready_replicas if deployment.status else None
        # An absent spec.replicas means 1, as the API server defaults it.
        return DeploymentReplicas(
            replicas=1 if replicas is None else replicas, ready_replicas=ready
        )

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self._apps.patch_namespaced_deployment_scale(
            name,
            namespace,
            {"spec": {"replicas": replicas}},
            _content_type="application/merge-patch+json",
            _request_timeout=self._timeout_s,
        )
