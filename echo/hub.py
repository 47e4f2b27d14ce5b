"""Checkpoints by name: `echo.load("echo-small")`, `"echo-tiny"`, `"default"`.

Released checkpoints are fetched with huggingface_hub's `hf_hub_download`, so its cache
(HF_HUB_CACHE / HF_HOME, or `cache_dir=`) and offline mode (HF_HUB_OFFLINE=1, or TRANSFORMERS_OFFLINE=1) apply;
a file already in the cache is used without any network. "default" is an ECHO-tiny trained by echo's own
pretraining and bundled in the package (echo/data/default/model.safetensors).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CHECKPOINT = Path(__file__).parent / "data" / "default" / "model.safetensors"


@dataclass(frozen=True)
class Release:
    """A checkpoint published on the Hugging Face hub: `filename` in repository `repo_id` at `revision`."""

    repo_id: str
    filename: str
    sha256: str | None  # None: not published where echo could read it; the download is then not verified
    size: str  # the preset the file must hold: without a sha256, what tells a wrong file put in the cache by hand
    revision: str = "main"
    # said in every error about the release: where its repository id is a guess, a failed download is no news
    caveat: str = ""

    @property
    def url(self) -> str:
        """The file's download address, for messages."""
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"

    @property
    def pinned(self) -> bool:
        """Whether `revision` is a commit, which huggingface_hub looks up in snapshots/<commit> directly; a branch
        or tag goes through refs/<revision>."""
        return re.fullmatch(r"[0-9a-f]{40}", self.revision) is not None


RELEASES = {
    # github.com/yucongzh/ECHO (README, August 2025): weights at huggingface.co/yucongzh/echo-small-0824,
    # loaded there with safetensors' load_file("model.safetensors"). Its sha256 was not found published.
    "echo-small": Release("yucongzh/echo-small-0824", "model.safetensors", None, "small"),
    # PLACEHOLDER: the ECHO README lists ECHO-tiny as "Coming Soon" and no hub repository for it was found;
    # this id follows the small release's naming and must be checked when the tiny weights are published.
    "echo-tiny": Release("yucongzh/echo-tiny-0824", "model.safetensors", None, "tiny",
                         caveat="ECHO-tiny's weights were not published when this version of echo was made; "
                                "the repository id follows echo-small's naming and may not exist"),
}
NAMES = ("default", *RELEASES)


def _offline() -> str | None:
    """What sets huggingface_hub's offline mode, or None. It reads HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE where
    that is unset or empty, once, at import; read again here the same way, so that a variable set later (in a
    notebook, a test) applies too, and its setting is named in echo's message."""
    from huggingface_hub import constants

    variable = next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(name)), None)
    if variable and os.environ[variable].upper() in constants.ENV_VARS_TRUE_VALUES:
        return f"{variable}={os.environ[variable]}"
    if constants.HF_HUB_OFFLINE:  # is_offline_mode() returns it, in the versions that have that function
        return "HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE, as set when huggingface_hub was imported"
    return None


def _cache_dir(cache_dir) -> Path:
    """The hub cache as an absolute path, found as huggingface_hub finds it but from the environment as it is now
    (its constants are read once, at import): ~ and $VARS expanded, for a literal '~' would go into the commands
    of `_not_found`, and a relative path would be wrong there, as they are run from another folder."""
    if cache_dir is None:
        home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        legacy = os.environ.get("HUGGINGFACE_HUB_CACHE")
        cache_dir = os.environ.get("HF_HUB_CACHE") or legacy or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(cache_dir))).resolve()


