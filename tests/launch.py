"""Run a script under torchrun as a subprocess, so multi-process tests never re-run pytest in every rank."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this checkout first on the path, one thread per process."""
    # A rendezvous inherited from the test process (or an earlier launch) would make children fight over its port.
    launcher = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "TORCHELASTIC_RUN_ID", "PL_GLOBAL_SEED")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra)
    return env


def torchrun(script: str | Path, nproc: int, *args: Any, timeout: float = 300, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run ``tests/scripts/<script>`` (or a path) on ``nproc`` CPU processes; fail the test on a hang or an error."""
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), str(path), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env or child_env(), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def run_python(script: str | Path, *args: Any, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script in one plain Python process (for single-process references and CLIs)."""
    path = Path(script) if Path(script).is_absolute() else SCRIPTS / script
    command = [sys.executable, str(path), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=child_env(), cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result


def train_together(root: Path, nproc: int, runs: dict[str, Sequence[Any]], script: str = "train_gpt.py",
                   timeout: float = 240) -> dict[str, dict]:
    """Run ``script`` (one that takes ``--then``, see scripts/fresh_runs.py) once per entry of ``runs`` (a name and
    its arguments), one after another in the same ``nproc`` processes (``--devices nproc``) of one launch; each run's
    results (``<root>/<name>.json``) by name.

    ``timeout`` is per run; a later run may use files an earlier one wrote."""
    args: list[Any] = []
    for name, run in runs.items():
        args += [*(["--then"] if args else []), "--out", root / f"{name}.json", "--devices", nproc, *run]
    if nproc == 1:
        run_python(script, *args, timeout=timeout * len(runs))
    else:
        torchrun(script, nproc, *args, timeout=timeout * len(runs))
    return {name: read_json(root / f"{name}.json") for name in runs}


@contextlib.contextmanager
def serving(args: list[Any], log: IO[str], env: dict[str, str] | None = None
            ) -> Iterator[tuple[subprocess.Popen, int]]:
    """``lightning-megatron serve <args> --port 0`` in its own process group: yields the process and its port once it
    listens; afterwards stops it (SIGINT, then SIGKILL of the group if it outlives 60 s)."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "lightning_megatron" / "cli.py"), "serve", *map(str, args), "--port", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env or child_env(), cwd=REPO, start_new_session=True)
    try:
        port = None
        deadline = time.monotonic() + 300
        while port is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(1)
            match = re.search(r"Serving \S+ on http://127\.0\.0\.1:(\d+)", Path(log.name).read_text())
            port = int(match.group(1)) if match else None
        assert port is not None, Path(log.name).read_text()[-3000:]
        yield process, port
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def read_json(path: str | Path) -> Any:
    """Load a JSON file a child process wrote."""
    return json.loads(Path(path).read_text())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
