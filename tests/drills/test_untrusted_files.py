"""Untrusted model files: every torch file genloop loads is read with weights_only=True.

Each test plants a malicious pickle (an object whose unpickling creates a marker file) where
genloop expects one of its own files, runs the real code path that loads it, and checks that
the marker was not created and that the error names the file and says it is not a plain
tensor/state-dict file. A positive control proves each payload does run when unpickled
unsafely, so a test cannot pass on a harmless file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import pickle
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from genloop.core.config import load_params
from genloop.core.dataset import load_split
from genloop.core.errors import GenloopError
from genloop.core.manifest import corpus_mode
from genloop.core.storage import join_s3_uri, sha256_file, upload_dir
from genloop.core.workspace import Workspace
from genloop.eval.extractors import domain_extractor
from genloop.eval.generator_eval import asked_classes, eval_key, evaluate_generator
from genloop.eval.reference import load_reference
from genloop.mlops import tracking
from genloop.models import family, load_generator, load_torch_file, sample, save_generator
from genloop.stages import clean, collect, evaluate, generate, train
from tests.helpers import TINY, cli_env, make_workspace

SETTINGS = [*TINY, "collect.sources=[{uri: 'builtin:mnist', limit: 150}]", "collect.dvc_add=false",
            "train.threads=1", "evaluate.n_samples=20"]


class _Touch:
    """Unpickling this creates `marker` (pathlib.Path.touch)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class _System:
    """Unpickling this runs a shell command that creates `marker` (os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch '{self.marker}'",))


def _payloads(marker: Path) -> dict[str, Any]:
    """(name, writer) of each malicious file: torch.save'd zips and a legacy plain pickle."""
    return {
        "torch.save(Path.touch in a state dict)": lambda p: torch.save({"weight": _Touch(marker)}, p),
        "torch.save(os.system)": lambda p: torch.save(_System(marker), p),
        "pickle.dump(os.system)": lambda p: p.write_bytes(pickle.dumps({"weight": _System(marker)})),
    }


PAYLOADS = list(_payloads(Path("x")))


