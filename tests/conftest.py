import os

from hypothesis import HealthCheck, settings

# Shared, noisy CI machines: no per-example deadlines; failures print their reproduction blob.
settings.register_profile("ci", deadline=None, print_blob=True)
settings.register_profile(
    "thorough",
    deadline=None,
    print_blob=True,
    max_examples=2000,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
