"""Test set-up: two fake CPU devices, fixed before anything imports jax."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _clear_chex_trace_counter():
  yield
  import chex  # pylint: disable=g-import-not-at-top
  chex.clear_trace_counter()
