"""Pod and container security settings that meet the Pod Security Standard "restricted".

Every pod the operator renders (workers, loaders) runs as a fixed non-root user with no
privilege escalation, no capabilities, the runtime's default seccomp profile and a read-only
root filesystem; scratch space comes from an emptyDir mounted at /tmp. Secrets (model keys,
API key digests) reach a container as single read-only files, one Secret key each.
"""

from __future__ import annotations

from typing import Any

RUN_AS_USER = 10001  # why: the UID the Dockerfiles create; non-zero as "restricted" demands


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,  # why: the loader writes into a fresh PVC owned by root
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def scratch_volume(size: str = "1Gi") -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of the writable /tmp every container gets."""
    return (
        {"name": "tmp", "emptyDir": {"sizeLimit": size}},
        {"name": "tmp", "mountPath": "/tmp"},
    )


def secret_file(
    volume: str, secret: str, key: str, mount_dir: str, file_name: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(volume, mount, file path) exposing one key of a Secret as a read-only file.

    Only the named key is projected (never the whole Secret), readable by owner and fsGroup.
    """
    return (
        {
            "name": volume,
            "secret": {
                "secretName": secret,
                "items": [{"key": key, "path": file_name}],
                "defaultMode": 0o440,
            },
        },
        {"name": volume, "mountPath": mount_dir, "readOnly": True},
        f"{mount_dir}/{file_name}",
    )
