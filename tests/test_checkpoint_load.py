"""Sharded checkpoints: tools/make_nano_checkpoint.py writes them a shard at a time, `load_transformer` checks
them from the safetensors headers and streams them back, bit for bit the seeded recipe."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import cosmos3_compiled.checkpoint_io as checkpoint_io
from cosmos3_compiled.checkpoint import build_random, load_transformer
from cosmos3_compiled.checkpoint_io import CheckpointError, read_header, stream_tensors, weight_files
from cosmos3_compiled.components import read_checkpoint
from cosmos3_compiled.config import preset

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("make_nano_checkpoint", ROOT / "tools" / "make_nano_checkpoint.py")
make_nano_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_nano_checkpoint)

SEED = 3
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nano") / "ckpt"
    make_nano_checkpoint.main([str(out), "--preset", "debug", "--seed", str(SEED), "--shard-gb", "0.001",
                               "--dtype", "float32"])
    return out


@pytest.fixture
def broken(sharded, tmp_path) -> Path:
    """A private copy of the sharded transformer folder, free to break."""
    return Path(shutil.copytree(sharded / "transformer", tmp_path / "transformer"))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in _shards(folder):
        out.update(load_file(str(path)))
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_writer_layout(sharded):
    folder = sharded / "transformer"
    shards = _shards(folder)
    assert len(shards) >= 2
    assert [p.name for p in shards] == [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                        for i in range(len(shards))]
    assert not list(sharded.rglob(".*.tmp"))  # every file renamed once complete
    index = json.loads((folder / INDEX).read_text())
    tensors = _file_tensors(folder)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            assert all(index["weight_map"][k] == path.name for k in f.keys())
    assert set(index["weight_map"]) == set(tensors)
    spec = read_checkpoint(sharded)
    assert spec.transformer == preset("debug")
    assert (sharded / "model_index.json").is_file() and (sharded / "text_tokenizer").is_dir()


def test_writer_draws_the_seeded_recipe(sharded):
    """The files hold `build_random`'s unfused weights (drawn a shard at a time from one generator)."""
    ref = build_random(preset("debug"), seed=SEED, fuse=False).state_dict()
    tensors = _file_tensors(sharded / "transformer")
    assert list(tensors) and set(tensors) == set(ref)
    assert all(_same(tensors[k], ref[k]) for k in ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_equals_build_random(sharded, dtype):
    stats: dict = {}
    model = load_transformer(sharded / "transformer", dtype=dtype, stats=stats)
    ref = build_random(preset("debug"), seed=SEED, dtype=dtype)  # fused the same way
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    assert set(ours) == set(theirs)
    assert all(_same(ours[k], theirs[k]) for k in theirs)
    assert model.time_embedder.linear_1.weight.dtype == torch.float32
    tensors = _file_tensors(sharded / "transformer")
    assert stats["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert stats["seconds"] > 0


def test_offloaded_text_tower_loads_the_same(sharded):
    model = load_transformer(sharded / "transformer", dtype=torch.float32, offload_text_tower=True)
    ref = build_random(preset("debug"), seed=SEED)
    assert all(_same(p, dict(ref.named_parameters())[k]) for k, p in model.named_parameters())


def test_staged_reader_equals_the_memory_maps(sharded, monkeypatch):
    """The pinned-ring reader (here with plain host buffers, a tiny chunk and two slots, so every tensor is
    several chunks and slots are reused) gives the bytes the safetensors memory maps give, cast where asked."""
    monkeypatch.setattr(checkpoint_io, "_CHUNK_BYTES", 1000)
    monkeypatch.setattr(checkpoint_io, "_SLOTS", 2)
    header = read_header(weight_files(sharded / "transformer"))
    cpu = torch.device("cpu")
    targets = {k: (cpu, torch.bfloat16 if i % 2 else e.dtype) for i, (k, e) in enumerate(header.items())}
    mapped = stream_tensors(header, targets, staged=False)
    ringed = checkpoint_io._Stager(header, list(header), targets, ring=frozenset(header)).run()
    direct = stream_tensors(header, targets, staged=True)  # CPU targets: read straight into their tensors
    assert set(mapped) == set(ringed) == set(direct) == set(header)
    assert all(_same(ringed[k], mapped[k]) and _same(direct[k], mapped[k]) for k in header)


@pytest.mark.parametrize("staged", [False, True])
def test_host_tensors_read_into_the_callers_buffers(sharded, staged):
    """`host_out` (the page-locked text-tower buffers on CUDA): a host key is read into the caller's tensor, the
    file's bytes straight in or cast into it, and the result is that very tensor; other keys as before."""
    header = read_header(weight_files(sharded / "transformer"))
    cpu = torch.device("cpu")
    keys = list(header)
    targets = {k: (cpu, torch.bfloat16 if i % 2 else header[k].dtype) for i, k in enumerate(keys)}
    mine = {k: torch.empty(header[k].shape, dtype=targets[k][1]) for k in keys[:6]}
    got = stream_tensors(header, targets, staged=staged, host_out=mine)
    want = stream_tensors(header, targets, staged=False)
    assert all(got[k] is mine[k] for k in mine)
    assert all(_same(got[k], want[k]) for k in keys)


@pytest.mark.parametrize("readers", [1, 3])
def test_parallel_readers_equal_the_file(tmp_path, monkeypatch, readers):
    """Several reader threads hand chunks over in any order: every tensor (one of no bytes, one of a single chunk,
    several of many chunks spread over two files) arrives whole, cast where asked, in the file order."""
    monkeypatch.setattr(checkpoint_io, "_CHUNK_BYTES", 256)
    monkeypatch.setattr(checkpoint_io, "_SLOTS", 4)
    monkeypatch.setattr(checkpoint_io, "_READERS", readers)
    g = torch.Generator().manual_seed(0)
    first = {"a.empty": torch.zeros(0, 5), "b.small": torch.randn(7, generator=g), "c.big": torch.randn(40, 33, generator=g)}
    second = {"d.big": torch.randn(3, 301, generator=g).to(torch.bfloat16), "e.int": torch.arange(500)}
    save_file(first, str(tmp_path / "m-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "m-00002-of-00002.safetensors"))
    header = read_header(sorted(tmp_path.glob("*.safetensors")))
    cpu = torch.device("cpu")
    targets = {k: (cpu, torch.float32 if k == "d.big" else e.dtype) for k, e in header.items()}
    got = checkpoint_io._Stager(header, list(header), targets, ring=frozenset(header)).run()
    assert list(got) == list(header)
    for k, t in {**first, **second}.items():
        want = t.float() if k == "d.big" else t
        assert got[k].dtype == want.dtype and torch.equal(got[k], want), k


def _trap_data_reads(monkeypatch):
    def trap(*args, **kwargs):
        raise AssertionError("tensor data was read before the checkpoint was checked")

    monkeypatch.setattr(checkpoint_io, "stream_tensors", trap)
    monkeypatch.setattr(checkpoint_io, "_Stager", trap)
    monkeypatch.setattr(checkpoint_io.os, "preadv", trap)


def test_shard_missing_a_key_fails_before_any_data_is_read(broken, monkeypatch):
    first = _shards(broken)[0]
    state = load_file(str(first))
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, str(first), metadata={"format": "pt"})
    _trap_data_reads(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_transformer(broken, dtype=torch.float32)
    msg = str(info.value)
    assert msg.startswith(f"{broken} does not match the model config:")
    assert f"missing keys (1): {dropped}" in msg


def test_every_mismatch_is_reported_at_once(broken, monkeypatch):
    first = _shards(broken)[0]
    state = load_file(str(first))
    a, b, c = sorted(state)[:3]
    state["not_a_weight"] = state.pop(a)
    state[b] = torch.zeros(*state[b].shape, 2)
    del state[c]
    save_file(state, str(first), metadata={"format": "pt"})
    _trap_data_reads(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        load_transformer(broken, dtype=torch.float32)
    msg = str(info.value)
    assert f"missing keys (2): {', '.join(sorted([a, c]))}" in msg
    assert "unexpected keys (1): not_a_weight" in msg
    assert f"shape mismatches (1): {b}: file " in msg


def test_key_in_two_shards_fails_before_any_data_is_read(broken, monkeypatch):
    first, second = _shards(broken)[:2]
    state = load_file(str(second))
    state.update({k: v for k, v in list(load_file(str(first)).items())[:1]})
    save_file(state, str(second), metadata={"format": "pt"})
    _trap_data_reads(monkeypatch)
    with pytest.raises(CheckpointError, match=r"appears in more than one shard \(diffusion_pytorch_model-00002"):
        load_transformer(broken, dtype=torch.float32)


def test_writer_adds_the_action_and_sound_heads(tmp_path, monkeypatch):
    """--action / --sound: the transformer config carries the heads (the sound head sized by the tokenizer config,
    here the tiny one in place of the released 473 M-parameter decoder to keep the test light), the weights load
    strictly with them, and the sound tokenizer written beside them reads back as that config."""
    from cosmos3_compiled import audio

    monkeypatch.setattr(audio, "RELEASED", audio.TINY)
    out = tmp_path / "ckpt"
    make_nano_checkpoint.main([str(out), "--preset", "debug", "--dtype", "float32", "--action", "--sound"])
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert (cfg["action_gen"], cfg["action_dim"], cfg["num_embodiment_domains"]) == (True, 64, 32)
    assert (cfg["sound_gen"], cfg["sound_dim"], cfg["sound_latent_fps"]) == (True, audio.TINY.latent_dim, 25.0)
    model = load_transformer(out / "transformer", dtype=torch.float32)
    assert model.action_proj_in.fc.weight.shape[0] == 32
    assert model.audio_proj_in.weight.shape[1] == audio.TINY.latent_dim
    assert audio.read_audio_config(out / "sound_tokenizer") == audio.TINY
    assert "sound_tokenizer" in json.loads((out / "model_index.json").read_text())


def test_writer_refuses_a_non_empty_folder(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(SystemExit) as info:
        make_nano_checkpoint.main([str(tmp_path / "taken"), "--preset", "debug"])
    assert str(info.value) == f"make_nano_checkpoint: {tmp_path / 'taken'} exists and is not an empty folder; pick a new path"


@pytest.mark.gpu
def test_streams_to_cuda(sharded, monkeypatch):
    """Towards CUDA: pinned ring, several chunks per tensor, cast on the device; the text tower kept on the host."""
    monkeypatch.setattr(checkpoint_io, "_CHUNK_BYTES", 4096)
    stats: dict = {}
    model = load_transformer(sharded / "transformer", dtype=torch.bfloat16, device="cuda", offload_text_tower=True,
                             stats=stats)
    ref = dict(build_random(preset("debug"), seed=SEED, dtype=torch.bfloat16).named_parameters())
    assert stats["path"] == "stream"
    assert model.proj_in.weight.device.type == "cuda" and model.embed_tokens.weight.device.type == "cpu"
    assert all(_same(p.cpu(), ref[k]) for k, p in model.named_parameters())


@pytest.mark.gpu
def test_text_tower_read_straight_into_page_locked_memory(sharded):
    """compile.pin_text_tower with a checkpoint: the text tower is read into page-locked buffers made before the
    read, so page-locking it afterwards finds nothing left to pack; the weights are the file's."""
    from cosmos3_compiled import offload

    model = load_transformer(sharded / "transformer", dtype=torch.bfloat16, device="cuda", offload_text_tower=True,
                             pin_text_tower=True)
    text = offload.text_params(model)
    assert text and all(p.device.type == "cpu" and p.is_pinned() for p in text)
    held = list(model.text_weights.pinned)
    offload.offload_text_tower(model, pin=True)  # page-locking it again: nothing left to pack
    assert [id(b) for b in model.text_weights.pinned] == [id(b) for b in held]
    ref = dict(build_random(preset("debug"), seed=SEED, dtype=torch.bfloat16).named_parameters())
    assert all(_same(p.cpu(), ref[k]) for k, p in model.named_parameters())
