"""Test-suite settings: hypothesis profiles without deadlines (JIT compilation is slow once)."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
# A short profile for runs with NUMBA_DISABLE_JIT=1, where every kernel is interpreted.
settings.register_profile(
    "nojit", deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("SCLREF_HYPOTHESIS_PROFILE", "default"))
