"""Bad input gets one line naming the file and key, and exit status 2."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "configs" / "digits.yaml")
OURS = str(ROOT / "configs" / "Ours_LR.yaml")


def run_cli(capsys, *arguments):
    with pytest.raises(SystemExit) as exit_info:
        train.cli(list(arguments) + ["-q", "-l", os.devnull + "-not-used"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error, error
    assert error.startswith("error: ")
    return error


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


CASES = {
    "unknown key suggests the closest": (
        ["hyperparameter_step: 5\n"], [], ["bad.yaml", "unknown key 'hyperparameter_step'",
                                           "did you mean 'hyperparameter_steps'"]),
    "wrong type": (["batch_size: ten\n"], [], ["bad.yaml: batch_size", "must be an integer"]),
    "negative steps": (None, ["hyperparameter_steps=-1"],
                       ["--set: hyperparameter_steps", "must be an integer >= 0"]),
    "unknown dataset class": (None, ["dataset.class=UCI_Enrgy"],
                              ["dataset.class", "unknown dataset class 'UCI_Enrgy'",
                               "did you mean 'UCI_Energy'"]),
    "unknown model class": (None, ["model.class=MLQ"], ["model.class", "'MLQ'", "'MLP'"]),
    "unknown model option": (None, ["model.layer_size=[64,10]"],
                             ["model", "unknown option 'layer_size'", "layer_sizes"]),
    "unknown hypergradient method": (None, ["hypergradient.class=Implicitt"],
                                     ["--set: hypergradient.class", "'Implicit'"]),
    "unknown hypergradient option": (None, ["hypergradient.rollback=3"],
                                     ["hypergradient", "unknown option 'rollback'",
                                      "rollback_distance=5"]),
    "bad rollback distance": (None, ["hypergradient.rollback_distance=0"],
                              ["hypergradient", "rollback_distance"]),
    "unknown solver": (None, ["hypergradient.solver=gmres"], ["unknown solver 'gmres'"]),
    "unknown weight hyperparameter": (None, ["network_weight.learning_rate=-2"],
                                      ["network_weight", "unknown hyperparameter 'learning_rate'"]),
    "unknown optimised hyperparameter": (None, ["optimised_hyperparameters=[lr,wd]"],
                                         ["optimised_hyperparameters", "'wd'"]),
    "unknown transform": (None, ["transformed_hyperparameters.lr=log"],
                          ["transformed_hyperparameters.lr", "unknown transform 'log'"]),
    "bad clipping": (None, ["hyperparameter_clipping.lr=[0,-1]"],
                     ["hyperparameter_clipping.lr", "[min, max]"]),
    "unknown network optimiser": (None, ["network_weight.class=RMSProp"],
                                  ["network_weight.class", "'RMSProp'"]),
    "model does not fit the data": (None, ["model.layer_sizes=[63,10]"],
                                    ["model", "63"]),
    "bad override syntax": (None, ["batch_size"], ["--set batch_size", "key=value"]),
    "compile not a boolean": (None, ["compile=2"], ["--set: compile", "true or false"]),
    "compile with batch norm": (None, ["compile=true", "model.batch_norm=true"],
                                ["compile: true is not supported for models with buffers"]),
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.replace(" ", "_"))
def test_bad_input_gives_one_line_and_exit_status_2(case, tmp_path, capsys):
    file_text, overrides, expected = CASES[case]
    files = [DIGITS, OURS]
    if file_text:
        files.append(write(tmp_path, "bad.yaml", file_text[0]))
    arguments = ["-c", *files]
    if overrides:
        arguments += ["--set", *overrides]
    error = run_cli(capsys, *arguments)
    for fragment in expected:
        assert fragment in error, (fragment, error)


def test_malformed_yaml_names_file_and_line(tmp_path, capsys):
    bad = write(tmp_path, "broken.yaml", "model:\n  class: MLP\n layer_sizes: [1\n")
    error = run_cli(capsys, "-c", bad, OURS)
    assert "broken.yaml: malformed YAML (line" in error


def test_missing_config_file(capsys):
    error = run_cli(capsys, "-c", DIGITS, str(ROOT / "configs" / "NoSuchAlgorithm.yaml"))
    assert "NoSuchAlgorithm.yaml: config file not found" in error


def test_config_that_is_not_a_mapping(tmp_path, capsys):
    error = run_cli(capsys, "-c", write(tmp_path, "list.yaml", "- 1\n- 2\n"), OURS)
    assert "list.yaml: must contain a mapping" in error


def test_missing_data_says_where_to_put_it(tmp_path, capsys):
    error = run_cli(capsys, "-c", str(ROOT / "configs" / "uci_energy.yaml"), OURS, "--set",
                    f"data_root={tmp_path}", "dataset.download=false")
    assert "uci_energy.yaml: dataset" in error and str(tmp_path) in error


def test_missing_saved_state(tmp_path, capsys):
    error = run_cli(capsys, "-c", DIGITS, OURS, "-s", str(tmp_path / "nothing.pt"))
    assert "nothing.pt: saved state not found" in error


def test_dataset_config_required_before_algorithm(capsys):
    error = run_cli(capsys, "-c", OURS)
    assert "missing section" in error and "digits.yaml" in error


def test_real_process_prints_no_traceback(tmp_path):
    """The same path from a real process: stderr is exactly one line."""
    bad = write(tmp_path, "bad.yaml", "netwrk_weight_steps: 3\n")
    completed = subprocess.run([sys.executable, str(ROOT / "train.py"), "-c", DIGITS, bad],
                               capture_output=True, text=True)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: {bad}: unknown key 'netwrk_weight_steps' (did you mean 'network_weight_steps'?)"]