def _one_line(error: Exception) -> str:
    """huggingface_hub's messages span lines; echo's errors are one line."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def _named(name: str, release: Release) -> str:
    """The head of an error about a release: its name, and its caveat first, before any command to copy."""
    return f"{name} ({release.caveat})" if release.caveat else name


def _not_on_hub(name: str, release: Release, error: Exception) -> ValueError:
    """The hub answered that the repository, revision or file is not there: no download can be put in the cache."""
    others = ", ".join(known for known in NAMES if known != name)
    return ValueError(f"{_named(name, release)}: the Hugging Face hub has no {release.url} "
                      f"({type(error).__name__}): the release is not published there, or is private and needs a "
                      f"login; load a checkpoint by path, or another name: {others}")


def _not_found(name: str, release: Release, cache: Path, reason: str) -> ValueError:
    """Says how to put a downloaded file where huggingface_hub looks offline. refs/main must hold the snapshot
    name exactly: huggingface_hub does not strip it, so `echo local > refs/main` (with its newline) fails.
    A pinned commit needs no ref, and its snapshot must be named by the commit."""
    folder = cache / f"models--{release.repo_id.replace('/', '--')}"
    snapshot = folder / "snapshots" / (release.revision if release.pinned else "local")
    folders, naming = [snapshot], ""
    if not release.pinned:
        ref = folder / "refs" / release.revision
        held = ref.read_text() if ref.is_file() else ""
        if held != held.strip():
            reason += f"; {ref} holds {held!r}, and huggingface_hub reads it without stripping whitespace"
        folders.append(ref.parent)
        naming = f" && printf local > {shlex.quote(str(ref))}"
    commands = (f"mkdir -p {' '.join(shlex.quote(str(path)) for path in folders)} && "
                f"cp {release.filename} {shlex.quote(str(snapshot / release.filename))}{naming}")
    return ValueError(
        f"{_named(name, release)}: {release.filename} of {release.repo_id} is not in the Hugging Face cache and "
        f"could not be downloaded ({reason}). Either download {release.url} and load it by path "
        f"(echo.load('/path/to/{release.filename}'), or --model /path/to/{release.filename} on the command line), "
        f"or put it in the cache, from the folder holding it: "
        f"{commands}"
    )


def _replacing(path: Path, release: Release) -> str:
    """How to replace a bad cached file: copied over, not deleted, for huggingface_hub would link its blob again."""
    return (f"download {release.url} and copy it over the cached file, from the folder holding it: "
            f"cp {release.filename} {shlex.quote(str(path))}")


def damaged(name: str, path: Path, problem: ValueError) -> ValueError:
    """A named release's cached file that echo cannot read (cut short, or not the weights): said to be the
    cache's copy of the release, which huggingface_hub keeps using rather than download again."""
    release = RELEASES[name]
    return ValueError(f"{name}: the Hugging Face cache's copy of {release.url} is damaged ({problem}); "
                      f"{_replacing(path, release)}")


def _verify(path: Path, name: str, release: Release) -> Path:
    if release.sha256 is None:
        return path
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != release.sha256:
        raise ValueError(f"{name}: {path} has sha256 {digest.hexdigest()}, but the release has {release.sha256}; "
                         f"{_replacing(path, release)}")
    return path


def resolve(name: str, cache_dir=None) -> Path:
    """The local file of a named checkpoint, downloading a release into the hub cache when allowed."""
    if name == "default":
        if not DEFAULT_CHECKPOINT.is_file():
            raise ValueError(
                f"the default model is not bundled yet: {DEFAULT_CHECKPOINT} is made by echo's pretraining "
                f"(scripts/build_corpus.py, then python -m echo pretrain); meanwhile load a checkpoint by path "
                f"or a release by name ({', '.join(RELEASES)})"
            )
        return DEFAULT_CHECKPOINT
    if name not in RELEASES:
        spelled_alike = difflib.get_close_matches(name.strip().lower().replace("_", "-"), NAMES, n=1, cutoff=0.8)
        hint = f" (did you mean {spelled_alike[0]!r}?)" if spelled_alike else ""
        raise ValueError(f"unknown checkpoint name {name!r:.80}{hint}; known names: {', '.join(NAMES)}, "
                         f"or give the path of a checkpoint file")
    release = RELEASES[name]
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                           RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ValueError(f"{name}: loading released checkpoints by name needs huggingface_hub "
                         f"(pip install 'echo-fm[hub]'), or download {release.url} and load it by path") from None
    cache, offline = _cache_dir(cache_dir), _offline()
    try:
        path = hf_hub_download(release.repo_id, release.filename, revision=release.revision,
                               cache_dir=str(cache), local_files_only=offline is not None)
    except LocalEntryNotFoundError as error:
        reason = f"offline mode ({offline})" if offline else (
            f"the hub cannot be reached: {_one_line(error)}; with no network, HF_HUB_OFFLINE=1 says so at once, "
            f"without the download's retries")
        raise _not_found(name, release, cache, reason) from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as error:
        if isinstance(error, GatedRepoError):  # there, but its terms must be accepted: a download can be cached
            raise _not_found(name, release, cache, _one_line(error)) from None
        raise _not_on_hub(name, release, error) from None
    except Exception as error:  # HTTP errors are OSErrors, but the transport's (httpx: timeouts, proxies) are not
        raise _not_found(name, release, cache, _one_line(error)) from None
    return _verify(Path(path), name, release)
