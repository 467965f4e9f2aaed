"""Test-wide settings. Ray reads these at init, so they are set before any test imports ray."""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Without this every ray.train.report waits ~2 s for the controller's health check.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/spa-ray/torch_extensions"))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray cluster on this machine's cores, shut down after the module."""
    import ray

    for attempt in range(3):  # on an overloaded machine the head can miss Ray's fixed 30 s start window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as exc:
            ray.shutdown()
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
    yield
    ray.shutdown()


# CI's vLLM step sets SPA_RAY_REQUIRE_VLLM=1: there a skipped test is a failure (the
# environment was built to run them; a skip would mean the step checked nothing).
if os.environ.get("SPA_RAY_REQUIRE_VLLM") == "1":

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(item, call):
        outcome = yield
        report = outcome.get_result()
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"skipped where SPA_RAY_REQUIRE_VLLM=1 forbids skips: {reason}"

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(collector):
        outcome = yield
        report = outcome.get_result()
        if report.skipped:  # a module-level importorskip
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            report.outcome = "failed"
            report.longrepr = f"{collector.nodeid} skipped where SPA_RAY_REQUIRE_VLLM=1 forbids skips: {reason}"
