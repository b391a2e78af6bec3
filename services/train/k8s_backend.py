"""The `kubernetes` backend: each run is a `batch/v1` Job built with the official client.

The Job runs `python -m services.train.worker --run-id …` on a GPU node, with the config in an
environment variable, endpoints from the `trainyard-config` ConfigMap and S3 credentials from the
`trainyard-s3` Secret. A pod that is restarted (node loss, OOM, preemption) runs the same command
with the same run id and so resumes from the newest complete checkpoint in the artifact store;
``backoffLimit`` bounds how often. ``replicas > 1`` becomes an Indexed Job whose pods run torchrun,
rendezvousing at pod 0 through the headless Service `trainyard-train-workers`. A Helm release names these
objects after itself and passes the names in TRAINYARD_TRAIN_JOB_SETTINGS (``settings_overrides``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from services.train.events import events_key, parse_events
from services.train.runs import BackendStatus, RunRecord
from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.logs import get_logger
from shared.storage import open_store

log = get_logger(__name__)

RUN_ID_LABEL = "trainyard.dev/run-id"
CONFIG_ENV = "TRAINYARD_RUN_CONFIG"
RENDEZVOUS_SERVICE = "trainyard-train-workers"
RENDEZVOUS_PORT = 29500
COMPONENT = "train-worker"
SETTINGS_ENV = "TRAINYARD_TRAIN_JOB_SETTINGS"


@dataclass
class JobSettings:
    """What every training Job shares; the train service reads it from its flags and environment."""

    namespace: str = "trainyard"
    image: str = "trainyard-train:latest"
    gpus_per_pod: int = 1
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    cpu_limit: str = "8"
    memory_limit: str = "32Gi"
    backoff_limit: int = 3
    active_deadline_seconds: int = 24 * 3600
    ttl_seconds_after_finished: int = 7 * 24 * 3600
    service_account: str = "trainyard-train-job"
    config_map: str = "trainyard-config"
    secret: str = "trainyard-s3"
    node_selector: dict[str, str] = field(default_factory=dict)
    gpu_tolerations: bool = True
    workers_service: str = RENDEZVOUS_SERVICE
    # Jobs are named <name_prefix>train-<run id>: each Helm release has its own prefix (10 characters at most), so
    # the train services of two releases in one namespace never replace or cancel each other's Jobs.
    name_prefix: str = ""
    # On every Job and pod: a release's instance label, which its NetworkPolicies admit.
    labels: dict[str, str] = field(default_factory=dict)


def settings_overrides(text: str | None) -> dict:
    """JobSettings fields as a deployment sets them in TRAINYARD_TRAIN_JOB_SETTINGS (a JSON object); unknown fields
    are refused, so a chart and a service that disagree fail at start-up rather than on the first Job."""
    if not text:
        return {}
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{SETTINGS_ENV} is not JSON: {exc}") from exc
    if not isinstance(values, dict):
        raise InvalidArgument(f"{SETTINGS_ENV} must be a JSON object of Job settings")
    unknown = sorted(set(values) - {f.name for f in fields(JobSettings)})
    if unknown:
        raise InvalidArgument(f"{SETTINGS_ENV} names unknown Job settings: {', '.join(unknown)}")
    return values


def job_name(run_id: str, prefix: str = "") -> str:
    return f"{prefix}train-{run_id}"


def worker_args(record: RunRecord) -> list[str]:
    args = ["-m", "services.train.worker", "--run-id", record.run_id, "--config-env", CONFIG_ENV]
    for item in record.overrides:
        args += ["--set", item]
    return args


def build_job(record: RunRecord, settings: JobSettings) -> k8s.V1Job:
    """The Job object for one run (pure: no API calls), also what `k8s/train-job.yaml` is checked against."""
    name = job_name(record.run_id, settings.name_prefix)
    labels = {
        "app.kubernetes.io/name": "trainyard",
        "app.kubernetes.io/component": COMPONENT,
        RUN_ID_LABEL: record.run_id,
        **settings.labels,
        **record.labels,  # a study's trial: trainyard.io/study, trainyard.io/trial
    }
    env = [
        k8s.V1EnvVar(name=CONFIG_ENV, value=record.config_yaml),
        k8s.V1EnvVar(name="TRAINYARD_RUN_ID", value=record.run_id),
    ]
    if record.replicas > 1:
        env.append(k8s.V1EnvVar(name="JOB_COMPLETION_INDEX", value_from=k8s.V1EnvVarSource(
            field_ref=k8s.V1ObjectFieldSelector(
                field_path="metadata.annotations['batch.kubernetes.io/job-completion-index']"))))
        command = ["torchrun"]
        args = [f"--nnodes={record.replicas}", "--nproc-per-node=1", "--node-rank=$(JOB_COMPLETION_INDEX)",
                f"--master-addr={name}-0.{settings.workers_service}", f"--master-port={RENDEZVOUS_PORT}",
                *worker_args(record)]
    else:
        command = ["python"]
        args = worker_args(record)
    resources = k8s.V1ResourceRequirements(
        requests={"cpu": settings.cpu_request, "memory": settings.memory_request},
        limits={"cpu": settings.cpu_limit, "memory": settings.memory_limit},
    )
    if settings.gpus_per_pod:
        resources.requests["nvidia.com/gpu"] = str(settings.gpus_per_pod)
        resources.limits["nvidia.com/gpu"] = str(settings.gpus_per_pod)
    container = k8s.V1Container(
        name="train",
        image=settings.image,
        command=command,
        args=args,
        env=env,
        env_from=[
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=settings.config_map)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=settings.secret)),
        ],
        resources=resources,
        ports=[k8s.V1ContainerPort(name="rendezvous", container_port=RENDEZVOUS_PORT)] if record.replicas > 1
        else None,
        security_context=k8s.V1SecurityContext(
            allow_privilege_escalation=False,
            read_only_root_filesystem=True,
            capabilities=k8s.V1Capabilities(drop=["ALL"]),
        ),
        volume_mounts=[
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp"),
            # torch's DataLoader workers and NCCL need more shared memory than the default 64 MiB.
            k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
        ],
    )
    tolerations = [k8s.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")] \
        if settings.gpu_tolerations and settings.gpus_per_pod else None
    pod_spec = k8s.V1PodSpec(
        restart_policy="Never",
        service_account_name=settings.service_account,
        automount_service_account_token=False,
        containers=[container],
        node_selector=settings.node_selector or None,
        tolerations=tolerations,
        subdomain=settings.workers_service if record.replicas > 1 else None,
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=10001, run_as_group=10001, fs_group=10001,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource()),
            k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit="2Gi")),
        ],
    )
    spec = k8s.V1JobSpec(
        backoff_limit=settings.backoff_limit,
        active_deadline_seconds=settings.active_deadline_seconds,
        ttl_seconds_after_finished=settings.ttl_seconds_after_finished,
        template=k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=pod_spec),
    )
    if record.replicas > 1:
        spec.completion_mode = "Indexed"
        spec.completions = record.replicas
        spec.parallelism = record.replicas
    return k8s.V1Job(
        api_version="batch/v1",
        kind="Job",
        metadata=k8s.V1ObjectMeta(name=name, namespace=settings.namespace, labels=labels),
        spec=spec,
    )


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, settings: JobSettings, api_client: k8s.ApiClient | None = None, store_url: str | None = None,
                 delete_timeout_s: float = 120.0, poll_s: float = 0.5):
        self.settings = settings
        self.api_client = api_client or _default_api_client()
        self.batch = k8s.BatchV1Api(self.api_client)
        self.core = k8s.CoreV1Api(self.api_client)
        self.store_url = store_url
        self.delete_timeout_s = delete_timeout_s
        self.poll_s = poll_s

    def store(self):
        return open_store(self.store_url) if self.store_url else open_store()

    def restore(self, runs: list[tuple[RunRecord, Path]]) -> None:
        pass  # Jobs live in the cluster, which queues and runs them whether this service runs or not

    def launch(self, record: RunRecord, run_dir: Path) -> dict:
        name = job_name(record.run_id, self.settings.name_prefix)
        # A resumed run reuses its id: the previous attempt's Job must be gone, pods included, before the new one
        # is created (else two workers train one run). Foreground deletion keeps the Job until its pods are
        # deleted; its absence is polled for, as a watch opened after the delete may never see the DELETED event.
        if self._delete_job(name):
            self._wait_gone(name)
        try:
            self.batch.create_namespaced_job(self.settings.namespace, build_job(record, self.settings))
        except ApiException as exc:
            raise _api_error("create", name, exc) from exc
        log.info("job created", extra={"run_id": record.run_id, "job": name, "namespace": self.settings.namespace})
        return {"job": name, "namespace": self.settings.namespace}

    def _delete_job(self, name: str) -> bool:
        """Delete the Job (foreground: its pods first); False when there was none."""
        try:
            self.batch.delete_namespaced_job(name, self.settings.namespace, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise _api_error("delete", name, exc) from exc
        return True

    def _wait_gone(self, name: str) -> None:
        deadline = time.monotonic() + self.delete_timeout_s
        while True:
            try:
                self.batch.read_namespaced_job(name, self.settings.namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise _api_error("read", name, exc) from exc
            if time.monotonic() >= deadline:
                raise Unavailable(f"Job {name} of the run's previous launch is still being deleted after "
                                  f"{self.delete_timeout_s:.0f} s (its pods are terminating); submit again once "
                                  "it is gone")
            time.sleep(self.poll_s)

    def status(self, record: RunRecord) -> BackendStatus:
        name = job_name(record.run_id, self.settings.name_prefix)
        try:
            job = self.batch.read_namespaced_job_status(name, self.settings.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return BackendStatus("gone", message=f"Job {name} no longer exists")
            raise _api_error("read", name, exc) from exc
        return self._job_status(job, name)

    def _job_status(self, job: k8s.V1Job, name: str) -> BackendStatus:
        st = job.status or k8s.V1JobStatus()
        for cond in st.conditions or []:
            if cond.status == "True" and cond.type == "Complete":
                return BackendStatus("exited", 0)
            if cond.status == "True" and cond.type == "Failed":
                return BackendStatus("exited", 1, f"Job {name} failed: {cond.reason}: {cond.message or ''}".strip())
        if st.active:
            return BackendStatus("running")
        return BackendStatus("pending", message=self._pending_reason(name))

    def _pending_reason(self, name: str) -> str:
        """Why no pod runs yet (unschedulable for lack of GPUs, image pull errors), from the pods' status."""
        try:
            pods = self.core.list_namespaced_pod(self.settings.namespace, label_selector=f"job-name={name}")
        except ApiException:
            return ""
        for pod in pods.items:
            for cond in (pod.status.conditions or []) if pod.status else []:
                if cond.type == "PodScheduled" and cond.status == "False":
                    return f"pod {pod.metadata.name} unschedulable: {cond.message}"
            for cs in (pod.status.container_statuses or []) if pod.status else []:
                waiting = cs.state.waiting if cs.state else None
                if waiting and waiting.reason not in (None, "ContainerCreating"):
                    return f"pod {pod.metadata.name}: {waiting.reason}: {waiting.message or ''}".strip()
        return ""

    def wait(self, record: RunRecord, timeout_s: float) -> None:
        """Block until the Job changes or ``timeout_s`` passes (a watch, not a poll)."""
        stream = k8s_watch.Watch()
        for _ in stream.stream(self.batch.list_namespaced_job, self.settings.namespace,
                               field_selector=f"metadata.name={job_name(record.run_id, self.settings.name_prefix)}",
                               timeout_seconds=max(1, int(timeout_s))):
            stream.stop()
            return

    def cancel(self, record: RunRecord) -> None:
        self._delete_job(job_name(record.run_id, self.settings.name_prefix))

    def events(self, record: RunRecord, run_dir: Path) -> list[dict]:
        # The pod has no disk in common with the service: the worker mirrors its events to the store.
        store = self.store()
        key = events_key(record.run_id)
        return parse_events(store.get_bytes(key).decode()) if store.exists(key) else []


def _api_error(verb: str, name: str, exc: ApiException) -> Exception:
    if exc.status in (401, 403):
        return FailedPrecondition(f"not allowed to {verb} Job {name}: {exc.reason} (check the train service's RBAC)")
    if exc.status == 409:
        return FailedPrecondition(f"Job {name} already exists")
    if exc.status == 422:
        return FailedPrecondition(f"the cluster rejected Job {name}: {exc.body}")
    return Unavailable(f"Kubernetes API error on {verb} {name}: {exc.status} {exc.reason}")


def _default_api_client() -> k8s.ApiClient:
    from kubernetes import config as k8s_config

    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        try:
            k8s_config.load_kube_config()
        except (k8s_config.ConfigException, OSError) as exc:
            raise FailedPrecondition(f"no Kubernetes configuration found (in-cluster or kubeconfig): {exc}") from exc
    return k8s.ApiClient()
