"""Run safety: the run lock, orphaned temporaries, misspelt options, run fingerprints, checked
checkpoint loading, TensorBoard after a resume, and one-line input errors from worker processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser

from custom_components import errors
from custom_components.handlers.checkpoint import ModelLoader, TrainingCheckpoint
from custom_components.handlers.console import iteration_log
from custom_components.handlers.tensorboard_maps import mark_restart
from custom_components.io import (
    InputDataError,
    atomic_save,
    load_network_weights,
    remove_stale_temporaries,
)
from custom_components.runs import (
    RunLockedError,
    UnknownOptionError,
    acquire_run_lock,
    boolean_overrides,
    bundle_run_arguments,
    check_override_ids,
    describe_differences,
    fingerprint_differences,
    flatten_config,
    release_run_lock,
)

REPO = Path(__file__).resolve().parents[1]
BRATS = REPO / "bundles" / "lgmvit_brats20" / "configs"
MONAI_MAIN = str(Path(ConfigParser.__module__.replace(".", "/")).parent / "__main__.py")  # .../monai/bundle/__main__.py


# ---------------------------------------------------------------- run lock


def _hold_lock_in_subprocess(folder: Path) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from custom_components.runs import acquire_run_lock
        acquire_run_lock({str(folder)!r})
        print("locked", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=dict(os.environ, RANK="0"))
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    holder = _hold_lock_in_subprocess(tmp_path)
    try:
        with pytest.raises(RunLockedError) as err:
            acquire_run_lock(tmp_path)
        message = str(err.value)
        assert f"PID {holder.pid}" in message and "another run is using this folder" in message
        assert "\n" not in message
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the killed holder's lock: the folder is taken over
    assert acquire_run_lock(tmp_path) == tmp_path.resolve() / ".run.lock"
    assert acquire_run_lock(tmp_path) is not None  # re-entrant within one process
    release_run_lock(tmp_path)


def test_non_zero_ranks_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert acquire_run_lock(tmp_path) is None
    assert not (tmp_path / ".run.lock").exists()


def test_released_lock_can_be_taken_by_another_process(tmp_path):
    acquire_run_lock(tmp_path)
    release_run_lock(tmp_path)
    holder = _hold_lock_in_subprocess(tmp_path)
    holder.kill()
    holder.wait()


def test_orphaned_temporaries_of_atomic_writes_are_removed(tmp_path):
    atomic_save({"a": 1}, tmp_path / "last.pt")
    orphans = [tmp_path / ".last.pt.x1y2z3w4.tmp", tmp_path / ".case.npy.abcdefgh.tmp.npy"]
    keep = [tmp_path / "last.pt", tmp_path / ".run.lock", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in orphans + keep[1:]:
        p.write_text("x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(orphans)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in orphans)


# ---------------------------------------------------------------- misspelt options


def test_bundle_run_command_line_is_parsed_as_fire_does():
    argv = [MONAI_MAIN, "run", "training", "--config_file", "['a.json','b.json']", "--num_epochs", "2",
            "--learning-rate=0.5", "--network_def#patch_size", "8", "--amp", "--seed", "-1"]  # fmt: skip
    files, overrides = bundle_run_arguments(argv)
    assert files == ["a.json", "b.json"]
    assert overrides == {"num_epochs": 2, "learning_rate": 0.5, "network_def#patch_size": 8, "amp": True, "seed": -1}
    assert bundle_run_arguments(["pytest", "run", "x"]) is None


def test_true_false_strings_become_booleans_for_boolean_options():
    files = [BRATS / "train.json", BRATS / "demo.json"]
    overrides = {"resume": "false", "amp": "TRUE", "force_resume": False, "dataset_dir": "false", "num_epochs": 2}
    assert boolean_overrides(files, overrides) == {"resume": False, "amp": True}


def test_unknown_top_level_option_is_refused_with_a_suggestion():
    files = [BRATS / "train.json", BRATS / "demo.json"]
    with pytest.raises(UnknownOptionError) as err:
        check_override_ids(files, ["num_epochs", "num_epoch"])
    assert str(err.value).startswith("--num_epoch: unknown option") and "did you mean --num_epochs?" in str(err.value)
    # known keys, nested ids under a known key (new component arguments) and metadata pass
    check_override_ids(files, ["num_epochs", "network_def#dropout_rate", "_meta_#version", "train#handlers#0#print_lr"])
    with pytest.raises(UnknownOptionError, match=r"see configs/train.json"):
        check_override_ids(files, ["zzzz"])


# ---------------------------------------------------------------- fingerprints


def _fingerprint_of(config: dict, **overrides) -> dict:
    parser = ConfigParser(dict(config, fp={"_target_": "custom_components.runs.run_fingerprint", "data_files": "@data_files"}))
    for k, v in overrides.items():
        parser[k] = v
    return parser.get_parsed_content("fp")


def test_fingerprint_is_the_merged_config_without_operational_ids(tmp_path):
    split = tmp_path / "datalist.json"
    split.write_text('{"training": ["a"]}')
    config = {"learning_rate": 1e-5, "device": "cpu", "num_workers": 4, "data_files": [str(split)],
              "train": {"iteration": {"_target_": "GuidedIteration", "weight": "@lambda"}}}  # fmt: skip
    fp = _fingerprint_of(config)
    assert fp["learning_rate"] == 1e-5 and fp["train#iteration#_target_"] == "GuidedIteration"
    assert "device" not in fp and "num_workers" not in fp
    assert len(fp["data#datalist.json"]) == 64
    # an override on the command line (parser update) is part of it; a new split changes it
    changed = _fingerprint_of(config, learning_rate=0.5, **{"train#iteration": {"_target_": "GuidedIteration"}})
    split.write_text('{"training": ["b"]}')
    changed["data#datalist.json"] = _fingerprint_of(config)["data#datalist.json"]
    diffs = fingerprint_differences(fp, changed)
    assert [d[0] for d in diffs] == ["data#datalist.json", "learning_rate", "train#iteration#weight"]
    text = describe_differences(diffs, most=2)
    assert "learning_rate: 1e-05 -> 0.5" in text and text.endswith("and 1 more")
    assert flatten_config({"a": {"b": [1, {"c": 2}], "e": []}}) == {"a#b#0": 1, "a#b#1#c": 2, "a#e": []}


class _Counter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))


def _run_checkpointed(ckpt_dir: Path, epochs: int, fingerprint: dict, **kwargs) -> Engine:
    net = _Counter()
    engine = Engine(lambda e, b: net.w.data.add_(1.0))
    TrainingCheckpoint(str(ckpt_dir), {"network": net}, fingerprint=fingerprint, **kwargs).attach(engine)
    engine.run([0, 1], max_epochs=epochs)
    return engine


def test_resume_with_other_settings_is_refused_unless_forced(tmp_path, caplog):
    _run_checkpointed(tmp_path, 1, {"learning_rate": 1e-5, "seed": 42})
    with pytest.raises(InputDataError) as err:
        _run_checkpointed(tmp_path, 2, {"learning_rate": 0.5, "seed": 42})
    assert "learning_rate: 1e-05 -> 0.5" in str(err.value) and "--force_resume true" in str(err.value)
    assert "--resume false" in str(err.value)
    with caplog.at_level(logging.WARNING):
        engine = _run_checkpointed(tmp_path, 2, {"learning_rate": 0.5, "seed": 42}, force_resume=True)
    assert engine.state.iteration == 4 and "resuming with other settings" in caplog.text
    # the forced run's checkpoint carries the new settings: resuming with them is no longer refused
    _run_checkpointed(tmp_path, 3, {"learning_rate": 0.5, "seed": 42})


def test_same_settings_resume_and_old_checkpoints_warn(tmp_path, caplog):
    engine = _run_checkpointed(tmp_path, 1, {"lr": 1})
    assert _run_checkpointed(tmp_path, 2, {"lr": 1}).state.iteration == 2 * engine.state.iteration
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    del state["fingerprint"]
    torch.save(state, tmp_path / "last.pt")
    with caplog.at_level(logging.WARNING):
        _run_checkpointed(tmp_path, 3, {"lr": 1})
    assert "no run fingerprint" in caplog.text


def test_truncated_resume_checkpoint_is_one_line(tmp_path):
    _run_checkpointed(tmp_path, 1, {"lr": 1})
    data = (tmp_path / "last.pt").read_bytes()
    (tmp_path / "last.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputDataError) as err:
        _run_checkpointed(tmp_path, 2, {"lr": 1})
    assert str(tmp_path / "last.pt") in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- trained-weight loading


def test_model_loading_names_the_file_and_the_problem(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = tmp_path / "model.pt"
    torch.save(net.state_dict(), good)
    other = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(InputDataError, match=r"3 tensors differ in shape \(0.weight: file \[3, 4\] vs network \[5, 4\]"):
        load_network_weights(other, good)
    with pytest.raises(InputDataError, match="trained weights not found: run the training workflow first"):
        load_network_weights(net, tmp_path / "absent.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(InputDataError, match=r"truncated.pt: cannot load checkpoint"):
        load_network_weights(net, truncated)
    torch.save({"network": net.state_dict(), "trainer": {}}, tmp_path / "last.pt")  # a resumable checkpoint works too
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    load_network_weights(fresh, tmp_path / "last.pt")
    assert torch.equal(fresh[0].weight, net[0].weight)
    # as an engine handler (evaluation, inference): loads when the engine starts
    engine = Engine(lambda e, b: None)
    loaded = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ModelLoader(str(good), loaded).attach(engine)
    engine.run([0])
    assert torch.equal(loaded[1].bias, net[1].bias)


# ---------------------------------------------------------------- TensorBoard after a resume


def test_restart_marker_hides_the_repeated_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    first = SummaryWriter(log_dir=str(tmp_path))
    for step in range(1, 11):  # killed after step 10; its checkpoint was at step 6
        first.add_scalar("train_loss", 100.0 + step, step)
    first.close()
    time.sleep(1.1)  # event file names carry the second: a distinct second file
    resumed = SummaryWriter(log_dir=str(tmp_path))
    mark_restart(resumed, 7)
    for step in range(7, 13):
        resumed.add_scalar("train_loss", float(step), step)
    resumed.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("train_loss")
    assert [e.step for e in events] == list(range(1, 13))
    assert [e.value for e in events] == [101.0 + i for i in range(6)] + [float(s) for s in range(7, 13)]


# ---------------------------------------------------------------- one line, also from workers and logs


class _BrokenImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise InputDataError("/data/images/b.jpg", "image file is truncated (12 bytes not processed)")


def test_input_error_from_a_dataloader_worker_stays_one_line():
    loader = torch.utils.data.DataLoader(_BrokenImages(), num_workers=1)
    with pytest.raises(InputDataError) as err:
        next(iter(loader))
    assert str(err.value) == "/data/images/b.jpg: image file is truncated (12 bytes not processed)"
    assert err.value.source == "/data/images/b.jpg"


def test_logged_tracebacks_of_input_errors_are_dropped():
    logger = logging.getLogger("test_run_safety.handler")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        errors.install()
        for exc in (InputDataError("a.pt", "bad"), RuntimeError("other")):
            try:
                try:
                    raise exc
                except Exception as inner:
                    raise RuntimeError("Failed to evaluate") from inner
            except RuntimeError as e:
                logger.exception("Exception: %s", e.args[0])
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Exception: Failed to evaluate"]
    assert records[0].exc_info[1].__cause__.args == ("other",)


def test_loggers_made_after_install_drop_input_error_tracebacks_too(capsys):
    """MONAI's StatsHandler makes its own stdout logger when the workflow is built, after install()."""
    from monai.apps.utils import get_logger

    errors.install()
    logger = get_logger(f"test_run_safety.late.{time.time_ns()}")
    for exc in (InputDataError("a.pt", "bad"), RuntimeError("other")):
        try:
            raise exc
        except Exception as e:
            logger.exception("Exception: %s", e.args[0])
    out = capsys.readouterr().out
    assert "Exception: other" in out and "Traceback" in out
    assert "a.pt" not in out


