"""Checkpoints by name through a pre-populated huggingface_hub cache; never the network (HF_HUB_OFFLINE=1)."""
import hashlib
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from safetensors.torch import save_file

import echo
from echo import hub
from conftest import random_model, same_weights

pytest.importorskip("huggingface_hub")


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def released_file(path, model):
    """A flat safetensors file without echo's metadata, as the release is."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def populate(cache, release, model, snapshot="0123456789abcdef0123456789abcdef01234567"):
    folder = cache / f"models--{release.repo_id.replace('/', '--')}"
    released_file(folder / "snapshots" / snapshot / release.filename, model)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(snapshot)


@pytest.fixture
def small_of_tiny_weights(monkeypatch):
    """echo-small's release as if it were ECHO-tiny: tests of the cache's mechanics stay small and fast."""
    monkeypatch.setitem(hub.RELEASES, "echo-small", replace(hub.RELEASES["echo-small"], size="tiny"))


def test_release_loads_from_a_populated_cache(offline_cache):
    model = random_model("tiny")
    populate(offline_cache, hub.RELEASES["echo-tiny"], model)
    loaded = echo.load("echo-tiny")
    assert loaded.config.size == "tiny" and same_weights(loaded, model)


def test_offline_without_cache_gives_commands_that_work_when_run(offline_cache, tmp_path, small_of_tiny_weights):
    with pytest.raises(ValueError) as error:
        echo.load("echo-small")
    text = str(error.value)
    assert "https://huggingface.co/yucongzh/echo-small-0824/resolve/main/model.safetensors" in text
    assert "offline" in text
    commands = re.search(r"from the folder holding it: (mkdir .*)$", text).group(1)
    assert "printf local > " in commands  # `echo local >` writes a newline, and huggingface_hub does not strip it
    model = random_model("tiny")  # run the commands as given (tiny weights keep the test small)
    released_file(tmp_path / "download" / "model.safetensors", model)
    subprocess.run(["sh", "-c", commands], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-small"), model)


def test_an_unpublished_release_says_so_before_the_commands_to_run(offline_cache, tmp_path):
    """ECHO-tiny's hub id is a guess: its error says so at its head, and the commands at its end still run as given
    (a caveat after them would be copied into the shell)."""
    with pytest.raises(ValueError) as error:
        echo.load("echo-tiny")
    text = str(error.value)
    assert text.startswith("echo-tiny (ECHO-tiny's weights were not published when this version of echo was made; ")
    commands = re.search(r"from the folder holding it: (mkdir .*)$", text).group(1)
    model = random_model("tiny")
    released_file(tmp_path / "download" / "model.safetensors", model)
    subprocess.run(["sh", "-c", commands], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-tiny"), model)


def test_a_newline_in_refs_main_is_pointed_out(offline_cache):
    folder = offline_cache / "models--yucongzh--echo-small-0824"
    released_file(folder / "snapshots" / "local" / "model.safetensors", random_model("tiny"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("local\n")
    with pytest.raises(ValueError, match=r"refs/main holds 'local\\n', and huggingface_hub reads it without stripping"):
        echo.load("echo-small")


@pytest.mark.parametrize("name, hint", [("echo-base", ""), ("Echo-Small", " (did you mean 'echo-small'?)"),
                                        ("echo_tiny", " (did you mean 'echo-tiny'?)"),
                                        (" echo-small\n", " (did you mean 'echo-small'?)"),
                                        ("echo-smal", " (did you mean 'echo-small'?)"),  # a typo got no hint
                                        ("defualt", " (did you mean 'default'?)"), ("echo-large", "")])
def test_unknown_names_list_the_known_ones(tmp_path, monkeypatch, name, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"unknown checkpoint name {name!r}{hint}; known names: default, "
                                                   f"echo-small, echo-tiny")):
        echo.load(name)
    with pytest.raises(ValueError, match="checkpoint missing.pth does not exist"):
        echo.load("missing.pth")  # a file name, not a checkpoint name


def test_sha256_is_checked(offline_cache, monkeypatch):
    model = random_model("tiny")
    release = hub.RELEASES["echo-tiny"]
    populate(offline_cache, release, model)
    path = hub.resolve("echo-tiny")
    good = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setitem(hub.RELEASES, "echo-tiny", replace(release, sha256=good))
    assert same_weights(echo.load("echo-tiny"), model)
    monkeypatch.setitem(hub.RELEASES, "echo-tiny", replace(release, sha256="0" * 64))
    with pytest.raises(ValueError, match=f"has sha256 {good}, but the release has 0000"):
        echo.load("echo-tiny")


def test_explicit_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = random_model("tiny")
    populate(tmp_path / "elsewhere", hub.RELEASES["echo-tiny"], model)
    assert hub.resolve("echo-tiny", cache_dir=tmp_path / "elsewhere").is_file()


def test_default_until_bundled_and_after(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "DEFAULT_CHECKPOINT", tmp_path / "default" / "model.safetensors")
    with pytest.raises(ValueError, match="the default model is not bundled yet"):
        echo.load("default")
    model = random_model("tiny")
    echo.save(model, hub.DEFAULT_CHECKPOINT)
    assert same_weights(echo.load("default"), model)


def test_paths_win_over_names_and_missing_hub_is_explained(tmp_path, monkeypatch):
    model = random_model("tiny")
    monkeypatch.chdir(tmp_path)
    echo.save(model, tmp_path / "echo-tiny" / "model.safetensors")  # a folder named like a release: its file
    assert same_weights(echo.load("echo-tiny"), model)
    monkeypatch.chdir(tmp_path / "echo-tiny")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(ValueError, match=r"needs huggingface_hub \(pip install 'echo-fm\[hub\]'\)"):
        echo.load("echo-tiny")


@pytest.mark.parametrize("cache_setting", ["~/hub", "$CACHE_ROOT/hub", "hub"])
def test_commands_name_the_cache_as_an_absolute_path(tmp_path, monkeypatch, cache_setting, small_of_tiny_weights):
    """'~/hub' went into the commands quoted, so mkdir made a folder named '~'; a relative cache was taken from
    the download folder; '$CACHE_ROOT' was neither expanded nor what huggingface_hub reads."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CACHE_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", cache_setting)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as error:
        echo.load("echo-small")
    commands = re.search(r"from the folder holding it: (mkdir .*)$", str(error.value)).group(1)
    assert f"mkdir -p {tmp_path}/hub/models--yucongzh--echo-small-0824/snapshots/local " in commands
    model = random_model("tiny")
    released_file(tmp_path / "download" / "model.safetensors", model)
    subprocess.run(["sh", "-c", commands], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-small"), model)


def test_hf_home_set_after_huggingface_hub_was_imported(tmp_path, monkeypatch):
    from huggingface_hub import constants  # its paths are read now, once, as in any process that used it

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert constants.HF_HOME != str(tmp_path / "hf")
    model = random_model("tiny")
    populate(tmp_path / "hf" / "hub", hub.RELEASES["echo-tiny"], model)
    assert same_weights(echo.load("echo-tiny"), model)


def test_hf_hub_cache_wins_over_the_legacy_variable(tmp_path, monkeypatch):
    """huggingface_hub takes HF_HUB_CACHE over HUGGINGFACE_HUB_CACHE where both are set: a release cached under the
    first must be found there, not looked for (and downloaded again) under the legacy one."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    release, snapshot = hub.RELEASES["echo-tiny"], "0123456789abcdef0123456789abcdef01234567"
    folder = tmp_path / "hub" / f"models--{release.repo_id.replace('/', '--')}"
    (folder / "snapshots" / snapshot).mkdir(parents=True)
    (folder / "snapshots" / snapshot / release.filename).write_bytes(b"weights")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(snapshot)
    assert hub.resolve("echo-tiny") == folder / "snapshots" / snapshot / release.filename


class ReadTimeout(Exception):
    """Like httpx's transport errors, which huggingface_hub lets through: not an OSError."""


def test_transport_errors_are_explained(offline_cache, monkeypatch):
    import huggingface_hub

    def timing_out(*args, **kwargs):
        raise ReadTimeout("The read operation timed out")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", timing_out)
    with pytest.raises(ValueError, match=r"echo-tiny \(.*\): model.safetensors of yucongzh/echo-tiny-0824 is not in the "
                                         r"Hugging Face cache and could not be downloaded \(ReadTimeout: The read "
                                         r"operation timed out\)\. Either download https://huggingface.co/"):
        echo.load("echo-tiny")


def test_a_pinned_commit_gets_commands_that_work_when_run(offline_cache, tmp_path, monkeypatch, small_of_tiny_weights):
    """huggingface_hub looks a commit up in snapshots/<commit> and never in refs/, so the commands written for a
    branch (snapshots/local named by refs/main) left a pinned release not found."""
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    monkeypatch.setitem(hub.RELEASES, "echo-small", replace(hub.RELEASES["echo-small"], revision=commit))
    with pytest.raises(ValueError) as error:
        echo.load("echo-small")
    assert f"https://huggingface.co/yucongzh/echo-small-0824/resolve/{commit}/model.safetensors" in str(error.value)
    commands = re.search(r"from the folder holding it: (mkdir .*)$", str(error.value)).group(1)
    model = random_model("tiny")
    released_file(tmp_path / "download" / "model.safetensors", model)
    subprocess.run(["sh", "-c", commands], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-small"), model)


def test_a_cached_file_with_the_wrong_sha256_gets_a_command_that_replaces_it(offline_cache, tmp_path, monkeypatch):
    """'Delete it and download again' left huggingface_hub's blob, to which it links the deleted file again."""
    release = hub.RELEASES["echo-tiny"]
    model = random_model("tiny")
    download = released_file(tmp_path / "download" / "model.safetensors", model)
    monkeypatch.setitem(hub.RELEASES, "echo-tiny",
                        replace(release, sha256=hashlib.sha256(download.read_bytes()).hexdigest()))
    populate(offline_cache, release, random_model("tiny"))  # another file in the cache
    with pytest.raises(ValueError, match="has sha256 .*, but the release has ") as error:
        echo.load("echo-tiny")
    command = re.search(r"from the folder holding it: (cp .*)$", str(error.value)).group(1)
    subprocess.run(["sh", "-c", command], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-tiny"), model)


def hub_answer(status, error_code):
    """The error huggingface_hub raises for the hub's answer, made from a response without any network."""
    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub's HTTP client from its 1.x
    from huggingface_hub.utils import hf_raise_for_status

    url = "https://huggingface.co/yucongzh/echo-tiny-0824/resolve/main/model.safetensors"
    try:
        hf_raise_for_status(httpx2.Response(status, headers={"X-Error-Code": error_code},
                                            request=httpx2.Request("HEAD", url)))
    except Exception as error:
        return error
    raise AssertionError(f"huggingface_hub did not raise for {status} {error_code}")


@pytest.mark.parametrize("status, error_code", [(401, "RepoNotFound"), (404, "RevisionNotFound"),
                                                (404, "EntryNotFound")])
def test_a_release_missing_from_the_hub_is_named_in_one_line(offline_cache, monkeypatch, status, error_code):
    """huggingface_hub's messages span lines, and the file to download and put in the cache does not exist."""
    import huggingface_hub

    def answering(*args, **kwargs):
        raise hub_answer(status, error_code)

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", answering)
    with pytest.raises(ValueError) as error:
        echo.load("echo-tiny")
    text = str(error.value)
    assert "\n" not in text
    assert text.startswith(f"echo-tiny ({hub.RELEASES['echo-tiny'].caveat}): the Hugging Face hub has no "
                           "https://huggingface.co/yucongzh/echo-tiny-0824/resolve/main/model.safetensors")
    assert "not published" in hub.RELEASES["echo-tiny"].caveat
    assert "mkdir" not in text


def test_other_hub_errors_are_one_line(offline_cache, monkeypatch):
    import huggingface_hub

    def unavailable(*args, **kwargs):
        raise hub_answer(503, "")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unavailable)
    with pytest.raises(ValueError, match=r"could not be downloaded \(HfHubHTTPError: .*503") as error:
        echo.load("echo-tiny")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("settings, named", [
    ({"TRANSFORMERS_OFFLINE": "1"}, "TRANSFORMERS_OFFLINE=1"),  # was "the hub cannot be reached", and a download
    ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE=yes"),
    ({"HF_HUB_OFFLINE": "True", "TRANSFORMERS_OFFLINE": "0"}, "HF_HUB_OFFLINE=True"),
    ({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"}, None),  # huggingface_hub reads HF_HUB_OFFLINE alone then
    ({"HF_HUB_OFFLINE": " 1"}, None),
], ids=["transformers", "hub-empty", "hub-first", "hub-off", "spaced"])
def test_offline_mode_is_what_huggingface_hub_takes_it_to_be(offline_cache, monkeypatch, settings, named):
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import LocalEntryNotFoundError

    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in settings.items():
        monkeypatch.setenv(variable, value)
    reads = subprocess.run([sys.executable, "-c", "from huggingface_hub import constants; "
                            "print(constants.HF_HUB_OFFLINE)"], capture_output=True, text=True, check=True)
    assert reads.stdout.strip() == str(named is not None)  # as huggingface_hub reads the same environment

    asked = []

    def not_cached(*args, local_files_only, **kwargs):  # never the network, whatever echo asks for
        asked.append(local_files_only)
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as imported in a process without either variable
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_cached)
    reason = f"offline mode ({named})" if named else "the hub cannot be reached: LocalEntryNotFoundError"
    with pytest.raises(ValueError, match=re.escape(f"could not be downloaded ({reason}")) as refused:
        echo.load("echo-small")
    assert asked == [named is not None]
    # where the hub was tried, how to be told at once; for the command line, its own option
    assert ("HF_HUB_OFFLINE=1 says so at once" in str(refused.value)) == (named is None)
    assert "or --model /path/to/model.safetensors on the command line" in str(refused.value)


def test_offline_mode_set_when_huggingface_hub_was_imported_is_named(offline_cache, monkeypatch):
    """huggingface_hub keeps the offline mode it read at import, though the variable is unset since."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"could not be downloaded \(offline mode \(HF_HUB_OFFLINE or "
                                         r"TRANSFORMERS_OFFLINE, as set when huggingface_hub was imported\)\)"):
        echo.load("echo-small")


@pytest.mark.parametrize("broken, problem", [
    (lambda good: good[:1000], "not a readable safetensors file"),
    (lambda good: b"<!DOCTYPE html><html><body>Error 502</body></html>", "neither a safetensors file nor a torch"),
], ids=["cut-short", "a-web-page"])
def test_a_damaged_cached_release_is_named_with_a_command_that_replaces_it(offline_cache, tmp_path, broken, problem,
                                                                           small_of_tiny_weights):
    """Reported by its path in the cache alone, which neither said it was the release nor how to replace it."""
    model = random_model("tiny")
    download = released_file(tmp_path / "download" / "model.safetensors", model)
    folder = offline_cache / "models--yucongzh--echo-small-0824"  # as huggingface_hub keeps it: a link to a blob
    blob = folder / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(broken(download.read_bytes()))
    commit = "0123456789abcdef0123456789abcdef01234567"
    cached = folder / "snapshots" / commit / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.symlink_to(blob)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    with pytest.raises(ValueError) as error:
        echo.load("echo-small")
    text = str(error.value)
    assert text.startswith("echo-small: the Hugging Face cache's copy of https://huggingface.co/yucongzh/"
                           f"echo-small-0824/resolve/main/model.safetensors is damaged ({cached}: {problem}")
    assert "\n" not in text
    command = re.search(r"from the folder holding it: (cp .*)$", text).group(1)
    subprocess.run(["sh", "-c", command], cwd=tmp_path / "download", check=True)
    assert same_weights(echo.load("echo-small"), model)


def test_a_release_holding_another_model_in_the_cache_is_named_damaged(offline_cache, tmp_path):
    """A file of another size put in the cache's place by hand (without a published sha256, nothing else tells)
    loaded as that size under the release's name: echo.load("echo-tiny") returned a model of dim 64."""
    populate(offline_cache, hub.RELEASES["echo-tiny"], random_model("tiny", dim=64, heads=1))
    with pytest.raises(ValueError) as error:
        echo.load("echo-tiny")
    text = str(error.value)
    assert text.startswith("echo-tiny: the Hugging Face cache's copy of https://huggingface.co/yucongzh/echo-tiny-0824"
                           "/resolve/main/model.safetensors is damaged (") and "does not match ECHO-tiny (dim 192, " \
        "depth 12); mis-shaped keys: cls_token (1, 1, 64) (expected (1, 1, 192))" in text
    assert re.search(r"from the folder holding it: cp model\.safetensors \S+$", text)
    with pytest.raises(ValueError, match=r"^echo-tiny is ECHO-tiny: size='small' contradicts it$"):
        echo.load("echo-tiny", size="small")
