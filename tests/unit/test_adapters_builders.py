"""Adapter loader Jobs (official schemas, restricted PSS, names, keys) and `worker_lora_args`."""

from __future__ import annotations

from typing import Any

import pytest

from llmos_operator.api.common import SecretKeyRef
from llmos_operator.api.llmmodel import LLMModelSpec
from llmos_operator.builders import pool
from llmos_operator.builders.adapters import (
    ADAPTER_LABEL,
    MODEL_KEY_FILE,
    adapter_dir,
    adapter_job_name,
    adapter_load_key,
    build_adapter_job,
    worker_lora_args,
)
from llmos_operator.builders.meta import LOAD_LABEL, MODEL_LABEL
from llmos_operator.builders.model import ModelRef, build_loader_job, build_rotation_job
from llmos_operator.config import OperatorConfig
from tests.unit.k8s_schema import validate
from tests.unit.pss import violations

CONFIG = OperatorConfig()
REF = ModelRef(name="smollm2", namespace="team-a", uid="uid-model")
KEY = {"name": "kek-2024", "key": "kek"}
ADAPTERS = [
    {"name": "sql-helper", "source": "pvc://team-adapters/sql", "version": "3"},
    {"name": "tone", "source": "https://x.example/loras/tone", "sha256": "c" * 64},
    {"name": "hf-one", "source": "hf://org/loras@main/one", "sha256": "d" * 64},
]


def spec(encrypted: bool = False, adapters: list[dict[str, Any]] = ADAPTERS) -> LLMModelSpec:
    raw: dict[str, Any] = {"source": "builtin://smollm2-135m-instruct", "adapters": adapters}
    if encrypted:
        raw["encryption"] = {"enabled": True, "keySecretRef": KEY}
    return LLMModelSpec.model_validate(raw)