def test_iteration_log_filter():
    assert iteration_log(0) is False and iteration_log(-1) is False
    every = iteration_log(50)
    assert [every(None, i) for i in (1, 49, 50, 100, 101)] == [False, False, True, True, False]


# ---------------------------------------------------------------- export behind the same checks


def test_export_checks_the_checkpoint_and_options_before_monai_exports(tmp_path, monkeypatch):
    from custom_components.export import export

    monkeypatch.chdir(BRATS.parent)
    configs = "['configs/train.json','configs/demo.json']"
    tiny = {"image_size": 32, "network_def#patch_size": 8}
    parser = ConfigParser()
    parser.read_config([str(BRATS / "train.json"), str(BRATS / "demo.json")])
    parser.update(tiny)
    net = parser.get_parsed_content("network_def")
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(InputDataError, match="weights do not fit the configured network"):
        export(configs, str(ckpt), str(tmp_path / "a.ts"), **tiny, **{"network_def#mlp_dim": 64})
    with pytest.raises(UnknownOptionError, match="did you mean --image_size"):
        export(configs, str(ckpt), str(tmp_path / "a.ts"), image_sise=32)
    assert not (tmp_path / "a.ts").exists()
    out = export(configs, str(ckpt), str(tmp_path / "model.ts"), **tiny)
    scripted = torch.jit.load(out)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(scripted(x), net.eval()(x), atol=1e-5)


def test_a_training_without_any_batch_is_refused(tmp_path):
    from monai.engines import SupervisedTrainer

    net = torch.nn.Linear(2, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(3, 2)), batch_size=4, drop_last=True)
    handler = TrainingCheckpoint(str(tmp_path), {"network": net})
    with pytest.raises(InputDataError, match=r"yields no batch \(3 samples, batch size 4\)"):
        SupervisedTrainer(device="cpu", max_epochs=1, train_data_loader=loader, network=net,
                          optimizer=torch.optim.SGD(net.parameters(), 0.1), loss_function=torch.nn.MSELoss(),
                          train_handlers=[handler])  # fmt: skip
