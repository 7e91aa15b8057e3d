"""`checkpoint=` as a Hub id, resolved offline against a Hub cache this test lays out on disk (no network)."""

import re

import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors

from cosmos3_compiled.components import read_checkpoint, write_checkpoint
from cosmos3_compiled import hub
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.hub import ALLOW_PATTERNS, resolve_checkpoint

REPO = "acme/cosmos3-tiny"
MAIN, FP8 = "1" * 40, "2" * 40


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One tiny official-layout checkpoint, written once and copied into each snapshot."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", name="debug", seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch, checkpoint):
    """<cache>/models--acme--cosmos3-tiny with refs main and fp8, each a snapshot folder of plain files."""
    repo = tmp_path / "hub" / ("models--" + REPO.replace("/", "--"))
    for ref, commit in (("main", MAIN), ("fp8", FP8)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline: the library reads the ref file verbatim
        snapshot = repo / "snapshots" / commit
        for src in checkpoint.rglob("*"):
            if src.is_file():
                dst = snapshot / src.relative_to(checkpoint)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(src.read_bytes())
    # huggingface_hub reads these at import, so the module attributes are what counts; the env vars are for
    # anything started from here
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return repo


def test_hub_id_resolves_to_its_snapshot(cache):
    assert resolve_checkpoint(REPO) == cache / "snapshots" / MAIN
    assert resolve_checkpoint(REPO, revision="fp8") == cache / "snapshots" / FP8
    assert resolve_checkpoint(REPO, revision=FP8) == cache / "snapshots" / FP8  # a commit, looked up directly


def test_resolved_snapshot_reads_as_a_checkpoint(cache):
    spec = read_checkpoint(resolve_checkpoint(REPO))
    assert spec.folder == (cache / "snapshots" / MAIN).resolve()
    assert spec.transformer.vocab_size == 1024  # the debug preset


def test_offline_miss_is_one_line_naming_the_id_and_cache(cache):
    with pytest.raises(RequestError) as info:
        resolve_checkpoint("acme/not-cached")
    msg = str(info.value)
    assert "\n" not in msg and "acme/not-cached" in msg and hf_constants.HF_HUB_CACHE in msg
    assert "not in the local Hub cache" in msg and "HF_HUB_OFFLINE is set" in msg
    assert info.value.__cause__ is None and info.value.__context__ is None  # no library traceback behind it
    with pytest.raises(RequestError, match=r"^checkpoint acme/cosmos3-tiny@bf16 is not in the local Hub cache"):
        resolve_checkpoint(REPO, revision="bf16")


@pytest.mark.parametrize("spec", ["/models/x", "./x", "a/b/c", ".hidden/x", "~/no-such-cosmos3-folder"])
def test_missing_path_is_refused(cache, spec):
    with pytest.raises(RequestError, match=rf"^checkpoint folder {re.escape(spec)} does not exist$"):
        resolve_checkpoint(spec)


def test_folder_is_used_as_is_and_refuses_a_revision(checkpoint):
    assert resolve_checkpoint(str(checkpoint)) == checkpoint
    with pytest.raises(RequestError) as info:
        resolve_checkpoint(str(checkpoint), revision="fp8")
    assert str(info.value) == f"checkpoint_revision=fp8 applies to hub ids only; {checkpoint} is a folder"


def test_an_existing_relative_folder_wins_over_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "acme" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("acme/local").resolve() == (tmp_path / "acme" / "local").resolve()


def test_only_what_the_pipeline_reads_is_downloaded():
    assert "model_index.json" in ALLOW_PATTERNS and "transformer/*.safetensors" in ALLOW_PATTERNS
    assert "text_tokenizer/*.json" in ALLOW_PATTERNS and "sound_tokenizer/*.model" in ALLOW_PATTERNS
    assert not [p for p in ALLOW_PATTERNS if p.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl", "*"))]


def _error(cls, text="404 Client Error.\nRepository Not Found for url: https://hub.example/api/models/acme/x"):
    """An instance without the HTTP response the library's constructors want (their signatures differ by version)."""
    err = cls.__new__(cls)
    Exception.__init__(err, text)
    return err


@pytest.mark.parametrize("err, line", [
    (_error(hf_errors.GatedRepoError), "checkpoint acme/x@fp8 is a gated Hub repo: accept its terms"),
    (_error(hf_errors.RepositoryNotFoundError), "checkpoint acme/x@fp8 is neither a folder here nor a Hub model repo"),
    (_error(hf_errors.RevisionNotFoundError), "checkpoint acme/x has no revision 'fp8' on the Hub"),
    (_error(hf_errors.HfHubHTTPError, "500 Server Error\nboom"), "checkpoint acme/x@fp8 could not be downloaded: "
                                                                   "the Hub answered HfHubHTTPError: 500 Server Error"),
    (hf_errors.LocalEntryNotFoundError("no connection\nretry"), "checkpoint acme/x@fp8 is not in the local Hub cache"),
    (OSError(28, "No space left on device"), "checkpoint acme/x@fp8 could not be downloaded from the Hub into"),
])
def test_online_failures_are_one_line(monkeypatch, err, line):
    def fail(**kwargs):
        raise err
    monkeypatch.setattr(hub, "snapshot_download", fail)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(RequestError) as info:
        resolve_checkpoint("acme/x", revision="fp8")
    assert str(info.value).startswith(line) and "\n" not in str(info.value)
