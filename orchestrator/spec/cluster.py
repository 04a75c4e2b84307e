"""The `cluster:` section: where `orch submit` sends a job and what the job gets there."""

from __future__ import annotations

from pydantic import Field

from orchestrator.spec.base import Section

__all__ = ["ClusterSpec", "RuntimeEnvSpec"]


class RuntimeEnvSpec(Section):
    env_vars: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for the job."
    )
    pip: list[str] = Field(default_factory=list, description="Extra pip requirements for the job.")
    excludes: list[str] = Field(
        default_factory=list, description="More gitignore-style patterns kept out of the upload."
    )


class ClusterSpec(Section):
    address: str | None = Field(
        None, description="Ray dashboard address, e.g. http://head:8265 (used by orch submit)."
    )
    runtime_env: RuntimeEnvSpec = Field(
        default_factory=RuntimeEnvSpec, description="What the job gets on the cluster."
    )