def _plant(kind: str, path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _payloads(marker)[kind](path)


def _assert_refused(info: pytest.ExceptionInfo[GenloopError], path: Path, marker: Path) -> None:
    msg = str(info.value)
    assert not marker.exists(), f"unpickling {path} ran code"
    assert str(path) in msg, msg
    assert "not a plain tensor/state-dict file" in msg, msg
    assert "weights_only` set to `False`" not in msg and "weights_only=False" not in msg  # no unsafe advice


@pytest.mark.parametrize("kind", PAYLOADS)
def test_the_payloads_do_run_code_when_unpickled_unsafely(kind: str, tmp_path: Path) -> None:
    """The positive control: each malicious file really creates its marker under weights_only=False."""
    marker = tmp_path / "pwned"
    _plant(kind, tmp_path / "evil.pt", marker)
    assert not marker.exists()
    try:
        torch.load(tmp_path / "evil.pt", weights_only=False)
    except Exception:
        pass  # the payload ran while the object was rebuilt; what it returns does not matter
    assert marker.exists()


@pytest.mark.parametrize("kind", PAYLOADS)
def test_load_torch_file_refuses_a_pickled_object_naming_the_file(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _plant(kind, path, marker)
    with pytest.raises(GenloopError) as info:
        load_torch_file(path, "test file")
    _assert_refused(info, path, marker)


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04truncated zip"])
def test_a_corrupt_or_empty_file_is_a_clear_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(GenloopError, match="not a plain tensor/state-dict file") as info:
        load_torch_file(path, "test file", fix="Delete it.")
    assert str(path) in str(info.value) and "Delete it." in str(info.value)


def test_a_plain_file_of_the_wrong_shape_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(GenloopError, match="holds a list, not a dict of tensors"):
        load_torch_file(path, "test file")
    torch.save({"holdout": torch.zeros(2)}, path)
    with pytest.raises(GenloopError, match="lacks train"):
        load_torch_file(path, "test file", keys=("holdout", "train"))


# ---------------------------------------------------------------- the real loading code paths


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Workspace, Any]]:
    """A workspace with clean data and a legitimate (untrained) generator; tests work on copies."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
            mp.delenv(var, raising=False)
        ws = Workspace.at(tmp_path_factory.mktemp("untrusted"))
        cfg = load_params(None, SETTINGS)
        collect.run(cfg, ws)
        clean.run(cfg, ws)
        # what `genloop train` would build
        spec = train._spec(cfg, load_split(ws, "train"), corpus_mode(ws.manifest))
        save_generator(family(spec.family).build_generator(spec), spec, ws.generator)
        yield ws, cfg


def _workspace_copy(prepared: tuple[Workspace, Any], dest: Path) -> tuple[Workspace, Any]:
    ws, cfg = prepared
    shutil.copytree(ws.root, dest)
    return Workspace.at(dest), cfg


def test_a_malicious_generator_pt_is_refused_by_evaluate(prepared: tuple, tmp_path: Path) -> None:
    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    marker = tmp_path / "pwned"
    for kind in PAYLOADS:
        _plant(kind, ws.generator, marker)
        with pytest.raises(GenloopError) as info:
            evaluate.run(cfg, ws)
        _assert_refused(info, ws.generator, marker)
        assert "genloop train" in str(info.value)
        with pytest.raises(GenloopError) as info:
            load_generator(ws.generator)
        _assert_refused(info, ws.generator, marker)
    assert not ws.report("eval").exists()


def test_a_malicious_training_checkpoint_is_refused_on_resume(prepared: tuple, tmp_path: Path) -> None:
    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    marker = tmp_path / "pwned"
    last = train.checkpoint_dir(cfg, ws) / "last.pt"
    for kind in PAYLOADS:
        _plant(kind, last, marker)
        with pytest.raises(GenloopError) as info:
            train.run(cfg, ws)
        _assert_refused(info, last, marker)
        assert "train.resume=never" in str(info.value)
    assert not ws.report("train").exists()


def test_malicious_evaluation_caches_are_refused(
    prepared: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _shared_judges: Path
) -> None:
    """The cached extractor and reference statistics (the judge cache) and the evaluation (.genloop/cache/)."""
    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    # the payloads go into a private copy of the session's judge cache, never the one other tests read
    monkeypatch.setenv("GENLOOP_JUDGE_CACHE", str(shutil.copytree(_shared_judges, tmp_path / "judges")))
    marker = tmp_path / "pwned"
    extractor = domain_extractor(cfg, ws)  # legitimate entries first, to learn their paths
    ref, _ = load_reference(cfg, ws, extractor)
    generator, spec = load_generator(ws.generator)
    sha = sha256_file(ws.generator)
    asked = lambda n: asked_classes(spec, n)  # noqa: E731  (as evaluate asks: class consistency is part of the key)
    evaluate_generator(cfg, ws, lambda n, seed: sample(generator, spec, n, seed), sha, extractor, ref, asked=asked)
    eval_path = ws.cache / "evals" / f"{eval_key(cfg, sha, ref, asked=True)}.pt"
    ref_path = ws.judge_cache / "reference" / f"{ref.key}.pt"
    assert extractor.path.exists() and ref_path.exists() and eval_path.exists()
    tried = 0
    for path in (eval_path, ref_path, extractor.path):
        good = path.read_bytes()
        for kind in PAYLOADS:
            _plant(kind, path, marker)
            with pytest.raises(GenloopError) as info:
                evaluate.run(cfg, ws)
            _assert_refused(info, path, marker)
            assert "Delete it" in str(info.value)
            tried += 1
        path.write_bytes(good)
    assert tried == 9
    # the legitimate files still load, from the cache
    assert domain_extractor(cfg, ws).fingerprint == extractor.fingerprint
    assert load_reference(cfg, ws, extractor)[0].cached
    assert evaluate_generator(cfg, ws, None, sha, extractor, ref, asked=asked).cached  # type: ignore[arg-type]
    assert not ws.report("eval").exists()


def test_a_registered_pyfunc_model_with_malicious_weights_is_refused(
    prepared: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The weights artifact of an MLflow pyfunc model (registry, `generate` and the gate load it)."""
    import mlflow

    from genloop.stages.register import PYFUNC_CODE

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    marker = tmp_path / "pwned"
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    shutil.copy(ws.generator.with_suffix(".json"), artifacts / "generator.json")
    _plant(PAYLOADS[0], artifacts / "generator.pt", marker)
    name = cfg.registry.model_name
    tracking.configure(ws, cfg)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="generator", python_model=str(PYFUNC_CODE), registered_model_name=name,
            artifacts={"weights": str(artifacts / "generator.pt"), "spec": str(artifacts / "generator.json")},
            pip_requirements=["torch"],
        )
    version = str(info.registered_model_version)
    tracking.set_alias(name, "champion", version)
    for load in (lambda: tracking.load_model(name, version), lambda: generate.run(cfg, ws)):
        with pytest.raises(GenloopError) as raised:
            load()
        assert not marker.exists()
        msg = str(raised.value)
        assert "generator.pt" in msg and "not a plain tensor/state-dict file" in msg, msg
    assert not ws.generated.exists()


