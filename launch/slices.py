"""TPU slices as the Cloud CLI sees them: accelerator types, the ``gcloud`` commands that create,
describe, reach and delete a slice (a TPU VM or a queued resource), and what a description says.

Nothing here runs a command: functions return argv lists (``runner.py`` runs or prints them).
"""

from __future__ import annotations

import dataclasses
import json
import re

# Per TPU generation: how many of the accelerator type's number make one chip (v4 and v5p count
# TensorCores, two a chip; v5e and v6e count chips), the chips of one host in a multi-host slice,
# the most chips one host holds alone, and the runtime version its VMs start from.
GENERATIONS = {
    "v4": dict(per_chip=2, host_chips=4, single_host=4, runtime="tpu-ubuntu2204-base"),
    "v5p": dict(per_chip=2, host_chips=4, single_host=4, runtime="v2-alpha-tpuv5"),
    "v5litepod": dict(per_chip=1, host_chips=4, single_host=8, runtime="v2-alpha-tpuv5-lite"),
    "v6e": dict(per_chip=1, host_chips=4, single_host=8, runtime="v2-alpha-tpuv6e"),
}
ALIASES = {"v5e": "v5litepod"}

# What a description's state says of a slice (TPU VM node states, queued-resource states, health).
HEALTHY = {"READY", "ACTIVE"}
PENDING = {"CREATING", "STARTING", "RESTARTING", "PROVISIONING", "WAITING_FOR_RESOURCES", "ACCEPTED", "CREATING_NODES"}
LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "SUSPENDING", "SUSPENDED", "FAILED", "REPAIRING",
        "DELETING", "UNHEALTHY_MAINTENANCE", "UNHEALTHY_TENSORFLOW", "UNHEALTHY"}
PROVISIONING = ("on-demand", "spot", "reserved", "best-effort")


class LaunchError(Exception):
    """A one-line error for the user (the launcher prints it and exits 1)."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """An accelerator type such as ``v5p-64``: its chips, hosts (workers) and chips per host (one
    JAX device a chip: v4 and v5p run their two TensorCores as one megacore device)."""
    name: str
    generation: str
    chips: int
    workers: int

    @property
    def devices_per_worker(self) -> int:
        return self.chips // self.workers

    @classmethod
    def parse(cls, name: str) -> "Accelerator":
        m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name or "")
        if not m:
            raise LaunchError(f"--type: expected an accelerator type such as v4-32, v5p-64, v5litepod-16 or "
                              f"v6e-256, got {name!r}")
        gen, n = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
        g = GENERATIONS[gen]
        if n % g["per_chip"]:
            raise LaunchError(f"--type: {name} is not a {gen} slice (its number counts {g['per_chip']} a chip)")
        chips = n // g["per_chip"]
        workers = 1 if chips <= g["single_host"] else chips // g["host_chips"]
        if chips > g["single_host"] and chips % g["host_chips"]:
            raise LaunchError(f"--type: {name}: {chips} chips do not fill hosts of {g['host_chips']}")
        return cls(f"{gen}-{n}", gen, chips, workers)


@dataclasses.dataclass(frozen=True)
class Slice:
    """A named slice: a TPU VM (``queued=False``) or a queued resource whose node has the same name.

    provisioning: on-demand, spot, reserved or best-effort (queued resources only)."""
    name: str
    zone: str
    type: str
    project: str | None = None
    runtime: str | None = None
    queued: bool = False
    provisioning: str = "on-demand"

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise LaunchError(f"NAME: expected lowercase letters, digits and hyphens (a TPU name), got {self.name!r}")
        if not self.zone:
            raise LaunchError(f"{self.name}: --zone is needed (for example us-east5-a)")
        Accelerator.parse(self.type)
        if self.provisioning not in PROVISIONING:
            raise LaunchError(f"--provisioning: expected one of {', '.join(PROVISIONING)}, got {self.provisioning!r}")
        if self.provisioning == "best-effort" and not self.queued:
            raise LaunchError("--provisioning best-effort: only a queued resource (--queued) can be best-effort")

    @property
    def accelerator(self) -> Accelerator:
        return Accelerator.parse(self.type)

    @property
    def runtime_version(self) -> str:
        return self.runtime or GENERATIONS[self.accelerator.generation]["runtime"]

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def create(self) -> list[str]:
        """The command that asks for the slice."""
        acc = [f"--accelerator-type={self.accelerator.name}"]
        how = {"on-demand": [], "spot": ["--spot"], "reserved": ["--reserved"], "best-effort": ["--best-effort"]}
        if self.queued:
            alpha = ["alpha"] if self.provisioning == "best-effort" else []  # --best-effort is an alpha flag
            return ["gcloud", *alpha, "compute", "tpus", "queued-resources", "create", self.name,
                    f"--node-id={self.name}", *self._where(), *acc, f"--runtime-version={self.runtime_version}",
                    *how[self.provisioning]]
        return ["gcloud", "compute", "tpus", "tpu-vm", "create", self.name, *self._where(), *acc,
                f"--version={self.runtime_version}", *how[self.provisioning]]

    def delete(self) -> list[str]:
        """The command that gives the slice back (a queued resource with its node: --force)."""
        if self.queued:
            return ["gcloud", "compute", "tpus", "queued-resources", "delete", self.name, *self._where(), "--force",
                    "--quiet"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "delete", self.name, *self._where(), "--quiet"]

    def describe_queued(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", "describe", self.name, *self._where(),
                "--format=json"]

    def describe_node(self) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.name, *self._where(), "--format=json"]

    def ssh(self, worker: int | str, command: str) -> list[str]:
        """``command`` (a bash line) on one worker, or on every worker (``worker="all"``)."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(), f"--worker={worker}",
                f"--command={command}"]

    def scp(self, local: str, remote: str) -> list[str]:
        """``local`` to ``remote`` (relative to the home directory) on every worker."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}", *self._where(),
                "--worker=all"]


@dataclasses.dataclass(frozen=True)
class State:
    """What the cloud says of a slice now: ``kind`` is healthy, pending, lost or absent; ``state``
    the word it said; ``addresses`` the workers' internal IPs (worker 0 first) once healthy."""
    kind: str
    state: str
    addresses: tuple[str, ...] = ()


def _kind(*words: str) -> str:
    if any(w in LOST for w in words):
        return "lost"
    if any(w in PENDING for w in words):
        return "pending"
    return "healthy" if words and words[0] in HEALTHY else "pending"


def read_state(queued_json: str | None, node_json: str | None) -> State:
    """A :class:`State` from ``describe --format=json`` answers (None: the describe found nothing).
    For a queued resource, ``queued_json`` is its own description and ``node_json`` its node's."""
    if queued_json is None and node_json is None:
        return State("absent", "NOT_FOUND")
    words = []
    if queued_json is not None:
        words.append((json.loads(queued_json).get("state") or {}).get("state", "UNKNOWN"))
    addresses: tuple[str, ...] = ()
    if node_json is not None:
        node = json.loads(node_json)
        words.append(node.get("state", "UNKNOWN"))
        if node.get("health") not in (None, "HEALTHY"):  # a maintenance event: the node says READY still
            words.append(node["health"])
        addresses = tuple(e.get("ipAddress", "") for e in node.get("networkEndpoints", []))
    kind = _kind(*words)
    return State(kind, "/".join(words), addresses if kind == "healthy" else ())
