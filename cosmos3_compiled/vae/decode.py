"""The Wan2.2 VAE driver: `WanVAE` runs the decoder one latent frame at a time through its compilable units,
whole-frame, in column strips (`tiles`) or in row blocks over ranks (`setup_row_parallel`); and loading.
Latent frame 0 (the "first chunk") gives 1 output frame, every later one `scale_factor_temporal` (4 for
Wan2.2), so F = 1 + 4 (T - 1)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cosmos3_compiled.checkpoint_io import assign_strict, load_tensors, read_json, weight_files
from cosmos3_compiled.progress import progress
from cosmos3_compiled.vae.config import VAEConfig
from cosmos3_compiled.vae.layers import CausalConv3d, Crops, Decoder, Encoder, Strip, biased


@dataclass(frozen=True)
class RowSplit:
    """Height-parallel decode: this rank (of `world`) runs the full-resolution tail on its block of rows only;
    `gather` concatenates every rank's tensor along dim 0 in rank order (an all-gather)."""

    rank: int
    world: int
    gather: Callable[[Tensor], Tensor]

    def block(self, rows: int) -> tuple[int, int, int]:
        """(rows per rank, start, end) of this rank's block of `rows`; the last blocks may be short or empty."""
        per = -(-rows // self.world)
        a = min(rows, self.rank * per)
        return per, a, min(rows, a + per)


class WanVAE(nn.Module):
    """Wan2.2 VAE with the checkpoint's module names (`encoder.*`, `quant_conv.*`, `post_quant_conv.*`, `decoder.*`).

    `compile_units` names the methods `compile.apply_compile_vae` may replace, per instance, with compiled
    (fullgraph) versions; every decode strategy calls them through `self`. Each takes one input and the causal
    histories, returns (output, histories) and updates given histories in place (a first chunk allocates them):
      * `decoder_first_chunk(x)`: latent frame 0 → 1 frame of patches (runs once; eager is fine)
      * `decoder_head(x, hist[:k])` then 4 × `decoder_tail(frame, src, sub, hist[k:])`: a later latent frame
        (k = `decoder.head_histories`); separate tail calls keep the compiler from interleaving the four
        full-resolution frames, and the head stops before the last temporal block's spatial upsampling, so
        it hands over a quarter of the pixels.
      * `decoder_stem`, `decoder_first_tile`: the column-strip decode's passes (see `_decode_tiles`).
    Patches are [B, 12, t, H/2, W/2], clamped to [-1, 1]. The units read the layout `apply_channels_last_3d()`
    sets: set it before compiling.
    """

    compile_units: tuple[str, ...] = (
        "decoder_first_chunk", "decoder_head", "decoder_tail", "decoder_stem", "decoder_first_tile",
    )

    def __init__(self, cfg: VAEConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if with_encoder else None
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1)) if with_encoder else None
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1))
        self.decoder = Decoder(cfg)
        self.memory_format = torch.contiguous_format
        # > 1: decode in this many column strips, one at a time (see `_decode_tiles`; less memory, same values).
        self.tiles = 1
        self.rows: RowSplit | None = None  # set by `setup_row_parallel`

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def apply_channels_last_3d(self) -> "WanVAE":
        """Store conv weights and activations channels-last (NDHWC), the layout tensor-core convs prefer."""
        self.memory_format = torch.channels_last_3d
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.memory_format = torch.channels_last_3d
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return self

    def setup_row_parallel(self, rank: int, world: int, all_gather: Callable[[Tensor], Tensor]) -> RowSplit:
        """Split every later decode by rows over `world` ranks, each calling this with its rank (see
        `_tail_rows`); `all_gather(x)` must concatenate every rank's x along dim 0 in rank order."""
        if not 0 <= rank < world:
            raise ValueError(f"row-parallel decode: rank {rank} is not in 0..{world - 1}")
        self.rows = RowSplit(rank, world, all_gather)
        return self.rows

    def _stats(self) -> tuple[Tensor, Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] in the VAE dtype, computed like the diffusers pipeline does."""
        dt, dev = self.dtype, self.device
        mean = torch.tensor(self.cfg.latents_mean, dtype=dt, device=dev).view(1, -1, 1, 1, 1)
        inv_std = (1.0 / torch.tensor(self.cfg.latents_std, dtype=dt, device=dev)).view(1, -1, 1, 1, 1)
        return mean, inv_std

    # ---- compilable units

    def decoder_first_chunk(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Latent frame 0 [B, z, 1, h, w] → (patches [B, 12, 1, ·, ·], new histories)."""
        nxt: list[Tensor] = []
        return self.decoder(x, None, nxt, first=True), nxt

    def decoder_head(
        self, x: Tensor, hist: list[Tensor], crops: Crops | None = None, stem: bool = True
    ) -> tuple[tuple[Tensor, Tensor | None], list[Tensor]]:
        """Later latent frame → ((features [B, C, 4, ·, ·], shortcut input) for `decoder_tail`, see
        `Decoder.head`). Column strips: `stem=False`, x = a strip of the stem output, `crops` from its `Strip`,
        hist without the stem's histories."""
        nxt: list[Tensor] = []
        return self.decoder.head(x, hist, nxt, first=False, crops=crops, stem=stem), nxt

    def decoder_tail(
        self, x: Tensor, src: Tensor | None, sub: int, hist: list[Tensor], crops: Crops | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """One frame of head features [B, C, 1, ·, ·] (x, src, sub from `Decoder.tail_frame`) → patches
        [B, 12, 1, ·, ·]; hist = the remaining histories."""
        nxt: list[Tensor] = []
        return self.decoder.tail(x, src, sub, hist, nxt, crops=crops), nxt

    def decoder_first_tile(self, x: Tensor, crops: Crops) -> tuple[Tensor, list[Tensor]]:
        """A column strip of latent frame 0's stem output → (its patches, the strip's new up-path histories)."""
        nxt: list[Tensor] = []
        return self.decoder(x, None, nxt, first=True, crops=crops, stem=False), nxt

    def decoder_stem(self, x: Tensor, hist: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        """Latent frame → stem output; hist None on frame 0 (allocates)."""
        nxt: list[Tensor] = []
        return self.decoder.stem(x, hist, nxt), nxt

    # ---- decode

    def output_shape(self, z_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, 3, F, H, W] of the video that decodes from a latent of `z_shape`."""
        b, _, t, h, w = z_shape
        s = self.cfg.scale_factor_spatial
        return (b, 3, 1 + self.cfg.scale_factor_temporal * (t - 1), h * s, w * s)

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor):
            raise ValueError(f"latent must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 5:
            raise ValueError(f"latent must be [B, {self.cfg.z_dim}, T, h, w]; got rank {z.ndim} shape {tuple(z.shape)}")
        if z.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latent has {z.shape[1]} channels but the VAE's z_dim is {self.cfg.z_dim}; "
                             f"shape {tuple(z.shape)}")
        if min(z.shape) < 1:
            raise ValueError(f"latent has an empty axis (B, T, h and w must be >= 1); shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"latent must be a floating-point tensor, got {z.dtype}")

    @torch.no_grad()
    def decode_frames(
        self, z: Tensor, *, out: Tensor | None = None, progress_desc: str | None = "decode",
        on_frames: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Normalised latent [B, z, T, h, w] → video [B, 3, 1 + 4(T-1), 16h, 16w] in [-1, 1].

        De-normalises like the pipeline (z / (1/std) + mean, in the VAE dtype), applies `post_quant_conv` to
        the whole latent, then decodes one latent frame at a time (whole, in `tiles` column strips or in row
        blocks: the same values each way), unpatchifying each chunk into `out` (VAE dtype when not given).
        `on_frames(f0, f1)`, called on this thread, says output frames [f0, f1) have all their work enqueued
        (on the current stream) and will not be written again, so a consumer can start on them (see
        `postprocess.FrameStream`): every frame once, in order; column strips finish frames only with the
        last strip, so they report them all at the end. `progress_desc=None`: no progress bar.
        """
        self._check_latent(z)
        if self.tiles > 1 and self.rows is not None:
            raise ValueError("column strips (tiles > 1) and a row-parallel decode are two different splits: pick one")
        shape = self.output_shape(tuple(z.shape))
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != shape or not out.is_floating_point() or out.device != self.device:
            raise ValueError(
                f"out must be a floating tensor of shape {shape} on {self.device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        mean, inv_std = self._stats()
        x = self.post_quant_conv.pointwise(z.to(device=self.device, dtype=self.dtype) / inv_std + mean)
        x = biased(x, self.post_quant_conv)
        x = x.contiguous(memory_format=self.memory_format)  # [B, z, T, h, w]
        b, _, t, h, _ = x.shape
        p = self.cfg.patch_size
        st = self.cfg.scale_factor_temporal

        def emit(y: Tensor, i: int, j: int = 0, cols: tuple[int, int] | None = None) -> None:
            """Patches of latent frame i (its j-th output frame onwards) → their pixels in `out`; whole frames
            (no `cols`) are final, so they go to `on_frames`."""
            n, hp, wp = y.shape[2:]
            f0 = 0 if i == 0 else 1 + st * (i - 1) + j
            dst = out[:, :, f0 : f0 + n] if cols is None else out[:, :, f0 : f0 + n, :, p * cols[0] : p * cols[1]]
            # Unpatchify into place: patch channel c·p² + col·p + row → pixel (h·p + row, w·p + col).
            dst.view(b, 3, n, hp, p, wp, p).copy_(y.view(b, 3, p, p, n, hp, wp).permute(0, 1, 4, 5, 3, 6, 2))
            if on_frames is not None and cols is None:
                on_frames(f0, f0 + n)

        if self.tiles > 1:
            self._decode_tiles(x, emit, progress_desc)
            if on_frames is not None:
                on_frames(0, shape[2])
            return out
        dec = self.decoder
        k = dec.head_histories
        rows = None if self.rows is None else self._row_block(h)
        hist: list[Tensor] = []
        for i in progress(range(t), desc=progress_desc, total=t):
            xi = self._frame(x, i)
            if i == 0:
                y, hist = self.decoder_first_chunk(xi)
                emit(y, i)
                if rows is not None:  # the tail's histories: this block's rows of the whole frame's (freed)
                    lo, hi = rows[2].src
                    hist[k:] = [g[:, :, :, lo * (s := g.shape[3] // rows[1]) : hi * s].clone(
                        memory_format=self.memory_format) for g in hist[k:]]
                continue
            (feats, src), _ = self.decoder_head(xi, hist[:k])
            for j in range(feats.shape[2]):
                if rows is None:
                    y, _ = self.decoder_tail(*dec.tail_frame(feats, src, j), hist[k:])
                else:
                    y = self._tail_rows(*dec.tail_frame(feats, src, j), hist[k:], *rows)
                emit(y, i, j)
            del feats, src
        return out

    def _frame(self, x: Tensor, i: int) -> Tensor:
        """Latent frame i of x [B, C, T, h, w] as its own tensor in the decoder's layout: a unit's input strides
        then do not depend on T, so the compiled units of one frame size serve every clip length (a slice's
        strides would be guarded on and recompile per length)."""
        return x[:, :, i : i + 1].clone(memory_format=self.memory_format)

    def _row_block(self, h: int) -> tuple[int, int, Strip]:
        """This rank's block for a latent of h rows: (tail-input rows per rank, of the whole frame, its `Strip`
        there: rows read, rows owned in patches)."""
        dec = self.decoder
        r = dec.upscale(dec.tail_first)  # patch rows per tail-input row
        rows0 = h * dec.upscale() // r
        per, a, b = self.rows.block(rows0)
        return per, rows0, dec.span((a * r, b * r), rows0, tail=True)

    def _tail_rows(
        self, x: Tensor, src: Tensor | None, sub: int, hist: list[Tensor], per: int, rows0: int, strip: Strip
    ) -> Tensor:
        """Row-parallel tail: every rank runs the stem and head in full (low resolution; the mid block's
        attention is frame-global), then only its rows, plus the halo `strip` reads, through the
        full-resolution tail; one all-gather per output frame reassembles the whole frame on every rank."""
        (lo, hi), (a, b) = strip.src, strip.dst
        fmt = self.memory_format
        xs = x[:, :, :, lo:hi].contiguous(memory_format=fmt)
        src = None if src is None else src[:, :, :, lo:hi].contiguous(memory_format=fmt)
        y, _ = self.decoder_tail(xs, src, sub, hist)  # [B, 12, 1, (hi - lo)·r, W]
        r = y.shape[3] // (hi - lo)
        core = y[:, :, :, a - lo * r : b - lo * r]
        # the last blocks may be short: pad so every rank sends the same size
        core = F.pad(core, (0, 0, 0, per * r - (b - a)))
        return self.rows.gather(core.movedim(3, 0)).movedim(0, 3)[:, :, :, : rows0 * r]

    def _decode_tiles(self, x: Tensor, emit, progress_desc: str) -> None:
        """Tile-major decode: the stem (conv_in + mid block) for every latent frame first, kept whole (small:
        latent resolution); then each column strip of `decoder.column_tiles` through the up path for every
        frame, with its own causal histories, so only one strip's histories are ever live. Same ops on the
        same values as the whole-frame decode, minus a halo's worth of repeated columns per strip."""
        b, _, t, h, w = x.shape
        dec = self.decoder
        stem = None
        hist: list[Tensor] | None = None
        for i in range(t):
            y, hist = self.decoder_stem(self._frame(x, i), hist)
            if stem is None:
                shape = (b, y.shape[1], t, h, w)
                stem = torch.empty(shape, dtype=y.dtype, device=y.device, memory_format=self.memory_format)
            stem[:, :, i : i + 1] = y
        del hist, y
        tiles = dec.column_tiles(w, self.tiles)
        k = dec.head_histories - dec.stem_histories
        for n in progress(range(len(tiles) * t), desc=progress_desc, total=len(tiles) * t):
            tile, i = tiles[n // t], n % t
            xi = self._frame(stem[:, :, :, :, tile.src[0] : tile.src[1]], i)
            if i == 0:
                hist = None  # the previous strip's histories go before this strip allocates its own
                y, hist = self.decoder_first_tile(xi, tile.crops)
                emit(y, i, cols=tile.dst)
                continue
            feats, src = self.decoder_head(xi, hist[:k], tile.crops, stem=False)[0]  # (the returned
            for j in range(feats.shape[2]):  # histories are `hist` itself: not kept, so a strip's die with it)
                y = self.decoder_tail(*dec.tail_frame(feats, src, j), hist[k:], tile.crops)[0]
                emit(y, i, j, tile.dst)
            del feats, src

    # ---- encode

    def _encoder_chunk(self, x: Tensor, prev: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        nxt: list[Tensor] = []
        y = self.encoder(x, prev, nxt)
        z = self.cfg.z_dim  # mode() of the posterior = the first z channels of quant_conv's output
        return F.conv3d(y, self.quant_conv.weight[:z], self.quant_conv.bias[:z]), nxt

    @torch.no_grad()
    def encode_mode(self, video: Tensor) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 1 + 4k, H and W multiples of 16) → normalised latent
        [B, z, 1 + (F-1)/4, H/16, W/16]: the posterior mode, (mu - mean) · (1/std), like the pipeline."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded with with_encoder=False; reload it with the encoder to encode")
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W]; got {tuple(getattr(video, 'shape', ()))}")
        b, _, f, hh, ww = video.shape
        st, s, p = self.cfg.scale_factor_temporal, self.cfg.scale_factor_spatial, self.cfg.patch_size
        if b < 1 or f < 1 or (f - 1) % st or hh < s or ww < s or hh % s or ww % s:
            raise ValueError(
                f"video shape {tuple(video.shape)}: need frames = 1 + {st}k and height/width positive multiples of {s}"
            )
        x = rearrange(video.to(device=self.device, dtype=self.dtype), "b c f (h r) (w q) -> b (c q r) f h w", r=p, q=p)
        x = x.contiguous(memory_format=self.memory_format)
        t = 1 + (f - 1) // st
        lat = torch.empty(b, self.cfg.z_dim, t, hh // s, ww // s, dtype=self.dtype, device=self.device)
        hist: list[Tensor] | None = None
        for i in range(t):
            xi = x[:, :, :1] if i == 0 else x[:, :, 1 + st * (i - 1) : 1 + st * i]
            mu, hist = self._encoder_chunk(xi, hist)
            lat[:, :, i : i + 1] = mu
        mean, inv_std = self._stats()
        return lat.sub_(mean).mul_(inv_std).to(video.dtype)


def build_vae(cfg: VAEConfig, with_encoder: bool = True, device: str | torch.device = "meta") -> WanVAE:
    with torch.device(device):
        return WanVAE(cfg, with_encoder=with_encoder)


def load_vae(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    with_encoder: bool = True,
    channels_last_3d: bool = False,
    cfg: VAEConfig | None = None,
) -> WanVAE:
    """Load the Wan2.2 VAE from a checkpoint folder (its `vae/` subfolder, or a `vae/` folder itself).

    Safetensors only, strict: every key must match diffusers' `AutoencoderKLWan` state dict. With
    `with_encoder=False` the encoder weights are skipped (decode-only, less memory). `cfg`: the folder's
    config already parsed (else read here).
    """
    folder = Path(folder)
    vae_dir = folder / "vae" if (folder / "vae").is_dir() else folder
    if cfg is None:
        cfg = VAEConfig.from_dict(read_json(vae_dir / "config.json"), where=str(vae_dir / "config.json"))
    model = build_vae(cfg, with_encoder=with_encoder)
    state = load_tensors(weight_files(vae_dir), device=device)
    ignore = frozenset() if with_encoder else frozenset(k for k in state if k.startswith(("encoder.", "quant_conv.")))
    assign_strict(model, state, dtype, ignore=ignore, where=str(vae_dir))
    model.eval().requires_grad_(False)
    return model.apply_channels_last_3d() if channels_last_3d else model
