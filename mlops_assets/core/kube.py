"""How this project talks to a Kubernetes API server: one place for both `KubernetesPlatform`
(InferenceServices and their rollout Leases) and `ClusterPlatformServices` (the platform's own objects).

`KubeApi` makes every request with the caller's timeout, and `map_api_error` turns every failure into
an error that says what to do: the caller's own error classes, a 403 naming the missing RBAC verb and
where the Role grants it, a 401 naming the credentials, an unanswered request naming the host. What a
status means only to one caller (a 404 that says KServe is missing, a 409 that is a rival rollout) the
caller says through `meaning`.

`kubernetes` is imported inside the functions, so loading the code location never imports it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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


@dataclass(frozen=True)
class ApiErrors:
    """How one caller reports the API's failures: its error classes, and where its RBAC rules are."""

    error: type[Exception]  # 401, and every status the caller gives no meaning of its own
    unreachable: type[Exception]  # no answer: connection refused, DNS, TLS, timeout
    permission: type[Exception]  # 403
    rbac: str  # where the missing rule is granted, shown with a 403
    who: str = "the ServiceAccount"  # who needs the verb


@dataclass(frozen=True)
class ApiTarget:
    """What one request acts on, as the messages name it."""

    what: str  # "StatefulSet mlops/postgres", "Lease rollout-x in mlops-serving"
    resource: str  # the RBAC resource: "leases.coordination.k8s.io", "statefulsets (apiGroup apps)"
    namespace: str


#: A caller's reading of a status (with the API server's message): its own error, or None for the common one.
Meaning = Callable[[int, str], Exception | None]


def _failures() -> tuple[type[BaseException], ...]:
    # Evaluated only once a request has failed, so `kubernetes` is imported by then. ApiException is
    # an answer with an error status; urllib3's HTTPError (MaxRetryError, timeouts, protocol errors)
    # and OSError (refused, reset, DNS, TLS) are no answer at all.
    import urllib3
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError, OSError)


def map_api_error(
    exc: BaseException, verb: str, target: ApiTarget, host: str, errors: ApiErrors, meaning: Meaning | None = None
) -> Exception:
    """The error to raise for a failed `verb` on `target`, from an ApiException or a transport error."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int):  # no answer: not an ApiException
        return errors.unreachable(
            f"cannot reach the Kubernetes API server at {host} ({verb} {target.what}): {exc}. "
            "Check the host / kubeconfig and that the cluster is up and reachable from here"
        )
    said = api_message(exc)
    own = meaning(status, said) if meaning is not None else None
    if own is not None:
        return own
    if status == 403:
        return errors.permission(
            f"RBAC: {errors.who} needs {verb!r} on {target.resource} in namespace {target.namespace} "
            f"({errors.rbac}). The API server said: {said}"
        )
    if status == 401:
        return errors.error(
            f"the API server at {host} rejected our credentials (401): check the ServiceAccount token or kubeconfig"
        )
    return errors.error(f"{verb} {target.what} failed: HTTP {status} {getattr(exc, 'reason', '')}: {said}")


class KubeApi:
    """One API client's requests, each with the caller's timeout and its failures mapped by `map_api_error`."""

    def __init__(self, client: ApiClient, timeout_s: float, errors: ApiErrors) -> None:
        self.client, self.timeout_s, self.errors = client, timeout_s, errors
        self.host: str = client.configuration.host

    def with_errors(self, errors: ApiErrors) -> KubeApi:
        """The same client, reporting another resource's failures (its own RBAC Role)."""
        return KubeApi(self.client, self.timeout_s, errors)

    def call(
        self,
        verb: str,
        target: ApiTarget,
        method: Callable[..., Any],
        *args: Any,
        missing_ok: bool = False,
        meaning: Meaning | None = None,
        **kwargs: Any,
    ) -> Any:
        """`method` of a generated API class (or `ApiClient.call_api`); None for a 404 when `missing_ok`."""
        try:
            return method(*args, _request_timeout=self.timeout_s, **kwargs)
        except _failures() as exc:
            if missing_ok and getattr(exc, "status", None) == 404:
                return None
            raise map_api_error(exc, verb, target, self.host, self.errors, meaning) from exc

    def request(
        self,
        verb: str,
        target: ApiTarget,
        http_method: str,
        path: str,
        *,
        body: dict | None = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        missing_ok: bool = False,
        meaning: Meaning | None = None,
    ) -> dict | None:
        """A REST request on any kind by its path: the answer's JSON (None for a 404 when `missing_ok`)."""
        response = self.call(
            verb,
            target,
            self.client.call_api,
            path,
            http_method,
            query_params=query or [],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            body=body,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            missing_ok=missing_ok,
            meaning=meaning,
        )
        return None if response is None else json.loads(response.data or b"{}")


@contextlib.contextmanager
def kube_api(
    host: str, in_cluster: bool, kubeconfig: str, kube_context: str, timeout_s: float, errors: ApiErrors
) -> Iterator[KubeApi]:
    """A `KubeApi` for one unit of work; credentials that cannot be loaded raise `errors.error`."""
    with api_client(host, in_cluster, kubeconfig, kube_context, errors.error) as client:
        yield KubeApi(client, timeout_s, errors)


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
