"""The integration suite's blobs dataset, for tests that build a job's actors in-process."""

from tests.integration.conftest import blobs  # noqa: F401 (a fixture)
