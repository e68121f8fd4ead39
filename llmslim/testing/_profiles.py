"""Hypothesis settings profiles for suites that property-test passes."""

from __future__ import annotations

__all__ = ["PROFILES", "register_profiles"]

PROFILES: tuple[str, ...] = ("ci", "thorough")


def register_profiles(load: str | None = None) -> None:
    """Register the hypothesis profiles ``"ci"`` and ``"thorough"``; optionally load one.

    * ``"ci"``: 20 examples per test, no deadline, the "too slow" health check off: a suite
      of pass property tests fits a 10-minute budget on 2 shared cores, where timings are noisy.
    * ``"thorough"``: 500 examples per test, no deadline, for a nightly or pre-release run.

    Args:
        load: A profile to load after registering (e.g. ``os.environ.get("HYPOTHESIS_PROFILE",
            "ci")``); ``None`` loads nothing.

    Raises:
        ModuleNotFoundError: hypothesis is not installed (``pip install llmslim[test]``).
        hypothesis.errors.InvalidArgument: ``load`` names no registered profile.

    Example:
        >>> from hypothesis import settings
        >>> register_profiles()
        >>> settings.get_profile("ci").max_examples
        20
    """
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)
    settings.register_profile("thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    if load is not None:
        settings.load_profile(load)
