"""A Dagster Pipes client for Kubeflow PyTorchJobs: the multi-node launcher of the training entry point.

dagster-k8s' `PipesK8sClient` runs one pod and reads the Pipes messages from that pod's logs. A PyTorchJob runs
one pod per node, and global rank 0 (the only rank that talks to Pipes) may land on any of them, so this client
reads the messages from S3 instead (the trainer's `pipes_message_writer()` switches to `PipesS3MessageWriter`
when the messages params name a bucket). Everything else follows `PipesK8sClient`: the context goes in through
environment variables, the job is created through the Kubernetes API and watched until it ends, and a job whose
step stops before it ends (interrupt, timeout, error) is deleted so no GPUs keep training for nobody.

dagster_aws and kubernetes are imported inside the functions: only the multi-node launch needs them.
"""

from __future__ import annotations

import copy
import os
import random
import string
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import dagster as dg

if TYPE_CHECKING:
    import kubernetes.client

GROUP, VERSION, PLURAL = "kubeflow.org", "v1", "pytorchjobs"
CONTAINER = "pytorch"  # the training operator runs the container of this name in every replica
DAY = 24 * 3600.0
# Which Dagster run a job belongs to: a name conflict replaces only this run's own (or an ended) job.
RUN_ID_LABEL = "higgs-pipeline/dagster-run-id"
ENDED = ("Succeeded", "Failed")


