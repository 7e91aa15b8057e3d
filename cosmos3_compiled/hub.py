"""`checkpoint=` as a folder or a Hugging Face Hub model id.

`resolve_checkpoint` turns the setting into a local folder: an existing directory is used as it is; an `owner/name`
id is fetched with `huggingface_hub.snapshot_download` into the Hub cache (`HF_HUB_CACHE`, usually
~/.cache/huggingface/hub), limited to the files the pipeline reads (configs, safetensors shards, tokenizer files;
never pickled weights). The library itself reuses what is cached and, with `HF_HUB_OFFLINE=1`, touches no network.
Every failure becomes a one-line `RequestError`.
"""

from __future__ import annotations

import re
from pathlib import Path

from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub import snapshot_download

from .errors import RequestError

# the pipeline's component folders (diffusers layout) and the file kinds it reads from them: configs and indexes,
# safetensors shards, tokenizer files (tokenizer.json, vocab/merges, sentencepiece models, chat templates)
COMPONENTS = ("transformer", "vae", "scheduler", "text_tokenizer", "sound_tokenizer")
FILE_KINDS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")
ALLOW_PATTERNS = ["model_index.json", *(f"{folder}/{kind}" for folder in COMPONENTS for kind in FILE_KINDS)]

# owner/name: one slash, neither part empty nor starting with '.', only the characters the Hub allows
_REPO_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*")

# The HTTP client's own error root (requests' HTTPError in huggingface_hub 0.x, httpx's in 1.x, httpx2's in 2.x),
# found as a base of HfHubHTTPError: a dropped connection or proxy failure can come through unwrapped as one.
_CLIENT_ERRORS = tuple(base for base in hf_errors.HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")
# huggingface_hub >= 2 only: a cached snapshot that lacks files and the Hub cannot be reached (`except ()` matches
# nothing on older versions)
_INCOMPLETE = getattr(hf_errors, "IncompleteSnapshotError", ())

_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def resolve_checkpoint(spec: str, revision: str | None = None) -> Path:
    """The local folder for `checkpoint=spec`: the folder itself, or the Hub snapshot of repo id `spec`.

    `revision` (a branch, tag or commit; None means the default branch) applies to Hub ids only.
    """
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if revision is not None:
            raise RequestError(f"checkpoint_revision={revision} applies to hub ids only; {spec} is a folder")
        return folder
    if folder.exists() or not _REPO_ID.fullmatch(spec):
        kind = " (it is a file)" if folder.exists() else ""
        raise RequestError(f"checkpoint folder {spec} does not exist{kind}")

    at = f"{spec}@{revision}" if revision is not None else spec
    cache = hf_constants.HF_HUB_CACHE  # read at call time, as snapshot_download does
    try:
        return Path(snapshot_download(repo_id=spec, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except hf_errors.GatedRepoError:
        problem = f"is a gated Hub repo: accept its terms on its Hub page, then {_LOGIN}"
    except hf_errors.DisabledRepoError:
        problem = "is a disabled Hub repo"
    except hf_errors.RepositoryNotFoundError:
        problem = f"is neither a folder here nor a Hub model repo (if it is a private repo, {_LOGIN})"
    except hf_errors.RevisionNotFoundError:
        at = spec  # the revision is named in the message below
        problem = f"has no revision {revision!r} on the Hub (checkpoint_revision= takes a branch, tag or commit)"
    except _INCOMPLETE as err:
        problem = (f"is only partly in the local Hub cache {cache} and the Hub cannot be reached "
                   f"({_first_line(err)}); rerun online to complete it")
    except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as err:
        if hf_constants.HF_HUB_OFFLINE:
            problem = (f"is not in the local Hub cache {cache} and HF_HUB_OFFLINE is set: "
                       "download it once online, or unset HF_HUB_OFFLINE")
        else:
            problem = (f"is not in the local Hub cache {cache} and the Hub cannot be reached "
                       f"({_first_line(err)}); check the network or proxy")
    except hf_errors.HFValidationError as err:
        problem = f"is not a valid Hub repo id ({_first_line(err)})"
    except hf_errors.HfHubHTTPError as err:
        problem = f"could not be downloaded: the Hub answered {_first_line(err)}"
    except (*_CLIENT_ERRORS, OSError) as err:
        problem = f"could not be downloaded from the Hub into {cache} ({_first_line(err)})"
    raise RequestError(f"checkpoint {at} {problem}")
