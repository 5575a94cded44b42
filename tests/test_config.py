"""params.yaml + dotted overrides, and where hand runs write."""

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rastp import config
from rastp.config import ConfigError
from rastp.preset import preset_args

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def test_dvc_run_writes_dvc_paths():
    cfg, paths = config.load(["dataset=ml100k"])
    assert cfg.seed == 42 and paths.run_dir is None
    assert paths.model(write=True) == Path("data/models/ml100k")
    assert paths.metrics() == Path("metrics/ml100k.json")
    assert paths.metrics("codebook") == Path("metrics/codebook/ml100k.json")
    assert paths.result_name() == "ml100k"


def test_overrides_apply_and_send_outputs_to_a_run_folder(tmp_path, monkeypatch):
    cfg, paths = config.load(["dataset=ml100k", "train.lr=0.002", "tiger.rastp.enabled=true"])
    assert cfg.train.lr == 0.002 and cfg.tiger.rastp.enabled is True
    assert paths.run_dir.parent == Path("runs") and paths.run_dir.name.startswith("ml100k-")
    assert paths.model(write=True) == paths.run_dir / "data/models/ml100k"
    # inputs come from the run folder when it has them, else from DVC's outputs
    assert paths.prepared() == Path("data/prepared/ml100k")
    _, same = config.load(["dataset=ml100k", "tiger.rastp.enabled=true", "train.lr=0.002"])
    assert same.run_dir == paths.run_dir  # the folder depends on the overrides, not their order
    assert paths.result_name() == "ml100k_" + paths.run_dir.name.removeprefix("ml100k-")


@pytest.mark.parametrize("argv, message", [
    (["dataset=nope"], "unknown dataset 'nope'"),
    (["train.lr=0.1"], "missing dataset="),
    (["dataset=ml100k", "train.no_such_key=1"], "bad override"),
    (["dataset=ml100k", "lr"], "not of the form key=value"),
])
def test_bad_arguments_are_clear_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        config.load(argv)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_presets_set_existing_params(preset):
    """Every key of a preset is a params.yaml key and takes the preset's value (a misspelt key would be an error)."""
    values = yaml.safe_load(preset.read_text())
    overrides = [arg for arg in preset_args(preset)[1::2] if not arg.startswith("datasets=")]
    cfg, _ = config.load([f"dataset={values['datasets'][0]}", *overrides])
    assert len(overrides) == len(values) - 1 > 0
    for key, value in values.items():
        assert key == "datasets" or OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("override, message", [
    ("tiger.tie_embeddings=maybe", "tiger.tie_embeddings: Value 'maybe' is not a valid bool"),
    ("tiger.rastp.at_eval=sometimes", "tiger.rastp.at_eval: Value 'sometimes' is not a valid bool"),
    ("train.lr=fast", "train.lr: Value 'fast' of type 'str' could not be converted to Float"),
    ("train.max_steps=1.5", "train.max_steps: Value '1.5' of type 'float' could not be converted to Integer"),
    ("evaluate.ks=[5,ten]", r"evaluate.ks\[1\]: Value 'ten'"),
])
def test_an_override_of_the_wrong_type_is_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(["dataset=ml100k", override])


def test_values_are_converted_to_the_params_types():
    cfg, _ = config.load(["dataset=ml100k", "train.lr=1", "tiger.rastp.enabled=false", "train.max_steps=800"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.tiger.rastp.enabled is False and cfg.train.max_steps == 800


def test_a_bad_value_written_into_params_yaml_is_refused(tmp_path):
    """`dvc exp run -S tiger.packed_dropout=maybe` writes the string into params.yaml: the stage must refuse it."""
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["tiger"]["packed_dropout"] = "maybe"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^params.yaml: tiger.packed_dropout: Value 'maybe' is not a valid bool"):
        config.compose_params(params_file=tmp_path / "params.yaml")
    del params["tiger"]["packed_dropout"], params["train"]["lr"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^params.yaml: missing params \['tiger.packed_dropout', 'train.lr'\]"):
        config.compose_params(params_file=tmp_path / "params.yaml")
    params["tiger"]["packed_dropout"], params["train"]["lr"], params["train"]["lr_typo"] = True, 0.01, 0.02
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"^params.yaml: train.lr_typo: Key 'lr_typo' not in 'TrainParams'"):
        config.compose_params(params_file=tmp_path / "params.yaml")


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"trainer.precision: 'bf17-mixed' is not one of \('auto', '32-true'"):
        config.load(["dataset=ml100k", "trainer.precision=bf17-mixed"])
    assert config.load(["dataset=ml100k", "trainer.precision=16-mixed"])[0].trainer.precision == "16-mixed"


def test_a_beam_narrower_than_the_scored_list_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"evaluate.beam_size: 5 is below the 10 items a list is scored on"):
        config.load(["dataset=ml100k", "evaluate.beam_size=5"])
    assert config.load(["dataset=ml100k", "evaluate.beam_size=10"])[0].evaluate.beam_size == 10
    assert config.load(["dataset=ml100k", "evaluate.beam_size=1", "evaluate.exact=true"])[0].evaluate.beam_size == 1
