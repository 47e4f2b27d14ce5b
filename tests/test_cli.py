import subprocess
import sys


def test_demo_prints_embedding_shapes():
    run = subprocess.run([sys.executable, "-m", "echo", "demo", "--seconds", "2", "--rate", "48000"],
                         capture_output=True, text=True, check=True)
    assert "utterance embedding (3648,)" in run.stdout  # 19 bands x 192


def test_bad_argument_is_reported_without_traceback():
    run = subprocess.run([sys.executable, "-m", "echo", "demo", "--seconds", "0.01"], capture_output=True, text=True)
    assert run.returncode == 2 and "shorter than one 25 ms window" in run.stdout and "Traceback" not in run.stderr
