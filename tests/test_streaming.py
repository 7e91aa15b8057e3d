"""video.mp4 encoded while the VAE decodes: `WanVAE.decode_frames(on_frames=...)` reports every frame once,
in order, once final; `postprocess.FrameStream` gives exactly `to_uint8_frames`; `media.Mp4Writer` encodes on
a thread; through the pipeline the streamed video and sha256 are those of the one-shot path, and an error
anywhere leaves neither video.mp4 nor a temporary file nor an encoder thread behind.

CPU, the embedded debug model at 32x32 (one CUDA test, skipped without a GPU).
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cosmos3_compiled.components import embedded_vae_config, init_vae_random_
from cosmos3_compiled.media import Mp4Writer, read_video_frames, write_mp4
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.postprocess import FrameStream, to_uint8_frames
from cosmos3_compiled.progress import set_progress_enabled
from cosmos3_compiled.vae import VAEConfig, WanVAE, build_vae
from helpers import compose_generate

SMALL = ["height=32", "width=32", "num_frames=9", "sampler.num_inference_steps=1", "output.progress=false"]


def _writer_threads() -> list[threading.Thread]:
    """The stream's background threads still alive: the encoder and the frame hasher."""
    return [t for t in threading.enumerate() if t.name.startswith(("mp4-writer", "frame-sha256"))]


def _tiny_vae(device: str = "cpu") -> WanVAE:
    vae = build_vae(VAEConfig.from_dict(embedded_vae_config()), with_encoder=False, device=device)
    return init_vae_random_(vae, 5).eval().requires_grad_(False)


