import pytest
import yaml

from dash_core.config import ConfigError, DashConfig, load_config


def test_defaults_validate_and_flatten():
    config = load_config()
    assert config == DashConfig()
    flat = config.flat()
    assert flat["algo.tau"] == 0.1 and flat["model.tiny.hidden_size"] == 128


def test_yaml_and_overrides_apply_in_order(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("algo:\n  tau: 0.3\nsampler:\n  group_size: 4\n")
    config = load_config(preset, ["algo.tau=0.0", "sampler.temperature=0.7", "store.storage_options={anon: true}"])
    assert config.algo.tau == 0.0
    assert config.sampler.group_size == 4 and config.sampler.temperature == 0.7
    assert config.store.storage_options == {"anon": True}


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"no: unknown key \(valid keys here: iterations"):
        load_config(overrides=["no.such.key=1"])
    with pytest.raises(ConfigError, match=r"algo\.taux: unknown key \(valid keys here: rule, tau"):
        load_config(overrides=["algo.taux=1"])


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["algo.tau=-1", "sampler.group_size=lots"])
    assert "algo.tau" in str(err.value) and "sampler.group_size" in str(err.value)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo:\n  tau: [0.1\n")
    with pytest.raises(ConfigError, match=r"(?s)bad\.yaml is not valid YAML.*line 2"):
        load_config(bad)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listing)


def test_override_without_equals_is_explained():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(overrides=["algo.tau"])


def test_sampling_batch_must_hold_whole_groups():
    with pytest.raises(ConfigError, match="multiple of sampler.group_size"):
        load_config(overrides=["sampler.batch_size=12", "sampler.group_size=8"])


def test_presets_in_configs_are_valid():
    from pathlib import Path

    presets = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml"))
    assert presets
    for preset in presets:
        load_config(preset)


def test_credentials_are_masked_where_the_config_is_logged():
    config = load_config(overrides=["store.storage_options={key: AKIA123, secret: s3cr3t, client_kwargs: {endpoint_url: http://x}}"])
    assert config.store.storage_options["secret"] == "s3cr3t"
    public = config.public()["store"]["storage_options"]
    assert public == {"key": "***", "secret": "***", "client_kwargs": {"endpoint_url": "http://x"}}
    assert "s3cr3t" not in config.to_yaml() and "s3cr3t" not in str(config.flat())


def test_a_masked_credential_from_a_logged_config_asks_for_the_real_one():
    logged = yaml.safe_load(load_config(overrides=["store.storage_options={secret: s3cr3t}"]).to_yaml())
    with pytest.raises(ConfigError, match=r"storage_options.secret is '\*\*\*'.*--set store.storage_options.secret="):
        load_config(base=logged)
    assert load_config(overrides=["store.storage_options.secret=s3cr3t"], base=logged).store.storage_options["secret"] == "s3cr3t"
