"""Pod Security Standards, "restricted" profile (Kubernetes v1.33 definition), as a checker.

Each rule of the baseline and restricted profiles that applies to a pod spec is one function below;
`violations(pod_spec)` returns a message per broken rule. The project adds one rule of its own:
every container's root filesystem is read-only.
Source of the rules: kubernetes.io/docs/concepts/security/pod-security-standards/.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}

Spec = dict[str, Any]


def _containers(pod: Spec) -> Iterator[tuple[str, Spec]]:
    for kind in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod.get(kind) or []:
            yield f"{kind}[{c.get('name')}]", c


def violations(pod: Spec) -> list[str]:
    """Every restricted-profile rule the pod spec breaks (empty when compliant)."""
    out: list[str] = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"{field} must not be true")
    for s in psc.get("sysctls") or []:
        if s.get("name") not in SAFE_SYSCTLS:
            out.append(f"sysctl {s.get('name')} is not allowed")
    for v in pod.get("volumes") or []:
        types = set(v) - {"name"}
        if not types <= RESTRICTED_VOLUME_TYPES:
            out.append(f"volume {v.get('name')} uses a disallowed type {sorted(types)}")
    pod_non_root = psc.get("runAsNonRoot") is True
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        out.append("pod securityContext.runAsUser must not be 0")
    if pod_seccomp == "Unconfined":
        out.append("pod seccompProfile must not be Unconfined")
    if psc.get("seLinuxOptions", {}).get("type") not in (
        None,
        "",
        "container_t",
        "container_init_t",
        "container_kvm_t",
        "container_engine_t",
    ):
        out.append("pod seLinuxOptions.type is not allowed")
    for where, c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged must not be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        if not (
            sc.get("runAsNonRoot") is True or (pod_non_root and sc.get("runAsNonRoot") is None)
        ):
            out.append(f"{where}: runAsNonRoot must be true (container or pod)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type") or pod_seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            out.append(f"{where}: only NET_BIND_SERVICE may be added")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}: procMount must be Default")
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.append(f"{where}: hostPort must not be set")
        if sc.get("readOnlyRootFilesystem") is not True:  # project rule
            out.append(f"{where}: readOnlyRootFilesystem must be true")
    return out
