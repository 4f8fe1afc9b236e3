"""Sandboxed execution of model-written programs against unit tests (see `pool.py`)."""

from rrtf_jax.sandbox.pool import OUTCOMES, Job, Limits, Sandbox, SandboxError, Verdict

__all__ = ["OUTCOMES", "Job", "Limits", "Sandbox", "SandboxError", "Verdict"]
