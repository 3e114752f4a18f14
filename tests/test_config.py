"""Config schema: the shipped configs validate, bad values fail with one line naming the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import SCHEMA_PATH, deep_merge, load_config, load_schema, run_settings, validate_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def default():
    return yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "copdgene.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "config" / name)
    assert config["runs"], "at least one run"
    for run in config["runs"]:
        settings = run_settings(config, run)
        assert settings["loss"]["method"] in {"none", "ifm", "ifm_only"}


def test_defaults_are_filled(default):
    config = validate_config({"runs": {"moco": {}}})
    assert config["atlas"]["patch_size"] == 32 and config["atlas"]["step"] == 26
    assert config["train"]["optimizer"] == {"lr": 0.03, "momentum": 0.9, "weight_decay": 1.0e-4, "schedule": "cosine"}
    assert config["evaluate"]["outcomes"]["CLE"]["levels"] == 6


def test_copdgene_template_has_paper_settings():
    config = load_config(ROOT / "config" / "copdgene.yaml")
    assert config["ingest"]["spacing_mm"] == 1.0
    assert (config["atlas"]["patch_size"], config["atlas"]["step"]) == (32, 26)
    epsilons = sorted(run_settings(config, r)["loss"]["epsilon"] for r in config["runs"]
                      if run_settings(config, r)["loss"]["method"] == "ifm")
    assert epsilons == [0.1, 0.2, 0.5, 1.0]


def test_run_overrides_are_deep_merged(default):
    config = validate_config(default)
    settings = run_settings(config, "ifm_e0.5")
    assert settings["loss"] == {"method": "ifm", "epsilon": 0.5, "alpha": 1.0}
    assert settings["moco"]["queue_size"] == default["train"]["moco"]["queue_size"]


@pytest.mark.parametrize(
    "override, key",
    [
        ({"train": {"optimizer": {"lr": -1}}}, "train.optimizer.lr"),
        ({"train": {"optimzer": {}}}, "train"),
        ({"atlas": {"patch_size": "big"}}, "atlas.patch_size"),
        ({"synthetic": {"resolution": "ultra"}}, "synthetic.resolution"),
        ({"runs": {"bad": {"loss": {"method": "simclr"}}}}, "runs.bad.loss.method"),
        ({"runs": {"x": {"moco": {"temperature": 0}}}}, "runs.x.moco.temperature"),
        ({"runs": {"no/slash": {}}}, "runs"),
        ({"runs": {"densitometry": {}}}, "runs.densitometry"),
        ({"evaluate": {"outcomes": {"y": {"column": "FEV1", "kind": "poisson"}}}}, "evaluate.outcomes.y.kind"),
        ({"cohort": {"phenotypes": "elsewhere.tsv"}}, "cohort.phenotypes"),
    ],
)
def test_bad_values_name_the_key(default, override, key):
    with pytest.raises(ConfigError) as error:
        validate_config(deep_merge(default, override))
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"config key '{key}'"), message


def test_unknown_run_is_rejected(default):
    with pytest.raises(ConfigError, match="no run named 'nope'"):
        run_settings(validate_config(default), "nope")


def test_schema_is_read_once_and_handed_out_as_copies():
    """load_schema parses the file once per process; a caller changing its copy changes no one else's."""
    first = load_schema()
    assert first == yaml.safe_load(SCHEMA_PATH.read_text())
    first["properties"].clear()
    second = load_schema()
    assert second["properties"] and second == yaml.safe_load(SCHEMA_PATH.read_text())
    assert second is not load_schema()


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def _leaf_keys(schema, defs, prefix=""):
    if "$ref" in schema:
        schema = defs[schema["$ref"].split("/")[-1]]
    properties = schema.get("properties")
    if not properties:
        yield prefix
        return
    for name, sub in properties.items():
        yield from _leaf_keys(sub, defs, f"{prefix}.{name}" if prefix else name)


def test_every_config_key_is_documented():
    from pipeline.config import load_schema

    schema = load_schema()
    readme = (ROOT / "config" / "README.md").read_text()
    missing = [key for key in _leaf_keys(schema, schema["$defs"])
               if f"`{key}`" not in readme and f".{key.split('.')[-1]}`" not in readme]
    assert not missing, f"undocumented config keys: {missing}"