def container(job: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = job["spec"]["template"]["spec"]["containers"][0]
    return result


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


JOBS = [build_adapter_job(REF, s, a, CONFIG) for s in (spec(), spec(True)) for a in s.adapters]


@pytest.mark.parametrize("job", JOBS, ids=lambda j: j["metadata"]["name"])
def test_adapter_job_validates_is_restricted_and_owned(job: dict[str, Any]) -> None:
    validate(job)
    assert violations(job["spec"]["template"]["spec"]) == []
    [owner] = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMModel", "uid-model", True)
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "loader"  # the model's NetworkPolicy
    assert labels[MODEL_LABEL] == "smollm2" and labels[ADAPTER_LABEL] in {"sql-helper", "tone",
                                                                          "hf-one"}  # fmt: skip
    assert job["metadata"]["labels"][LOAD_LABEL] == labels[LOAD_LABEL]


def test_adapter_job_command_names_and_directories() -> None:
    s = spec()
    sql, tone, hf = s.adapters
    job = build_adapter_job(REF, s, sql, CONFIG)
    key = adapter_load_key(s, sql)
    assert job["metadata"]["name"] == adapter_job_name("smollm2", key) == f"smollm2-lora-{key}"
    c = container(job)
    assert c["command"] == ["llmos-worker", "fetch-model"]
    assert "--adapter" in c["args"] and "--format" not in c["args"]
    assert "--encrypt-key-file" not in c["args"] and "--sha256" not in c["args"]
    assert arg(c["args"], "--source") == "/sources/team-adapters/sql"
    assert arg(c["args"], "--dest") == f"/models/{adapter_dir(key)}"
    assert {"name": "LLMOS_MODEL_VERSION", "value": "3"} in c["env"]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "smollm2-weights"
    assert volumes["source"]["persistentVolumeClaim"] == {
        "claimName": "team-adapters",
        "readOnly": True,
    }
    t = container(build_adapter_job(REF, s, tone, CONFIG))
    assert arg(t["args"], "--source") == "https://x.example/loras/tone"
    assert arg(t["args"], "--sha256") == "c" * 64
    assert not any(e["name"] == "LLMOS_MODEL_VERSION" for e in t["env"])  # no version given
    # distinct adapters, and the model's own load, never share a Job or a directory
    names = {build_adapter_job(REF, s, a, CONFIG)["metadata"]["name"] for a in (sql, tone, hf)}
    assert len(names) == 3 and build_loader_job(REF, s, CONFIG)["metadata"]["name"] not in names


def test_load_key_changes_with_what_the_load_produces() -> None:
    base = spec()
    key = adapter_load_key(base, base.adapters[0])
    assert adapter_load_key(spec(), spec().adapters[0]) == key  # deterministic: retries match
    for patch in ({"version": "4"}, {"source": "pvc://team-adapters/sql2"}, {"sha256": "e" * 64}):
        changed = spec(adapters=[{**ADAPTERS[0], **patch}])
        assert adapter_load_key(changed, changed.adapters[0]) != key
    encrypted = spec(True)
    assert adapter_load_key(encrypted, encrypted.adapters[0]) != key


def test_encrypted_model_encrypts_its_adapters_with_the_current_key() -> None:
    s = spec(True)
    job = build_adapter_job(REF, s, s.adapters[0], CONFIG)
    c = container(job)
    assert arg(c["args"], "--encrypt-key-file") == "/etc/llmos/encryption-key/kek"
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["encryption-key"]["secret"]["secretName"] == "kek-2024"
    # while a rotation is pending the operator passes the key the data is wrapped with now
    current = SecretKeyRef(name="kek-2023", key="kek")
    job = build_adapter_job(REF, s, s.adapters[0], CONFIG, kek=current)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["encryption-key"]["secret"]["secretName"] == "kek-2023"
    # a plaintext model ignores a key
    plain = spec()
    job = build_adapter_job(REF, plain, plain.adapters[0], CONFIG, kek=current)
    assert "--encrypt-key-file" not in container(job)["args"]


def test_rotation_job_rewraps_the_adapters_too() -> None:
    old, new = SecretKeyRef(name="a", key="kek"), SecretKeyRef(name="b", key="kek")
    alone = build_rotation_job(REF, "v-1", old, new, CONFIG)
    job = build_rotation_job(REF, "v-1", old, new, CONFIG, also=["lora-1", "lora-2"])
    validate(job)
    assert container(job)["args"][:3] == ["/models/v-1", "/models/lora-1", "/models/lora-2"]
    assert container(alone)["args"][0] == "/models/v-1"
    assert job["metadata"]["name"] != alone["metadata"]["name"]


def status(*entries: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"phase": "Ready", "path": "v-1", "adapters": list(entries), **extra}


def entry(name: str, path: str | None, phase: str = "Ready", **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "phase": phase, "digest": "ab" * 32, **extra}
    if path is not None:
        out["path"] = path
    return out


def test_worker_lora_args_serves_loaded_adapters_in_spec_order() -> None:
    s = spec()
    got = worker_lora_args(
        s,
        status(
            entry("tone", "lora-t", rank=16),
            entry("sql-helper", "lora-s", rank=8),
            entry("hf-one", None, phase="Loading"),  # never loaded: not served
            entry("gone", "lora-g", rank=64),  # no longer in the spec: not served
        ),
    )
    assert got == [
        "--lora", "sql-helper=/models/lora-s", "--lora", "tone=/models/lora-t",
        "--max-loras", "2", "--max-lora-rank", "16",
    ]  # fmt: skip


def test_worker_lora_args_keeps_the_last_loaded_directory_and_sizes() -> None:
    s = spec()
    reloading = entry("sql-helper", "lora-old", phase="Loading", rank=4)
    failed = entry("tone", "lora-t", phase="Failed")  # rank unknown: the worker's default
    got = worker_lora_args(s, status(reloading, failed), mount_path="/mnt/m/")
    assert got == [
        "--lora", "sql-helper=/mnt/m/lora-old", "--lora", "tone=/mnt/m/lora-t",
        "--max-loras", "2", "--max-lora-rank", "16",
    ]  # fmt: skip
    assert worker_lora_args(s, status()) == []
    assert worker_lora_args(spec(adapters=[]), status(entry("sql-helper", "lora-s"))) == []


def test_worker_lora_args_many_adapters_and_encryption() -> None:
    many = [{"name": f"a{i}", "source": f"pvc://c/a{i}"} for i in range(40)]
    s = spec(True, adapters=many)
    entries = [entry(f"a{i}", f"lora-{i}", rank=8, encrypted=True) for i in range(40)]
    got = worker_lora_args(s, status(*entries, keySecretRef=KEY))
    assert got.count("--lora") == 40
    assert got[-8:] == [
        "--max-loras", "4", "--max-lora-rank", "8", "--max-cpu-loras", "40",
        "--lora-key-file", MODEL_KEY_FILE,
    ]  # fmt: skip
    # no key in the pod (encryption being switched on): encrypted adapters cannot be served yet
    mixed = status(entry("a0", "lora-0", rank=8, encrypted=True), entry("a1", "lora-1", rank=8))
    assert worker_lora_args(s, mixed) == [
        "--lora", "a1=/models/lora-1", "--max-loras", "1", "--max-lora-rank", "8"
    ]  # fmt: skip
    keyed = status(entry("a0", "lora-0", rank=2, encrypted=True), keySecretRef=KEY)
    assert worker_lora_args(s, keyed, key_file="/k")[-2:] == ["--lora-key-file", "/k"]


def test_key_file_is_where_the_pool_mounts_the_model_key() -> None:
    assert f"{pool.MODEL_KEY_DIR}/kek" == MODEL_KEY_FILE
    assert OperatorConfig().models_mount_path == "/models"


def test_an_adapter_named_like_the_served_model_is_left_out() -> None:
    s = spec()
    st = status(entry("sql-helper", "lora-s", rank=8), entry("tone", "lora-t", rank=8))
    got = worker_lora_args(s, st, served_name="tone")
    assert got == [
        "--lora",
        "sql-helper=/models/lora-s",
        "--max-loras",
        "1",
        "--max-lora-rank",
        "8",
    ]
    assert worker_lora_args(s, status(entry("tone", "lora-t")), served_name="tone") == []
