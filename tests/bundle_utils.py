"""Helpers to run bundles in subprocesses from the tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "data" / "schemas" / "meta_schema_20240725.json"
# A tiny network and images so that each run takes seconds on 2 CPU cores.
TINY = ["--image_size", "32", "--network_def#patch_size", "8", "--blur_kernel_size", "7", "--batch_size", "16"]


def config_arg(*configs: str) -> str:
    return "[" + ",".join(f"'{c}'" for c in configs) + "]"


def bundle_cmd(run_id: str, bundle_root: Path, dataset_dir: Path, *extra_configs: str, args=()) -> list[str]:
    """``python -m monai.bundle run <run_id>`` with train.json + demo.json + ``extra_configs``, tiny settings."""
    return [
        sys.executable, "-m", "monai.bundle", "run", run_id,
        "--config_file", config_arg("configs/train.json", "configs/demo.json", *extra_configs),
        "--bundle_root", str(bundle_root),
        "--dataset_dir", str(dataset_dir),
        *TINY, *args,
    ]  # fmt: skip


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def run(cmd: list[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def kill_once_checkpointed(cmd: list[str], cwd: Path, last: Path, epochs: int, timeout: float = 240) -> dict:
    """Start a training, SIGKILL it as soon as its resumable checkpoint ``last`` exists; return that checkpoint.

    Asserts that the checkpoint survived the kill intact (it loads) and that the run was stopped before
    its last epoch, so that a rerun of ``cmd`` has something to resume.
    """
    from custom_components.io import load_checkpoint

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    deadline = time.time() + timeout
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = load_checkpoint(last)
    assert 1 <= killed["trainer"]["epoch"] < epochs, "the run finished before it could be interrupted"
    return killed


def torchrun_trains_one_epoch(command: list[str], cwd: Path, models: Path, log_dir: Path, port: int) -> None:
    """Run a 1-epoch ``python -m monai.bundle run training ...`` ``command`` under torchrun with 2 CPU
    processes: the best and the resumable checkpoint exist, and TensorBoard is written by rank 0 only."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port), "-m"]
    run(launch + command[2:], cwd=cwd)
    from custom_components.io import load_checkpoint

    assert (models / "model.pt").is_file()
    assert load_checkpoint(models / "last.pt")["trainer"]["epoch"] == 1
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1


def resumes_after_kill(command: list[str], cwd: Path, last: Path, epochs: int) -> tuple[dict, dict]:
    """Kill the training ``command`` once ``last`` exists, rerun it; returns (killed, final) checkpoints.

    The rerun must say it resumed at the killed epoch and end with every epoch run exactly once.
    """
    from custom_components.io import load_checkpoint

    killed = kill_once_checkpointed(command, cwd, last, epochs)
    resumed = run(command, cwd=cwd)
    log = resumed.stdout + resumed.stderr
    assert "resumed from" in log and f"at epoch {killed['trainer']['epoch']}" in log
    final = load_checkpoint(last)
    assert final["trainer"]["epoch"] == epochs
    # no epoch was repeated or skipped: the iteration count is exactly epochs * epoch length
    assert final["trainer"]["iteration"] == epochs * final["trainer"]["epoch_length"]
    return killed, final


def verify_bundle(bundle: Path, monkeypatch, config_file: str = "configs/train.json") -> None:
    """``monai.bundle verify_metadata`` (when the shared schema is present) and ``verify_net_in_out network_def``.

    The same functions ``python -m monai.bundle verify_*`` runs, called in this process from the
    bundle folder: a subprocess per call spends ~9 s importing MONAI; the CLI path itself is covered
    by every bundle's run/pack tests.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    monkeypatch.chdir(bundle)
    if SCHEMA.is_file():
        verify_metadata(meta_file="configs/metadata.json", filepath=str(SCHEMA))
    verify_net_in_out("network_def", meta_file="configs/metadata.json", config_file=config_file, device="cpu")


# --- commands in forked interpreters ------------------------------------------------------------
# A ``python -m monai.bundle ...`` process spends ~3-4 s of its ~4-5 s on a tiny twin importing torch,
# MONAI and ignite. ``ForkedPython`` starts one interpreter that imports them once (and runs no
# torch op, so no thread exists yet) and forks it for each command: the child changes to the
# command's folder, points its stdout/stderr at files, and runs the module (``runpy``, as ``-m``
# does, with ``sys.argv[0]`` the module's ``__main__.py``) or the script with the command's
# arguments. Exit status as for a fresh interpreter: ``SystemExit``'s code, else ``sys.excepthook``
# (the bundles' one-line error hook exits with 2 itself) and 1. Linux only (``os.fork``).

PRELOAD = (
    "torch", "monai.bundle.scripts", "monai.engines", "monai.handlers", "monai.transforms", "ignite.engine", "fire",
    "custom_components.networks", "custom_components.runs", "custom_components.handlers", "custom_components.engines",
)  # fmt: skip


def _forked_child(argv: list[str], cwd: str, out: str, err: str) -> None:
    import atexit
    import runpy

    code = 1
    try:
        os.setpgid(0, 0)  # the parent kills the whole group on a timeout
        os.chdir(cwd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path[0] = cwd
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                script = os.path.abspath(argv[0])
                sys.argv = [script, *argv[1:]]
                sys.path[0] = os.path.dirname(script)
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int | None):
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        atexit._run_exitfuncs()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve_forks() -> None:
    """The forking interpreter: one JSON request per stdin line, one JSON answer per stdout line."""
    import importlib
    import json
    import threading

    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a preloaded module started a thread: forking it is unsafe"
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _forked_child(req["argv"], req["cwd"], req["out"], req["err"])
        deadline = time.time() + req["timeout"]
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.time() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = None
                break
            time.sleep(0.02)
        print(json.dumps({"returncode": rc}), flush=True)


class ForkedPython:
    """Run ``python -m <module> ...`` / ``python <script> ...`` command lines in forks of one preloaded interpreter."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.count = 0
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=subprocess_env(), cwd=self.workdir)  # fmt: skip
        self._answer()

    def _answer(self) -> dict:
        import json

        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the forking interpreter ended (status {self.proc.wait()})")
        return json.loads(line)

    def run(self, cmd: list[str], cwd: Path, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
        """Like :func:`run`; ``cmd`` starts with ``python`` (or ``sys.executable``), then ``-m module`` or a script."""
        import json

        assert cmd[0] in ("python", "python3", sys.executable), cmd
        self.count += 1
        out, err = self.workdir / f"{self.count}.out", self.workdir / f"{self.count}.err"
        req = {"argv": list(cmd[1:]), "cwd": str(cwd), "out": str(out), "err": str(err), "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        rc = self._answer()["returncode"]
        proc = subprocess.CompletedProcess(cmd, -9 if rc is None else rc, out.read_text(), err.read_text())
        if rc is None:
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        if check and rc != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({rc}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        return proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    _serve_forks()
