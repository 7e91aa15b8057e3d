"""Writing frames: H.264 MP4 through PyAV (encoded on a background thread, with an optional AAC sound track), PNG
through Pillow, the waveform as 16-bit PCM WAV (the stdlib `wave`); reading a conditioning clip (a video file
through PyAV, or a folder of image frames) for video-to-video."""

from __future__ import annotations

import queue
import wave
from collections import deque
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

# libx264 threads over whole frames: faster than slice threading for a clip's worth of frames on a many-core host
# (tools/probe_x264.py; measured in docs/benchmarks, Nano section 4). Two encodes of the same frames are
# byte-identical at the sizes tested (96x128 and up). Tiny frames (64 px and below) gave different bytes now and
# then when other threads were allocating, with frame, slice or single-threaded x264 alike, and never with x264's
# macroblock-tree rate control or its assembly turned off: x264 itself, not our threading.
_X264_THREAD_TYPE = "FRAME"
_BT601_MATRIX = 6  # AVCOL_SPC_SMPTE170M
_LIMITED_RANGE = 1  # AVCOL_RANGE_MPEG
_AAC_BIT_RATE = 192_000  # bits per second of the sound track: transparent for stereo AAC-LC
_AUDIO_LAYOUTS = {1: "mono", 2: "stereo"}
_PCM16_SCALE = 32767  # full scale of 16-bit PCM: x in [-1, 1] → round(x · 32767)