def _prefect_store(ws: Workspace) -> Any:
    """Prefect's result store laid out as flows.run_stage configures it (JSON results + records)."""
    from prefect.filesystems import LocalFileSystem
    from prefect.results import ResultStore
    from prefect.serializers import JSONSerializer

    from genloop.orchestrate import cache_policy

    store = cache_policy.results_dir(ws)
    return ResultStore(result_storage=LocalFileSystem(basepath=str(store / "results")),
                       metadata_storage=LocalFileSystem(basepath=str(store / "records")), serializer=JSONSerializer())


def test_tampered_prefect_cache_records_are_never_read_back(prepared: tuple, tmp_path: Path) -> None:
    """Prefect reads a cached stage result with the serializer its stored record names: a record
    naming pickle, or JSON with another object hook, runs code on a cache hit. outputs_intact()
    (False makes the flow refresh the cache, i.e. run the stage instead of reading the record)
    accepts the records Prefect writes and refuses every tampered one."""
    from genloop.orchestrate import cache_policy

    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    marker = tmp_path / "pwned"
    key = cache_policy.stage_key("clean", cfg, ws)
    cache_policy.write_stamp("clean", key, ws)
    assert cache_policy.outputs_intact("clean", key, ws)  # nothing cached yet
    _prefect_store(ws).write(obj={"kept": 120, "folder": Path("data/clean")}, key=key)  # what a real run leaves
    records, results = cache_policy.results_dir(ws) / "records", cache_policy.results_dir(ws) / "results"
    good = json.loads((records / key).read_text())
    assert good["serializer"]["type"] == "json" and (results / key).is_file()
    assert cache_policy.outputs_intact("clean", key, ws)
    good_result = (results / key).read_bytes()

    # the positive control: Prefect itself runs the payload of a tampered JSON record
    hook = {**good, "serializer": {**good["serializer"], "object_decoder": "subprocess.run"}}
    (records / key).write_text(json.dumps(hook))
    (results / key).write_text(json.dumps({"touch": 1, str(tmp_path / "control"): 2}))
    _prefect_store(ws).read(key)  # a fresh store: nothing cached in memory
    assert (tmp_path / "control").exists()

    evil_pickle = pickle.dumps(_System(marker))
    evil_json = json.dumps({"touch": 1, str(marker): 2}).encode()
    tampered = {
        "pickle serializer": ({**good, "serializer": {"type": "pickle", "picklelib": "cloudpickle"}}, evil_pickle),
        "compressed pickle": ({**good, "serializer": {"type": "compressed/pickle"}}, evil_pickle),
        "subprocess.run as JSON object hook": (hook, evil_json),
        "another JSON library": ({**good, "serializer": {**good["serializer"], "jsonlib": "jsonpickle"}}, evil_json),
        "result stored elsewhere": ({**good, "storage_key": str(tmp_path / "elsewhere")}, good_result),
        "result rebuilding an arbitrary class": (good, json.dumps({"__class__": "os.system", "data": "x"}).encode()),
        "record that is not JSON": (evil_pickle, good_result),
    }
    for name, (record, result) in tampered.items():
        (records / key).write_bytes(record if isinstance(record, bytes) else json.dumps(record).encode())
        (results / key).write_bytes(result)
        assert not cache_policy.outputs_intact("clean", key, ws), name
    assert not marker.exists()
    (records / key).write_text(json.dumps(good))
    (results / key).write_bytes(good_result)
    assert cache_policy.outputs_intact("clean", key, ws)


