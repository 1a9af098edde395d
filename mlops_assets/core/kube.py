"""How this project connects to a Kubernetes API server: one place for both `KubernetesPlatform`
(InferenceServices) and `ClusterPlatformServices` (the platform's own objects).

`kubernetes` is imported inside the function, so loading the code location never imports it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, Configuration
    from kubernetes.client.exceptions import ApiException


class KubernetesConnectionError(RuntimeError):
    """No credentials could be loaded for the API server; the message says which setting to change."""


def kube_configuration(host: str = "", in_cluster: bool = True, kubeconfig: str = "", kube_context: str = "") -> Configuration:
    """A client configuration: an explicit `host` (kubectl proxy, tests) wins; else the pod's
    ServiceAccount (`in_cluster`); else a kubeconfig file and context ("" = the defaults)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if host:
        configuration.host = host.rstrip("/")
    elif in_cluster:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise KubernetesConnectionError(
                f"in_cluster=True but this process is not in a pod with a ServiceAccount token ({exc}); "
                "set in_cluster=False (and kubeconfig / kube_context) or host"
            ) from exc
    else:
        try:
            config.load_kube_config(
                config_file=kubeconfig or None, context=kube_context or None, client_configuration=configuration
            )
        except (config.ConfigException, OSError) as exc:
            raise KubernetesConnectionError(f"cannot load kubeconfig {kubeconfig or '(default)'}: {exc}") from exc
    return configuration


@contextlib.contextmanager
def api_client(
    host: str, in_cluster: bool, kubeconfig: str, kube_context: str, error: type[Exception] = KubernetesConnectionError
) -> Iterator[ApiClient]:
    """One API client for one unit of work (its sockets closed after), or `error` saying what to set."""
    from kubernetes import client

    try:
        configuration = kube_configuration(host, in_cluster, kubeconfig, kube_context)
    except KubernetesConnectionError as exc:
        raise error(str(exc)) from exc
    with client.ApiClient(configuration) as api:
        try:
            yield api
        finally:
            api.rest_client.pool_manager.clear()  # do not leave sockets to the GC


def api_message(exc: ApiException) -> str:
    """The API server's own message in an error response (its Status `message`), or the body's start."""
    body = exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")
    try:
        return json.loads(body).get("message") or body[:300]
    except (ValueError, AttributeError):
        return body.strip()[:300] or str(exc.reason)


#: The tag K8sRunLauncher reads per job: merged over the Helm chart's `runK8sConfig` for that job's run pods.
K8S_CONFIG_TAG = "dagster-k8s/config"


def run_pod_tags(
    *, service_account: str | None = None, cpu: str | None = None, memory: str | None = None, memory_limit: str | None = None
) -> dict[str, dict]:
    """Per-job run-pod settings for dagster-k8s (ignored by the local run launcher).

    `service_account` swaps the run pod's ServiceAccount (least privilege per job: see k8s/base/rbac);
    `cpu` / `memory` are requests, `memory_limit` the limit, for jobs that need more than the default.
    """
    config: dict[str, dict] = {}
    if service_account:
        config["pod_spec_config"] = {"service_account_name": service_account}
    resources: dict[str, dict] = {}
    if cpu or memory:
        resources["requests"] = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    if memory_limit:
        resources["limits"] = {"memory": memory_limit}
    if resources:
        config["container_config"] = {"resources": resources}
    return {K8S_CONFIG_TAG: config}