def _latent(t: int, h: int, w: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(1, 48, t, h, w, generator=torch.Generator().manual_seed(t + h + w)).to(device)


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    set_progress_enabled(False)
    yield
    set_progress_enabled(True)


# ------------------------------------------------------------------------------------- decode_frames


@pytest.mark.parametrize(("tiles", "ranges"), [
    (1, [(0, 1), *((f, f + 1) for f in range(1, 9))]),  # frame 0, then each tail frame
    (3, [(0, 9)]),  # column strips: frames are final only after the last strip
], ids=["frames", "strips"])
def test_on_frames_reports_every_frame_once_in_order_when_final(tiles, ranges):
    vae = _tiny_vae()
    vae.tiles = tiles
    z = _latent(3, 2, 3)
    want = vae.decode_frames(z)
    out = torch.full_like(want, float("nan"))
    seen = []

    def on_frames(f0: int, f1: int) -> None:
        seen.append((f0, f1, out[:, :, f0:f1].clone()))  # what the frames hold when reported

    got = vae.decode_frames(z, out=out, on_frames=on_frames)
    assert got is out and torch.equal(got, want)  # the callback changes nothing
    assert [(f0, f1) for f0, f1, _ in seen] == ranges
    for f0, f1, snapshot in seen:
        assert torch.equal(snapshot, want[:, :, f0:f1]), (f0, f1)  # already final when reported


# ----------------------------------------------------------------------------------------- FrameStream


def test_frame_stream_gives_to_uint8_frames_on_cpu():
    video = torch.rand(1, 3, 9, 16, 24, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1
    handed = []
    stream = FrameStream(video, lambda frames, ready: handed.append((frames, ready)))
    for f0, f1 in [(0, 1), (1, 5), (5, 9)]:
        stream(f0, f1)
    frames = stream.result()
    assert torch.equal(frames, to_uint8_frames(video))
    assert [r for _, r in handed] == [None] * 3
    assert torch.equal(torch.cat([f for f, _ in handed]), frames)  # slices of `frames`, in order


def test_frame_stream_rejects_gaps_and_early_results():
    stream = FrameStream(torch.zeros(1, 3, 5, 2, 2), lambda frames, ready: None)
    with pytest.raises(RuntimeError, match="only 0 of 5"):
        stream.result()
    stream(0, 1)
    with pytest.raises(ValueError, match="out of order"):
        stream(2, 5)


# ---------------------------------------------------------------------------------------------- Mp4Writer


def _frames(n: int = 9, h: int = 32, w: int = 48) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([torch.stack([(xx * 5 + t) % 256, (yy * 7 + 2 * t) % 256, (xx + yy) * 3 % 256], -1)
                        for t in range(n)]).to(torch.uint8)


def test_writer_in_pieces_equals_write_mp4(tmp_path):
    # 96x128: at 64 px and below, x264's macroblock-tree rate control (with its assembly) gave different bytes now
    # and then for the same frames when other threads were allocating (see media.py); not at this size or larger
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    frames = torch.stack([torch.stack([xx + 3 * t, 2 * yy + t, xx + yy], -1) for t in range(9)]).to(torch.uint8)
    write_mp4(frames, tmp_path / "one.mp4", fps=24)
    with Mp4Writer(tmp_path / "pieces.mp4", 128, 96, fps=24) as writer:
        for f0, f1 in [(0, 1), (1, 5), (5, 6), (6, 9)]:
            writer.write(frames[f0:f1])
    assert (tmp_path / "one.mp4").read_bytes() == (tmp_path / "pieces.mp4").read_bytes()
    decoded = read_video_frames(tmp_path / "one.mp4")
    assert decoded.shape == (9, 96, 128, 3)
    with av.open(str(tmp_path / "one.mp4")) as container:  # tagged with the matrix and range it was converted with
        ctx = container.streams.video[0].codec_context
        assert (int(ctx.colorspace), int(ctx.color_range)) == (6, 1)  # SMPTE 170M (BT.601), limited range
    mse = ((decoded.astype(np.float64) - frames.numpy()) ** 2).mean()
    assert 10 * np.log10(255**2 / mse) >= 30.0
    assert not _writer_threads()


@pytest.mark.parametrize(("preset", "cabac"), [("ultrafast", b"cabac=0"), ("medium", b"cabac=1")])
def test_preset_reaches_the_encoder(tmp_path, preset, cabac):
    # x264 writes its settings into the stream; ultrafast is the one preset that turns CABAC off
    out = generate(compose_generate([*SMALL, f"output.preset={preset}", "output.crf=23"]), tmp_path)
    raw = (tmp_path / "video.mp4").read_bytes()
    assert cabac in raw and b"crf=23.0" in raw
    assert read_video_frames(tmp_path / "video.mp4").shape == (9, 32, 32, 3) and out.sha256


def test_writer_error_reaches_the_caller(tmp_path, monkeypatch):
    def fail(self, frame):
        raise OSError("disk full")

    monkeypatch.setattr(Mp4Writer, "_encode", fail)
    writer = Mp4Writer(tmp_path / "v.mp4", 48, 32, fps=24)
    with pytest.raises(OSError, match="disk full"):  # a producer learns early, from `write`
        for _ in range(500):
            writer.write(_frames(1))
            time.sleep(0.01)
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert not _writer_threads()


def test_writer_rejects_wrong_frames_and_abort_stops_it(tmp_path):
    writer = Mp4Writer(tmp_path / "v.mp4", 48, 32, fps=24)
    with pytest.raises(ValueError, match=r"uint8 \[n, 32, 48, 3\]"):
        writer.write(_frames(1, 48, 32))
    writer.write(_frames(3))
    writer.abort()  # never raises; the caller deletes the file
    assert not _writer_threads()
    with pytest.raises(RuntimeError, match="after close/abort"):
        writer.write(_frames(1))


# ------------------------------------------------------------------------------------------- pipeline


def test_streamed_video_and_sha_match_the_one_shot_path(tmp_path):
    # 96x128: the two encodes below must be byte-identical, which x264 is not always at 64 px and below (media.py)
    small = [*SMALL, "height=96", "width=128"]
    streamed = generate(compose_generate([*small, "output.frames=uint8"]), tmp_path / "streamed")
    # output.video=false: no stream, the one-shot to_uint8_frames path
    plain = generate(compose_generate([*small, "output.frames=uint8", "output.video=false"]), tmp_path / "plain")
    assert streamed.sha256 == plain.sha256 == hashlib.sha256(plain.frames_uint8.numpy().tobytes()).hexdigest()
    assert torch.equal(streamed.frames_uint8, plain.frames_uint8)
    write_mp4(plain.frames_uint8, tmp_path / "one_shot.mp4", fps=24)
    assert (tmp_path / "streamed" / "video.mp4").read_bytes() == (tmp_path / "one_shot.mp4").read_bytes()
    assert read_video_frames(tmp_path / "one_shot.mp4").shape == (9, 96, 128, 3)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == [
        "frames.safetensors", "metrics.json", "video.mp4"]
    assert set(streamed.metrics["seconds"]) >= {"decode", "postprocess", "save"}
    assert not _writer_threads()


def test_float32_frames_still_come_with_a_streamed_video(tmp_path):
    state = generate(compose_generate([*SMALL, "output.frames=float32"]), tmp_path)
    assert state.frames_float.dtype == torch.float32 and state.frames_float.shape == (9, 32, 32, 3)
    assert torch.equal((state.frames_float * 255).round().to(torch.uint8), state.frames_uint8)
    assert read_video_frames(tmp_path / "video.mp4").shape == (9, 32, 32, 3)


def _assert_nothing_left(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == []  # no video.mp4, no .video.mp4.partial.mp4
    assert not _writer_threads()


def test_error_mid_decode_leaves_nothing(tmp_path, monkeypatch):
    """The one output-cleanup test: Ctrl-C (a BaseException, the hardest case) between two decoded chunks, while
    the streaming encoder holds a partial file: the run fails, the encoder thread stops, nothing is left."""
    calls = []
    real = FrameStream.__call__

    def fail_on_third(self, f0, f1):
        calls.append((f0, f1))
        if len(calls) == 3:
            raise KeyboardInterrupt("mid-decode")
        real(self, f0, f1)

    monkeypatch.setattr(FrameStream, "__call__", fail_on_third)
    with pytest.raises(KeyboardInterrupt, match="mid-decode"):
        generate(compose_generate(SMALL), tmp_path)
    assert len(calls) == 3
    _assert_nothing_left(tmp_path)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("tiles", [1, 2])
def test_cuda_streamed_frames_equal_to_uint8_frames(tmp_path, tiles):
    from cosmos3_compiled.frame_sink import FrameSink

    vae = _tiny_vae("cuda").to(torch.bfloat16)
    vae.tiles = tiles
    z = _latent(4, 2, 3, "cuda")
    stream = FrameSink(tmp_path)
    video = torch.empty(vae.output_shape(tuple(z.shape)), dtype=vae.dtype, device="cuda")
    with stream.aborting():
        vae.decode_frames(z, out=video, on_frames=stream.start(video, fps=24))
    frames = stream.frames_uint8()  # converted on a side stream while the decode went on
    assert frames.is_pinned() and torch.equal(frames, to_uint8_frames(video).cpu())
    assert stream.finish() == tmp_path / "video.mp4"
    assert read_video_frames(tmp_path / "video.mp4").shape == (13, 32, 48, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"] and not _writer_threads()


def test_stream_hasher_matches_hashing_all_frames_at_once():
    import hashlib

    from cosmos3_compiled.postprocess import StreamHasher

    frames = _frames()
    hasher = StreamHasher()
    for f0, f1 in [(0, 1), (1, 5), (5, 9)]:
        hasher(frames[f0:f1])
    assert hasher.hexdigest() == hashlib.sha256(frames.numpy().tobytes()).hexdigest()
    hasher = StreamHasher()
    hasher(frames[:3])
    hasher.abort()
    assert not _writer_threads()