def test_a_real_loop_runs_a_stage_again_instead_of_reading_its_tampered_cache_record(
        tmp_path: Path, genloop_loop: Callable, prefect_api: str) -> None:
    """The same guard through `genloop loop` (a real Prefect flow): between two loops over unchanged
    data and params, clean's cache record is made to name the pickle serializer (its result a
    pickle that runs a shell command) and validate's to decode its JSON with subprocess.run. The
    second loop runs both stages instead of reading those records, runs no payload, and still takes
    train and evaluate from the cache; Prefect itself, given the same records, runs the payloads."""
    from genloop.orchestrate import cache_policy

    (tmp_path / "ws").mkdir()
    ws = Workspace.at(make_workspace(tmp_path / "ws"))
    env = cli_env(ws.root, PREFECT_API_URL=prefect_api)
    first = genloop_loop(ws.root, env)
    assert "skipped:    nothing" in first.stdout
    cfg = load_params(ws.root / "params.yaml")
    keys = {stage: cache_policy.stage_key(stage, cfg, ws) for stage in ("clean", "validate")}
    records, results = cache_policy.results_dir(ws) / "records", cache_policy.results_dir(ws) / "results"
    marker = tmp_path / "pwned"

    def tamper(marker: Path) -> None:
        good = {stage: json.loads((records / key).read_text()) for stage, key in keys.items()}
        assert [g["serializer"]["type"] for g in good.values()] == ["json", "json"]  # what the first loop wrote
        (records / keys["clean"]).write_text(json.dumps({**good["clean"], "serializer": {"type": "pickle",
                                                                                         "picklelib": "pickle"}}))
        # as Prefect's PickleSerializer writes a result: a base64-wrapped pickle
        (results / keys["clean"]).write_bytes(base64.encodebytes(pickle.dumps(_System(marker.with_suffix(".pickle")))))
        hook = {**good["validate"]["serializer"], "object_decoder": "subprocess.run"}
        (records / keys["validate"]).write_text(json.dumps({**good["validate"], "serializer": hook}))
        (results / keys["validate"]).write_text(json.dumps({"touch": 1, str(marker.with_suffix(".json")): 2}))

    tamper(marker)
    second = genloop_loop(ws.root, env)
    assert not list(tmp_path.glob("pwned*")), "a tampered cache record was deserialised"
    # the inputs and params did not change (the same keys): only the tampered stages ran again
    assert {stage: cache_policy.stage_key(stage, cfg, ws) for stage in keys} == keys
    assert "skipped:    train, evaluate (unchanged inputs and params)" in second.stdout
    # the warnings naming each refused record (the console wraps long lines: compared without whitespace)
    logged = "".join((second.stdout + second.stderr).split())
    warned = [line for line in second.stderr.splitlines() if "cached" in line]
    for stage, why in (("clean", "it names serializer 'pickle'"), ("validate", "it changes how its JSON is decoded")):
        expected = f"not using the cached result of {records / keys[stage]}: {why}"
        assert "".join(expected.split()) in logged, (expected, warned)
    # the control: Prefect's own result store, reading the same records, runs both payloads
    control = tmp_path / "control"
    tamper(control)
    for stage in keys:
        with contextlib.suppress(Exception):  # the payloads run while the result is being rebuilt
            _prefect_store(ws).read(keys[stage])
    assert sorted(p.name for p in tmp_path.glob("control*")) == ["control.json", "control.pickle"]


# ---------------------------------------------------------------- S3 keys genloop builds

BAD_PARTS = ["..", "../other-prefix", "7/../../escape", "/etc/passwd", "/7", "a\\..\\..\\b", "..\\escape", "",
             "a//b", ".", "./7", "7\nx", "7\x00"]


@pytest.mark.parametrize("part", BAD_PARTS)
def test_join_s3_uri_refuses_a_segment_that_could_leave_the_prefix(part: str) -> None:
    with pytest.raises(GenloopError) as info:
        join_s3_uri("s3://bucket/runs/generated", part)
    msg = str(info.value)
    assert repr(part) in msg and "s3://bucket/runs/generated" in msg, msg


