"""What a user sees in the terminal: progress and results by default, Ray's own output in a log file.

One fresh process (so Ray's console handlers are the real ones) runs ``rolo-batch train`` twice: first as
users run it, then with ``--verbose``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import write_synthetic_features

RAY_NOISE = ("PlacementGroupCleaner", "tqdm is not installed", "Execution plan", "Starting execution of Dataset",
             "pid=", "Token authentication")
MARK = "=== verbose run ==="


def test_the_console_shows_progress_and_results_and_ray_output_goes_to_a_log_file(tmp_path):
    features = str(tmp_path / "features" / "synthetic-0000")
    write_synthetic_features(features, videos=3, frames=40, dim=8)
    common = ["train", features, str(tmp_path), "--steps", "3", "--epochs", "2", "--hidden", "8",
              "--projection", "8", "--gpu", "off"]
    script = ("import json, sys; from rolo_batch import cli\n"
              "a, b = json.loads(sys.argv[1])\n"
              "first = cli.main(a); sys.stdout.flush(); sys.stderr.flush()\n"
              f"print({MARK!r}, flush=True); print({MARK!r}, file=sys.stderr, flush=True)\n"
              "second = cli.main(b)\n"
              "print('codes', first, second)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", script,
                           json.dumps([common + ["--run", "quiet"], common + ["--run", "loud", "--verbose"]])],
                          capture_output=True, text=True, env=env, timeout=300)
    assert "codes 0 0" in done.stdout, done.stdout + done.stderr
    quiet_out, loud_out = done.stdout.split(MARK)
    quiet_err, loud_err = done.stderr.split(MARK)
    quiet = quiet_out + quiet_err

    noise = [line for line in quiet.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, noise
    assert re.search(r"^train: 2/2 epochs \(100%\).*val IoU .* done in", quiet_err, re.M), quiet_err
    assert "model written to" in quiet_out and "val_loss" in quiet_out  # the results table
    match = re.search(r"Ray's own output goes to (\S+\.log)", quiet_err)
    assert match, quiet_err
    log = Path(match.group(1))
    assert log.parent == tmp_path / "logs" and log.name.startswith("train-")
    logged = log.read_text()
    assert "train: epoch 1/2" in logged  # rank 0's own line, forwarded by Ray: in the file, not on the console
    assert "train: epoch" not in quiet

    assert "train: epoch 1/2" in loud_out + loud_err  # --verbose: Ray's forwarded worker output is shown
    assert "Ray's own output goes to" not in loud_err


def test_native_stderr_goes_to_the_log_and_our_own_lines_to_the_terminal(tmp_path):
    # as Ray's C++ core worker writes its warnings: straight to file descriptor 2
    log = tmp_path / "ray.log"
    script = ("import os, sys; from rolo_batch.ray_output import send_ray_output_to_file\n"
              f"sink = send_ray_output_to_file({str(log)!r})\n"
              "os.write(2, b'native line\\n'); print('own line', file=sys.stderr)\n"
              "sink.close(); os.write(2, b'after close\\n')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "own line" in done.stderr and "after close" in done.stderr
    assert "native line" not in done.stderr
    assert "native line" in log.read_text()
