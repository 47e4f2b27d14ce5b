"""The README's Python blocks run as pasted, in order, in one session, as a reader would paste them: a block that
was edited into something that fails or says something untrue is found here, not by the next user. Where a block
takes the reader's own data (`source`, `normal_paths`, `test_paths`), the session holds some first."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rel_err

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.mark.slow
def test_the_readme_python_blocks_run_as_pasted_and_say_what_they_do(tmp_path, monkeypatch, capsys):
    soundfile = pytest.importorskip("soundfile")
    from echo.data import synth

    monkeypatch.chdir(tmp_path)
    rate = 16000
    paths = {}
    for name, fault, seed in (("normal_0", None, 0), ("normal_1", None, 1), ("normal_2", None, 2),
                              ("test_healthy", None, 3), ("test_faulty", "outer", 4)):
        paths[name] = tmp_path / f"{name}.wav"
        soundfile.write(str(paths[name]), synth.machine_signal(synth.Machine(fault=fault), rate, 2 * rate, seed=seed),
                        rate)
    whole = np.random.default_rng().standard_normal(48000 * 21 + 12345).astype(np.float32)
    session = {
        "source": np.array_split(whole, 7),  # a 2000-frame segment is final before the end
        "normal_paths": [paths[f"normal_{i}"] for i in range(3)],
        "test_paths": [paths["test_healthy"], paths["test_faulty"]],
    }
    blocks = python_blocks()
    assert len(blocks) >= 5, "the README's API tour lost its blocks"
    for block in blocks:
        exec(compile(block, str(README), "exec"), session)

    import echo.fast

    model = session["model"]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "model.json").is_file()
    assert len(session["embeddings"]) == len(session["pairs"]) == len(session["fast_bf16"]) == 2
    assert rel_err(session["utterance"], echo.fast.encode(model, [torch.from_numpy(whole)], 48000)[0]) < 1e-5
    printed = [float(found) for found in re.findall(r"score (\S+)", capsys.readouterr().out)]
    assert len(printed) > 4 and min(printed[-2:]) > 10 * max(printed[:3]), printed  # a fault, said by its scores
    healthy, faulty = session["scores"]
    assert faulty > healthy
