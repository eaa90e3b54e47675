"""A real Label Studio for the end-to-end test and the job benchmark: started headless on a
loopback port with a legacy token, its processes waited for and stopped."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import requests

# variables Label Studio reads as its own settings: a developer's shell must not leak into it
FOREIGN = ("HOST", "PORT", "USERNAME", "PASSWORD", "USER_TOKEN")


def clean_environment() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in FOREIGN}


def start_label_studio(binary: str, root: Path, port: int, token: str, prefix: Sequence[str] = (),
                       settings: Optional[Dict[str, str]] = None) -> Tuple[subprocess.Popen, Path]:
    """`prefix` goes before the command (e.g. `taskset -c 1`: a benchmark's cores for it);
    `settings`: more of Label Studio's variables (e.g. a feature flag)."""
    env = {**clean_environment(), "LABEL_STUDIO_BASE_DATA_DIR": str(root / "ls-data"), "HOME": str(root / "ls-home"),
           "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false",
           "LATEST_VERSION_CHECK": "false", "COLLECT_ANALYTICS": "false", **(settings or {})}
    (root / "ls-home").mkdir(exist_ok=True)
    log = root / "ls.log"
    process = subprocess.Popen(
        [*prefix, binary, "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
         "--username=e2e@example.com", "--password=e2e-password-123", f"--user-token={token}",
         "--enable-legacy-api-token"],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    return process, log


def wait_for(url: str, seconds: float, process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited early:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up in {seconds} s:\n{Path(log_path).read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
