"""params.yaml + --set overrides: typed values, and errors that name the key and what is allowed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from genloop.core.config import Params, Source, load_params
from genloop.core.errors import ConfigError


def test_defaults_validate() -> None:
    cfg = load_params(None)
    assert cfg == Params()  # the defaults, as the same type
    assert cfg.data.resolution == 32
    assert cfg.collect.sources == [Source(uri="builtin:mnist")]
    # every default survives a dump / re-validate round trip (what params.yaml would hold)
    dumped = cfg.model_dump(mode="json", by_alias=True)
    assert Params.model_validate(dumped) == cfg
    assert "train.epochs" in cfg.flat()


def test_defaults_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(Params().model_dump(mode="json", by_alias=True)))
    assert load_params(path) == Params()


def test_empty_params_file_is_defaults(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_overrides_are_typed() -> None:
    cfg = load_params(
        None,
        [
            "train.epochs=3",
            "train.lr=1e-3",
            "train.compile=true",
            "data.mode=RGB",
            "validate.min_rows=5",
            "collect.sources=[{uri: builtin:mnist, limit: 10}]",
        ],
    )
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.train.lr == pytest.approx(1e-3) and type(cfg.train.lr) is float
    assert cfg.train.compile is True
    assert cfg.data.mode == "RGB"
    assert cfg.data_gate.min_rows == 5
    assert cfg.collect.sources == [Source(uri="builtin:mnist", limit=10)]  # a Source, not the dict given


def test_override_beats_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    cfg = load_params(path, ["train.epochs=3"])
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 16  # the rest of the file's section is kept


def test_source_strings_become_uris() -> None:
    cfg = load_params(None, ["collect.sources=[builtin:mnist, /some/dir]"])
    assert [s.uri for s in cfg.collect.sources] == ["builtin:mnist", "/some/dir"]


def test_unknown_override_key_names_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["train.epoch=3"])
    msg = str(info.value)
    assert "train.epoch" in msg
    assert "epochs" in msg and "batch_size" in msg


def test_unknown_top_level_override_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["trian.epochs=3"])
    msg = str(info.value)
    assert "trian" in msg
    assert "train" in msg and "data" in msg


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["train.epochs=abc"])
    msg = str(info.value)
    assert "train.epochs" in msg
    assert "abc" in msg
    assert "integer" in msg


def test_out_of_range_names_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["data.resolution=30"])
    msg = str(info.value)
    assert "data.resolution" in msg
    assert "30" in msg
    for allowed in ("8", "16", "32", "64", "128", "256"):
        assert allowed in msg


def test_literal_out_of_set_names_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["data.mode=CMYK"])
    msg = str(info.value)
    assert "data.mode" in msg and "CMYK" in msg
    assert "'L'" in msg and "'RGB'" in msg


def test_data_mode_defaults_to_auto_and_background_is_a_checked_colour() -> None:
    cfg = load_params(None, [])
    assert cfg.data.mode == "auto" and cfg.data.background == "#ffffff"
    assert load_params(None, ["data.background=Black"]).data.background == "#000000"  # names and #rgb: #rrggbb
    assert load_params(None, ["data.background='#F80'"]).data.background == "#ff8800"
    for value, hint in (("mauvish", "is not a colour"), ("'#ffffff80'", "must be opaque"),
                        ("#ffffff", "quote a hex colour")):  # unquoted, YAML reads a comment: null
        with pytest.raises(ConfigError) as info:
            load_params(None, [f"data.background={value}"])
        assert "data.background" in str(info.value) and hint in str(info.value)


def test_auto_family_trains_the_vae_on_a_cpu_and_diffusion_on_a_cuda_gpu(monkeypatch) -> None:
    """model.family defaults to auto and is resolved when params load, so stages, cache keys and
    MLflow params see the family that trains; a named family is kept on any device."""
    import torch

    assert load_params(None, ["train.device=cpu"]).model.family == "vae"
    assert load_params(None, ["train.device=cpu", "model.family=dcgan"]).model.family == "dcgan"
    assert load_params(None, ["train.device=cuda"]).model.family == "ddpm"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert load_params(None).model.family == "ddpm"  # train.device: auto finds the GPU
    assert load_params(None, ["train.device=cpu"]).model.family == "vae"
    assert load_params(None, ["model.family=vae"]).model.family == "vae"


def test_loading_params_on_a_machine_without_cuda_does_not_import_torch() -> None:
    """Every stage loads params; resolving model.family: auto must not cost clean or validate a
    torch import (seconds) where CUDA cannot be there: a CPU build of torch, or no GPU visible."""
    import subprocess
    import sys

    code = ("import sys; from genloop.core.config import load_params; p = load_params(None); "
            "print(p.model.family, 'torch' in sys.modules)")
    for env in ({}, {"CUDA_VISIBLE_DEVICES": ""}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}).stdout.split()
        assert out == ["vae", "False"], (env, out)


def test_bound_violation_names_key() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["train.epochs=0"])
    msg = str(info.value)
    assert "train.epochs" in msg and "greater than or equal to 1" in msg


def test_override_without_equals_sign() -> None:
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_params(None, ["train.epochs"])


def test_override_with_invalid_yaml() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["train.epochs=[1"])
    assert "train.epochs" in str(info.value) and "YAML" in str(info.value)


def test_unknown_top_level_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert "trian" in msg
    assert str(path) in msg
    assert "unknown key" in msg and "train" in msg


def test_unknown_nested_key_in_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert "train.epoch" in msg
    assert "epochs" in msg


def test_unknown_key_inside_a_source_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, ["collect.sources=[{uri: builtin:mnist, lmit: 3}]"])
    msg = str(info.value)
    assert "collect.sources.0.lmit" in msg
    assert "limit" in msg and "labels" in msg


def test_every_bad_key_is_reported_at_once(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: abc\ndata:\n  resolution: 30\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    msg = str(info.value)
    assert "train.epochs" in msg and "data.resolution" in msg


def test_missing_params_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "params.yaml"
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_params_file_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value) and "mapping" in str(info.value)


def test_invalid_yaml_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train: [1\n")
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_section_hash_tracks_only_named_sections() -> None:
    a = load_params(None)
    b = load_params(None, ["train.epochs=3"])
    c = load_params(None, ["data.resolution=64"])
    assert a.section_hash("data", "clean") == b.section_hash("data", "clean")
    assert a.section_hash("data", "clean") != c.section_hash("data", "clean")


def test_sinks_must_be_s3_uris_naming_a_bucket() -> None:
    cfg = load_params(None, ["generate.sink=s3://bucket/gen", "optimize.sink=s3://bucket"])
    assert (cfg.generate.sink, cfg.optimize.sink) == ("s3://bucket/gen", "s3://bucket")
    assert load_params(None).generate.sink is None and load_params(None).optimize.sink is None
    with pytest.raises(ConfigError, match=r"generate\.sink.*s3://bucket/prefix"):
        load_params(None, ["generate.sink=/tmp/out"])
    with pytest.raises(ConfigError, match=r"optimize\.sink.*names no bucket"):
        load_params(None, ["optimize.sink=s3:///prefix"])


def test_dvc_push_accepts_yaml_booleans_and_needs_dvc_add() -> None:
    assert load_params(None).collect.dvc_push == "auto"
    assert load_params(None, ["collect.dvc_push=yes"]).collect.dvc_push == "yes"  # YAML reads yes as true
    assert load_params(None, ["collect.dvc_push=no"]).collect.dvc_push == "no"
    with pytest.raises(ConfigError, match=r"collect\.dvc_push"):
        load_params(None, ["collect.dvc_push=maybe"])
    with pytest.raises(ConfigError, match=r"collect\.dvc_push=yes needs collect\.dvc_add=true"):
        load_params(None, ["collect.dvc_push=yes", "collect.dvc_add=false"])


def test_bare_yes_and_no_mean_the_words_in_auto_yes_no_settings():
    cfg = load_params(None, ["train.channels_last=yes", "model.conditional=no", "collect.dvc_push=yes"])
    assert (cfg.train.channels_last, cfg.model.conditional, cfg.collect.dvc_push) == ("yes", "no", "yes")


BAD_PARAMS = {
    # params.yaml text -> what the error must name (dotted key, the value, what is allowed)
    "trian:\n  epochs: 1\n": ["trian: unknown key", "valid keys: ", "train"],
    "train:\n  epochs: three\n": ["train.epochs = 'three'", "integer"],
    "train:\n  epochs: 0\n": ["train.epochs = 0", "greater than or equal to 1"],
    "data:\n  resolution: 30\n": ["data.resolution = 30", "[8, 16, 32, 64, 128, 256]"],
    "model:\n  family: gpt\n": ["model.family = 'gpt'", "'dcgan', 'vae' or 'ddpm'"],
    "evaluate:\n  n_samples: -5\n": ["evaluate.n_samples = -5"],
    "collect:\n  max_synthetic_fraction: 1.5\n": ["collect.max_synthetic_fraction = 1.5", "less than or equal to 1"],
    "feedback:\n  store: 'ftp://x/y'\n": ["feedback.store = 'ftp://x/y'", "s3://bucket/prefix"],
    "- just\n- a list\n": ["must hold a mapping"],
    "train: {epochs: [\n": ["not valid YAML"],
}


@pytest.mark.parametrize("text", list(BAD_PARAMS))
def test_the_cli_refuses_bad_params_before_any_work(tmp_path: Path, text: str) -> None:
    """`genloop loop` and a stage exit 2 naming the key, the value and what is allowed; nothing is written."""
    from typer.testing import CliRunner

    from genloop.cli.main import app

    (tmp_path / "params.yaml").write_text(text)
    runner = CliRunner()
    for args in (["loop"], ["train"]):
        result = runner.invoke(app, [*args, "--params", str(tmp_path / "params.yaml"), "--workspace", str(tmp_path)])
        assert result.exit_code == 2, result.output
        said = " ".join(result.output.split())
        for expected in BAD_PARAMS[text]:
            assert expected in said, (expected, said)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no lock, data, reports or runs


def test_a_bad_set_override_is_refused_before_any_work(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genloop.cli.main import app

    result = CliRunner().invoke(app, ["loop", "--params", str(tmp_path / "p.yaml"), "--workspace", str(tmp_path)])
    assert result.exit_code == 2 and "p.yaml not found" in " ".join(result.output.split())
    (tmp_path / "p.yaml").write_text("{}\n")
    result = CliRunner().invoke(app, ["loop", "-p", str(tmp_path / "p.yaml"), "-w", str(tmp_path),
                                      "--set", "train.lr=-1", "--set", "optimize.kep=3"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "optimize.kep" in said and "valid keys here" in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


@pytest.mark.parametrize("key", ["generate.sink", "optimize.sink", "feedback.store"])
def test_credentials_in_an_s3_uri_are_refused_and_never_echoed(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(None, [f"{key}=s3://AKIAFAKE:s3cr3t-value@bucket/prefix"])
    msg = str(info.value)
    assert key in msg and "must not carry credentials" in msg
    assert "s3cr3t-value" not in msg and "AKIAFAKE" not in msg