class FrameConsumer:
    """A daemon thread that takes (frames, ready) items in order and hands each to `_consume`, so whoever
    produces them (the VAE decode) goes on meanwhile; what Mp4Writer and postprocess.StreamHasher share.

    `ready`: an object whose `synchronize()` the thread calls before it reads the frames (a CUDA event for a
    copy still in flight), or None. `_put` queues (and raises the thread's error early, so a producer stops);
    `_close` waits for the queue, runs `_finish` and re-raises the thread's error; `abort` stops the thread
    without consuming what is still queued, and never raises. `_release` runs on the thread at the end, either
    way. Subclasses set their state first, then call `__init__` here, which starts the thread.
    """

    def __init__(self, name: str, label: str) -> None:
        self._label = label  # for error messages
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (frames, ready) items, then None
        self._aborted = threading.Event()
        self._error: BaseException | None = None
        self._closed = False
        # a daemon: should an owner never close or abort it, the thread must not keep the process alive
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _consume(self, frames: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """After the last item, unless aborted."""

    def _release(self) -> None:
        """Last thing the thread does; may raise (kept as the thread's error if it has none)."""

    def _put(self, frames: torch.Tensor, ready) -> None:
        if self._closed:
            raise RuntimeError(f"{self._label}: write after close/abort")
        if self._error is not None:
            raise self._error
        self._queue.put((frames, ready))

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Stop the thread (what is still queued is dropped); never raises."""
        self._aborted.set()
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                frames, ready = item
                if self._aborted.is_set():
                    continue  # drain without reading: the owner has given up
                if ready is not None:
                    ready.synchronize()
                self._consume(frames)
            if not self._aborted.is_set():
                self._finish()
        except BaseException as err:  # handed to the owner by _put / _close
            self._error = err
        finally:
            try:
                self._release()
            except BaseException as err:
                if self._error is None:
                    self._error = err


class Mp4Writer(FrameConsumer):
    """H.264 (yuv420p) MP4 at `path`, fed uint8 frames [n, H, W, 3] on the host while a background thread
    encodes them, so the caller can go on producing frames (the VAE decode) meanwhile.

    `write` only queues; `close` waits for the queue, flushes the encoder, finishes the file and re-raises
    any error of the encoder thread; `abort` stops the thread without encoding what is still queued (the
    file is left incomplete: the caller deletes it). As a context manager: close on success, abort on error.

    `audio`: (waveform [channels, samples] float in [-1, 1], sampling rate), 1 or 2 channels: an AAC track of the
    whole waveform, encoded after the last video frame (the video stream is encoded exactly as without it).
    """

    def __init__(self, path: Path, width: int, height: int, fps: float, crf: int = 18, preset: str = "medium",
                 audio: tuple[torch.Tensor | np.ndarray, int] | None = None) -> None:
        if width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs an even width and height, got {width}x{height}")
        self.path = Path(path)
        self.size = (height, width)
        self._container = av.open(str(self.path), mode="w", format="mp4")
        try:
            self._stream = self._container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            self._stream.width, self._stream.height, self._stream.pix_fmt = width, height, "yuv420p"
            self._stream.options = {"crf": str(crf), "preset": preset}
            self._stream.codec_context.thread_type = _X264_THREAD_TYPE
            # PyAV converts the RGB frames with swscale's default, the BT.601 matrix into limited ("TV") range.
            # Say so in the stream: untagged, players take HD video (720p and up) for BT.709 and shift its colours.
            self._stream.codec_context.colorspace = _BT601_MATRIX
            self._stream.codec_context.color_range = _LIMITED_RANGE
            self._audio = None
            if audio is not None:
                waveform, rate = audio
                waveform = np.ascontiguousarray(np.asarray(waveform, dtype=np.float32))
                if waveform.ndim != 2 or waveform.shape[0] not in _AUDIO_LAYOUTS:
                    raise ValueError(f"audio must be [1 or 2 channels, samples], got {tuple(waveform.shape)}")
                layout = _AUDIO_LAYOUTS[waveform.shape[0]]
                self._audio_stream = self._container.add_stream("aac", rate=int(rate), layout=layout)
                self._audio_stream.bit_rate = _AAC_BIT_RATE
                self._audio = (waveform, int(rate), layout)
        except BaseException:
            self._container.close()
            raise
        # timings (seconds since the writer opened): when the last frames were ready to encode, when the file
        # was finished; the encoder thread's time inside libx264 calls, and in the final flush alone
        self._opened = time.perf_counter()
        self.timings = {"last_frames_ready": 0.0, "finished": 0.0, "encoding": 0.0, "flush": 0.0}
        super().__init__(f"mp4-writer:{self.path.name}", str(self.path))

    def write(self, frames: torch.Tensor, ready=None) -> None:
        """Queue uint8 frames [n, H, W, 3] (CPU; not to be modified until encoded), `ready` as in
        FrameConsumer. Raises the encoder's error if it has already failed, so a producer stops early."""
        if frames.dtype != torch.uint8 or frames.device.type != "cpu" or frames.ndim != 4 or (
            tuple(frames.shape[1:]) != (*self.size, 3)
        ):
            raise ValueError(
                f"frames must be uint8 [n, {self.size[0]}, {self.size[1]}, 3] on the CPU; "
                f"got {frames.dtype} {tuple(frames.shape)} on {frames.device}"
            )
        self._put(frames, ready)

    def close(self) -> None:
        """Encode everything queued, flush the encoder and finish the file; re-raise the encoder's error."""
        self._close()

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _encode(self, frame: np.ndarray | None) -> None:
        """Encode one frame [H, W, 3] (None: flush the encoder) and mux the packets it gives."""
        av_frame = None if frame is None else av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        for packet in self._stream.encode(av_frame):
            self._container.mux(packet)

    def _consume(self, frames: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.timings["last_frames_ready"] = t0 - self._opened
        for frame in frames.numpy():
            self._encode(frame)
        self.timings["encoding"] += time.perf_counter() - t0

    def _encode_audio(self) -> None:
        """The whole sound track: one planar float frame (PyAV cuts it into the encoder's frames), then the flush."""
        waveform, rate, layout = self._audio
        frame = av.AudioFrame.from_ndarray(waveform, format="fltp", layout=layout)
        frame.sample_rate, frame.pts = rate, 0
        for packet in self._audio_stream.encode(frame):
            self._container.mux(packet)
        for packet in self._audio_stream.encode(None):
            self._container.mux(packet)

    def _finish(self) -> None:
        t0 = time.perf_counter()
        self._encode(None)
        if self._audio is not None:
            self._encode_audio()
        self.timings["flush"] = time.perf_counter() - t0
        self.timings["encoding"] += self.timings["flush"]
        self.timings["finished"] = time.perf_counter() - self._opened

    def _release(self) -> None:
        self._container.close()


def write_mp4(frames: torch.Tensor, path: Path, fps: float, crf: int = 18, preset: str = "medium",
              audio: tuple[torch.Tensor, int] | None = None) -> None:
    """uint8 frames [F, H, W, 3] → H.264 (yuv420p) MP4 at `fps`; H and W must be even. `audio`: as `Mp4Writer`."""
    _, h, w, _ = frames.shape
    with Mp4Writer(path, w, h, fps, crf, preset, audio=audio) as writer:
        writer.write(frames)


def write_wav(waveform: torch.Tensor, rate: int, path: Path) -> None:
    """waveform [channels, samples] in [-1, 1] → 16-bit PCM WAV at `rate`: each sample round(x · 32767), clamped
    to [-1, 1] first (so it reads back within half a step, 1/65534, of the waveform)."""
    x = np.asarray(torch.as_tensor(waveform, dtype=torch.float32).cpu())
    pcm = np.round(np.clip(x, -1.0, 1.0) * _PCM16_SCALE).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(pcm.shape[0])
        f.setsampwidth(2)
        f.setframerate(int(rate))
        f.writeframes(np.ascontiguousarray(pcm.T).tobytes())  # interleaved frames


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV → (waveform [channels, samples] float32 in [-1, 1], sampling rate)."""
    with wave.open(str(path), "rb") as f:
        if f.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * f.getsampwidth()}-bit samples; only 16-bit PCM is read")
        channels, rate = f.getnchannels(), f.getframerate()
        pcm = np.frombuffer(f.readframes(f.getnframes()), dtype="<i2")
    return (pcm.reshape(-1, channels).T.astype(np.float32) / _PCM16_SCALE), rate


def write_png(frame: torch.Tensor, path: Path) -> None:
    Image.fromarray(frame.numpy()).save(str(path), format="PNG")


def read_video_frames(path: Path) -> np.ndarray:
    """Decode an MP4 back to uint8 [F, H, W, 3] (used by tests to check the file plays)."""
    with av.open(str(path)) as container:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)])


# ---- conditioning clips (video-to-video) ------------------------------------------------------------------------


def clip_frame_files(folder: Path) -> list[Path]:
    """A folder clip's frames: its files whose suffix Pillow opens (hidden files skipped), in name order."""
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in readable)


def _pick(items: list, count: int, keep: str) -> list:
    return items[:count] if keep == "first" else items[-count:]


def probe_clip(path: Path, count: int, keep: str) -> None:
    """Raise ValueError (one line) unless `read_clip(path, count, keep)` will find frames: a video file must
    open with a video stream whose first frame decodes; a folder must hold image frames, and the ones that
    will be read must be readable images (headers checked)."""
    path = Path(path)
    if path.is_dir():
        files = clip_frame_files(path)
        if not files:
            raise ValueError(f"video folder {path} holds no image frames")
        for file in _pick(files, count, keep):
            try:
                with Image.open(file) as im:
                    im.verify()
            except Exception as err:
                raise ValueError(f"video frame {file} is not a readable image ({err})") from None
        return
    if not path.is_file():
        raise ValueError(f"video {path} does not exist (a video file or a folder of image frames)")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            first = next(container.decode(video=0), None)
    except Exception as err:
        raise ValueError(f"video {path} is not a readable video ({err})") from None
    if first is None:
        raise ValueError(f"video {path} has no frames")


def read_clip(path: Path, count: int, keep: str) -> list[Image.Image]:
    """The first (`keep="first"`) or last `count` frames of a clip as RGB Pillow images, fewer when the clip is
    shorter. A video file is decoded with PyAV (up to the frames it needs); a folder's frames are its image files
    in name order (`clip_frame_files`)."""
    path = Path(path)
    if path.is_dir():
        frames = []
        for file in _pick(clip_frame_files(path), count, keep):
            with Image.open(file) as im:
                frames.append(im.convert("RGB"))
        return frames
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        decoded: deque = deque(maxlen=count)  # "last": a sliding window over the whole clip
        for frame in container.decode(stream):
            decoded.append(frame)
            if keep == "first" and len(decoded) == count:
                break
        return [frame.to_image() for frame in decoded]
