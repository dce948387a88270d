"""pytest setup of the benchmark suite: ``pytest benchmarks/ --benchmark-only``.

The suite's modules are ``bench_*.py`` (``pytest_collect_file`` below
collects them: the project's python_files setting is pytest's default, which
names test_*.py only). ``--benchmark-disable`` runs every body once at tiny
shapes (the CI smoke run); ``NBP_BENCH_SMOKE=1`` picks the tiny shapes in
any mode. The machine floors (copy bandwidth, matmul rate) are measured once
per session and go into every benchmark's ``extra_info`` and the JSON's
``machine_info``.
"""
import os

import pytest

import suite


def pytest_configure(config):
    # Before the bench modules are imported: their shapes are module constants.
    if config.getoption("benchmark_disable", False):
        os.environ["NBP_BENCH_SMOKE"] = "1"


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def floors():
    """{copy_bandwidth_bytes_per_s, matmul_flops_per_s, ...} of this machine, measured once."""
    suite.FLOORS.update(suite.measure_floors(suite.DEVICE, suite.DTYPE))
    return suite.FLOORS


def pytest_benchmark_update_machine_info(config, machine_info):
    from nbp.commands.bench import machine_info as nbp_machine

    machine_info["nbp"] = nbp_machine(suite.DEVICE)
    machine_info["nbp_bench_smoke"] = suite.smoke()
    machine_info["nbp_floors"] = {k: v for k, v in suite.FLOORS.items() if k != "machine"}
