"""pytest glue: absl flags count as parsed; the `long` marker.

`long` marks the tests that start several processes or train many models.
`bash tools/test.sh` (the README's test command) skips them; `pytest -m long`
runs only them, and `bazel test //...` (run by CI after the README's
command) runs every test file, long ones included.
"""

import pytest
from absl import flags

# Node-id prefixes of the long tests.
LONG = (
    "tests/bench_test.py",
    "tests/dispatcher_process_test.py::WorkersTest",
    "tests/dispatcher_restart_test.py::ManyRestartsTest",
    "tests/launch_test.py::LaunchTrainingTest",
    "tests/launch_test.py::ResizeTest",
    "tests/multi_worker_test.py",
    "tests/sharding_train_test.py",
    "tests/train_equivalence_test.py::TrainEquivalenceMatrixTest",
    "tests/train_test.py::TrainBinaryTest::test_embedded_dispatcher",
    "tests/train_test.py::TrainBinaryTest::test_external_dispatcher",
    "tests/train_test.py::TrainBinaryTest::test_kill_9",
    "tests/train_test.py::TrainBinaryTest::test_bad_values",
    "tests/train_errors_test.py::KindSwitchTest",
    "tests/train_errors_test.py::TensorBoardTest",
    "tests/train_errors_test.py::OneLineErrorTest::test_truncated_checkpoint_is_named",
    "tests/train_errors_test.py::OneLineErrorTest::test_missing_config_file_and_variant",
    "tests/sharding_test.py::EquivalenceTest::test_steps_match_one_device1",
    "tests/sharding_test.py::EquivalenceTest::test_steps_match_one_device3",
    "tests/train_errors_test.py::OneLineErrorTest::test_bad_value_and_kind",
    "tests/dispatcher_restart_test.py::RestartTest::test_a_live_worker_keeps_its_leases_over_restarts",
    "tests/cli_help_test.py::HelpTest::test_train_console_script",
    "tests/teardown_test.py",
    "tests/serve_model_test.py",
    "tests/train_test.py::TrainBinaryTest::test_one_device_override",
    "tests/dispatcher_process_test.py::CommandErrorsTest::test_status_of_an_unreachable_address",
    "tests/launch_output_test.py::ConsoleTest::test_a_keras_progress_bar_is_one_line_per_epoch_off_a_terminal",
    "tests/serve_server_test.py::RouterTest",
    "tests/serve_process_test.py",
    "tests/keras_paths_test.py::AdoptedMemoryTest",
    "tests/planner_memory_test.py",
    "tests/train_preemption_test.py",
    "tests/train_equivalence_test.py::TrainEquivalenceTest::test_sgd_with_momentum_on_a_batch_and_model_mesh_matches_one_device",
    "tests/train_test.py::TrainBinaryTest::test_smoke_run_writes_sane_metrics_and_resumes",
    "tests/train_test.py::TrainBinaryTest::test_auto_kind_plans_trains_and_writes_the_plan",
    "tests/sharding_test.py::EquivalenceTest::test_steps_match_one_device2",
    "tests/sharding_test.py::LayoutTest::test_variables_state_and_metrics_take_their_layouts",
    "tests/train_test.py::RunTest::test_steps_per_execution_trains_as_one_step_per_call",
    "tests/train_test.py::RunTest::test_training_reaches_a_tls_dispatcher",
    "tests/keras_paths_test.py::StepsPerExecutionTest::test_stock_mirrored_fails",
    "tests/train_errors_test.py::OneLineErrorTest::test_workdir_that_cannot_be_written",
    "tests/train_errors_test.py::OneLineErrorTest::test_workdir_that_is_a_file",
    "tests/train_errors_test.py::OneLineErrorTest::test_truncated_latest_checkpoint_falls_back_to_the_one_before",
    "tests/keras_paths_test.py::GeneratorInputTest::test_the_alternatives_train_on_every_batch",
    "tests/planner_train_test.py::AutoTrainsEveryConfigTest",
    "tests/launch_elastic_test.py::ElasticLaunchTest",
    "tests/train_stop_agreement_test.py::TwoWorkersTest",
    "tests/planner_train_test.py::PlanBinaryTest",
    "tests/planner_plan_test.py::CalibrationTest::test_a_real_calibration_on_two_devices",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "long: multi-process or many-model tests, run by CI")
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def pytest_collection_modifyitems(config, items):
    del config  # unused
    for item in items:
        if item.nodeid.startswith(LONG):
            item.add_marker(pytest.mark.long)