@pytest.mark.parametrize("base", ["s3://bucket/runs/../other", "s3://bucket/a\\..\\b", "s3://bucket/a/./b"])
def test_join_s3_uri_refuses_a_base_prefix_with_relative_steps(base: str) -> None:
    with pytest.raises(GenloopError, match="not usable"):
        join_s3_uri(base, "7")


def test_join_s3_uri_keeps_plain_segments_under_the_prefix() -> None:
    assert join_s3_uri("s3://bucket/runs/curated/", "7") == "s3://bucket/runs/curated/7"
    assert join_s3_uri("s3://bucket", "7/") == "s3://bucket/7"
    assert join_s3_uri("s3://b/fb", "records/2024-01-02/20240102T000000Z-ab.json") == (
        "s3://b/fb/records/2024-01-02/20240102T000000Z-ab.json")
    assert join_s3_uri("s3://b/x", "v1.2", "grid.png") == "s3://b/x/v1.2/grid.png"  # dots inside a name are fine


@pytest.mark.parametrize("name", ["a\\..\\..\\escape.png", "bad\nname.png", "sub\\x.png"])
def test_upload_dir_refuses_a_file_name_that_could_leave_the_prefix_before_any_request(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from genloop.core.errors import SinkError, Unreachable

    # nothing listens there: an upload attempt would fail as SinkUnreachable, not as SinkError
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    batch = tmp_path / "7"
    batch.mkdir()
    (batch / "000000.png").write_bytes(b"png")
    (batch / name).write_bytes(b"png")
    with pytest.raises(SinkError) as info:
        upload_dir(batch, "s3://bucket/runs/generated/7")
    assert not isinstance(info.value, Unreachable)
    assert repr(name) in str(info.value) and "nothing was uploaded" in str(info.value)


def test_upload_dir_refuses_a_prefix_with_relative_steps(tmp_path: Path) -> None:
    from genloop.core.errors import SinkError

    (tmp_path / "7").mkdir()
    with pytest.raises(SinkError, match="not usable: segment '..'"):
        upload_dir(tmp_path / "7", "s3://bucket/runs/../7")


MALICIOUS_CODE = """
import pathlib
pathlib.Path({marker!r}).touch()  # runs if anyone executes the model's stored code
import mlflow
from mlflow.pyfunc import PythonModel


class Evil(PythonModel):
    def predict(self, context, model_input, params=None):
        pathlib.Path({marker!r}).touch()
        return []


mlflow.models.set_model(Evil())
"""


def test_the_model_code_stored_in_the_registry_is_never_run(
    prepared: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loading a registered generator (generate, the gate) uses genloop's installed code and only the
    weights artifact: a model whose stored Python file was replaced runs nothing."""
    import mlflow

    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "GENLOOP_PARENT_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    ws, cfg = _workspace_copy(prepared, tmp_path / "ws")
    marker = tmp_path / "pwned-by-code"
    code = tmp_path / "evil_model.py"
    code.write_text(MALICIOUS_CODE.format(marker=str(marker)))
    name = cfg.registry.model_name
    tracking.configure(ws, cfg)
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="generator", python_model=str(code), registered_model_name=name,
            artifacts={"weights": str(ws.generator), "spec": str(ws.generator.with_suffix(".json"))},
            pip_requirements=["torch"],
        )
    marker.unlink(missing_ok=True)  # log_model itself imports the file once, in this test's process
    version = str(info.registered_model_version)
    tracking.set_alias(name, "champion", version)
    model = tracking.load_model(name, version)
    images = model.predict(pd.DataFrame({"n": [4], "seed": [0]}))
    assert images.shape[0] == 4 and images.dtype == np.uint8
    assert tracking.load_model(name, "@champion").unwrap_python_model().spec == model.unwrap_python_model().spec
    summary = generate.run(cfg, ws)
    assert summary["n"] == cfg.generate.n and summary["model_version"] == version
    assert not marker.exists()
    # the control: MLflow's own loader does run the stored code
    mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    assert marker.exists()