def with_container_env(manifest: Mapping[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `manifest` with `env` set on the `pytorch` container of every replica (Master and Workers).

    Every replica gets the Pipes env, not only the Master: torchrun may place global rank 0 on any node.
    """
    body = copy.deepcopy(dict(manifest))
    replicas = body.get("spec", {}).get("pytorchReplicaSpecs") or {}
    if not replicas:
        raise ValueError("manifest has no spec.pytorchReplicaSpecs: build it with launch/k8s.py::pytorch_job_manifest")
    for role, replica in replicas.items():
        containers = [c for c in replica["template"]["spec"]["containers"] if c.get("name") == CONTAINER]
        if not containers:
            raise ValueError(f"PyTorchJob replica {role} has no container named {CONTAINER!r}")
        for container in containers:
            kept = [e for e in container.get("env", []) if e["name"] not in env]
            container["env"] = kept + [{"name": k, "value": v} for k, v in env.items()]
    return body


def job_phase(job: Mapping[str, Any]) -> tuple[str, str]:
    """(phase, message) of a PyTorchJob: its newest condition whose status is "True" ("Pending" before any)."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    last = conditions[-1]
    return str(last.get("type", "Unknown")), str(last.get("message") or last.get("reason") or "")


def split_s3_url(url: str) -> tuple[str, str]:
    """("bucket", "key/prefix") of "s3://bucket/key/prefix"."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def s3_message_reader(messages_url: str, interval: float = 5.0) -> dg.PipesMessageReader:
    """dagster_aws' `PipesS3MessageReader` for the messages under `messages_url` (s3://bucket/prefix).

    The stock reader writes each session's chunks under a random prefix at the bucket's root; this one puts that
    random prefix under `messages_url`, beside the run's other artifacts (and under one lifecycle rule). Each
    session still gets its own random folder: chunk numbers restart at 1, so a retry must not read an earlier
    attempt's chunks. The boto3 client reads credentials and AWS_ENDPOINT_URL from the environment, as the
    trainer's writer does.
    """
    import boto3
    from dagster_aws.pipes import PipesS3MessageReader

    bucket, prefix = split_s3_url(messages_url)

    class PrefixedS3MessageReader(PipesS3MessageReader):
        @contextmanager
        def get_params(self) -> Iterator[dict[str, Any]]:
            with super().get_params() as params:
                session = "".join(random.choices(string.ascii_lowercase + string.digits, k=16))
                yield {**params, "key_prefix": f"{prefix}/{session}" if prefix else session}

    return PrefixedS3MessageReader(bucket=bucket, client=boto3.client("s3"), interval=interval)


class PipesPyTorchJobClient(dg.PipesClient):
    """Runs a PyTorchJob manifest with Dagster Pipes: context through env vars, messages through S3.

    Args:
        poll_interval: seconds between reads of the job's status.
        timeout: seconds the job may take from creation to Succeeded/Failed before the step fails (and the job
            is deleted).
        api_client: a ready `kubernetes.client.ApiClient`; None loads the config like dagster-k8s does:
            in-cluster when KUBERNETES_SERVICE_HOST is set, else the kubeconfig (`kubeconfig_file`,
            `kube_context`).
    """

    def __init__(
        self,
        *,
        poll_interval: float = 10.0,
        timeout: float = 7 * DAY,
        api_client: kubernetes.client.ApiClient | None = None,
        kubeconfig_file: str | None = None,
        kube_context: str | None = None,
    ) -> None:
        if poll_interval <= 0 or timeout <= 0:
            raise ValueError(f"poll_interval ({poll_interval}) and timeout ({timeout}) must be positive")
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.api_client = api_client
        self.kubeconfig_file = kubeconfig_file
        self.kube_context = kube_context

    def _custom_objects_api(self) -> Any:
        import kubernetes

        if self.api_client is None:
            if os.getenv("KUBERNETES_SERVICE_HOST") and self.kubeconfig_file is None and self.kube_context is None:
                kubernetes.config.load_incluster_config()
            else:
                kubernetes.config.load_kube_config(config_file=self.kubeconfig_file, context=self.kube_context)
        return kubernetes.client.CustomObjectsApi(self.api_client)

    def run(  # type: ignore[override]  (PipesClient.run takes **kwargs; these are ours)
        self,
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        manifest: Mapping[str, Any],
        message_reader: dg.PipesMessageReader,
        extras: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> dg.PipesClientCompletedInvocation:
        """Create the PyTorchJob with the Pipes env on every replica, wait until it ends, return its messages.

        Raises dg.Failure with the operator's condition message when the job fails, or when it has not ended
        within `timeout`.
        """
        api = self._custom_objects_api()
        namespace = manifest["metadata"].get("namespace") or "default"
        name = manifest["metadata"]["name"]
        with dg.open_pipes_session(
            context=context,
            context_injector=dg.PipesEnvContextInjector(),
            message_reader=message_reader,
            extras=extras,
        ) as session:
            body = with_container_env(manifest, {**session.get_bootstrap_env_vars(), **(env or {})})
            body["metadata"].setdefault("labels", {})[RUN_ID_LABEL] = context.run.run_id
            phase, message, created = "", "", False
            try:
                self._create(context, api, namespace, name, body)
                created = True
                phase, message = self._wait(context, api, namespace, name)
            finally:
                # A failed job is kept for `kubectl logs` (a retry replaces it); a succeeded one has nothing left
                # to show; any other way out (interrupt, timeout, API error) must not leave it holding GPUs.
                if phase == "Succeeded":
                    self._delete(api, namespace, name)
                elif created and phase != "Failed":
                    self._delete_unfinished(context, api, namespace, name)
            if phase == "Failed":
                raise dg.Failure(
                    f"PyTorchJob {namespace}/{name} failed: {message or 'the operator gave no message'}. It is kept "
                    f"for `kubectl logs`; a retry replaces it.",
                    metadata={"pytorchjob": f"{namespace}/{name}", "operator_message": message},
                )
        return dg.PipesClientCompletedInvocation(session)

    def _create(self, context: Any, api: Any, namespace: str, name: str, body: dict[str, Any]) -> None:
        """Create the job. A job of that name (same run key) is replaced when it is this Dagster run's own (an
        earlier attempt of the step) or has ended; one that another run is still training with is left alone."""
        from kubernetes.client.exceptions import ApiException

        try:
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        except ApiException as error:
            if error.status == 404:
                raise dg.Failure(
                    f"The cluster has no {GROUP}/{VERSION} {PLURAL} in namespace {namespace}: install the Kubeflow "
                    f"training operator, or run on one node (k8s_nodes: 1)"
                ) from error
            if error.status == 403:
                raise dg.Failure(
                    f"Not allowed to create {PLURAL}.{GROUP} in namespace {namespace}: give the run's service "
                    f"account create/get/delete on them ({error.reason})"
                ) from error
            if error.status != 409:
                raise
            existing = self._get(api, namespace, name) or {}
            owner = ((existing.get("metadata") or {}).get("labels") or {}).get(RUN_ID_LABEL)
            phase, _ = job_phase(existing)
            if existing and owner != context.run.run_id and phase not in ENDED:
                raise dg.Failure(
                    f"PyTorchJob {namespace}/{name} is still {phase} for Dagster run {owner or '(unlabelled)'}: the "
                    f"same data and settings are already training there. Wait for it, or delete the job "
                    f"(kubectl delete pytorchjob {name} -n {namespace}) to take over."
                ) from error
            context.log.warning(f"PyTorchJob {namespace}/{name} exists ({phase}, an earlier attempt): replacing it")
            self._delete(api, namespace, name)
            deadline = time.monotonic() + 300
            while self._get(api, namespace, name) is not None:
                if time.monotonic() > deadline:
                    raise dg.Failure(f"PyTorchJob {namespace}/{name} was not deleted within 300 s: delete it") from None
                time.sleep(min(self.poll_interval, 5.0))
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        context.log.info(f"Created PyTorchJob {namespace}/{name}")

    def _wait(self, context: Any, api: Any, namespace: str, name: str) -> tuple[str, str]:
        """("Succeeded" | "Failed", the operator's message) once the job ended; dg.Failure when it vanished or ran
        past the timeout. Phase changes go to the step's log."""
        deadline = time.monotonic() + self.timeout
        phase = None
        while True:
            job = self._get(api, namespace, name)
            if job is None:
                raise dg.Failure(f"PyTorchJob {namespace}/{name} disappeared before it ended (deleted by someone?)")
            current, message = job_phase(job)
            if current != phase:
                context.log.info(f"PyTorchJob {namespace}/{name}: {current}" + (f" ({message})" if message else ""))
                phase = current
            if current in ("Succeeded", "Failed"):
                return current, message
            if time.monotonic() > deadline:
                raise dg.Failure(
                    f"PyTorchJob {namespace}/{name} did not end within {self.timeout:.0f} s (phase {current}): "
                    f"raise the client's timeout or look at its pods (kubectl describe pytorchjob {name})"
                )
            self._pause()

    def _pause(self) -> None:
        """Between status reads. Dagster interrupts a step (run terminated) by raising in it while it waits here."""
        time.sleep(self.poll_interval)

    @staticmethod
    def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _delete_unfinished(self, context: Any, api: Any, namespace: str, name: str) -> None:
        """Delete a job the step leaves before it ended; a failure to do so is logged, never raised, so the
        reason the step stopped stays the error the step reports."""
        context.log.warning(f"Deleting PyTorchJob {namespace}/{name}: the step stopped before the job ended")
        try:
            self._delete(api, namespace, name)
        except Exception as error:
            context.log.error(
                f"Could not delete PyTorchJob {namespace}/{name} ({error}): delete it by hand "
                f"(kubectl delete pytorchjob {name} -n {namespace}), it may still hold GPUs"
            )

    @staticmethod
    def _delete(api: Any, namespace: str, name: str) -> None:
        """Delete the job and (foreground) its pods; already gone is fine."""
        from kubernetes.client.exceptions import ApiException

        try:
            api.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as error:
            if error.status != 404:
                raise
