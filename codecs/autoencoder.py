"""`ae`: autoencoder compression of updates (seeds 000/001) with a quantized latent, error feedback and a sparse correction.

The collaborator trains an autoencoder in the prepass (`collaborator/prepass.py`) and keeps the
encoder and the decoder in its uplink CodecState; the aggregator receives only the decoder
(`UploadDecoder`, safetensors) and installs it in that collaborator's uplink CodecState.

Two things can be encoded (`what`):

- `update` (the default, the hybrid): e = x + memory, the update plus the error-feedback memory.
  The encoder sees e / rms(e); the receiver gets alpha * Dec(q(z)) where alpha is the least
  squares scale of the decoded direction, so the AE part never makes the error larger than
  sending nothing. The residual e - alpha * Dec(q(z)) is corrected at its `k` largest entries
  (sign and one shared magnitude, positions Golomb-Rice coded), and whatever is still missing stays
  in the sender's memory (error feedback), so the AE's drift does not accumulate.
- `weights` (the paper's literal method): the local model itself goes through the AE, no scale,
  no memory; `correction` is 0 unless set.

Variants (`variant`):

- `dense`: the paper's fully connected funnel, input and output = the number of parameters,
  hidden sizes `hidden` (mirrored in the decoder), latent `latent`.
- `chunked`: the flat vector is cut into `chunk`-sized pieces (zero padded) that share one small
  dense AE with `latent` values per chunk; the decoder's size does not grow with the model.
- `conv`: a 1-D convolutional AE over the whole flat vector (seed 001 section 4.3, zero padded to a
  multiple of stride^layers): Conv1d layers of width `kernel` and step `stride`, channels 1 ->
  `hidden` -> `latent`, tanh between them; the decoder mirrors them with ConvTranspose1d. The latent is
  `latent` channels of ceil(n / stride^layers) values; the decoder has
  sum(c_in * c_out * kernel + c_out) parameters, whatever n.

Wire format of the stage (side header | body; the stage emits bytes, nothing else is appended):

    side: alpha bf16 | lo bf16 | hi bf16 | k varint | rice u8 | magnitude bf16
    body: latent (bits each, MSB first) | k Golomb-Rice code words (interleaved, positions.py) | k sign bits

The networks run in numpy here (both sides run the same code); the torch training lives in the
prepass. Decoders travel as safetensors only, with the tensor names and shapes of
`decoder_shapes()`; `validate_decoder` checks an upload against them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args

import numpy as np

from .base import (
    BytesSpec,
    Codec,
    Data,
    SideReader,
    SideWriter,
    Spec,
    StageState,
    StageUpdate,
    register_codec,
    require_array_spec,
)
from .cast import from_bf16, to_bf16
from .ef import remember, with_memory
from .errors import CodecError
from .positions import decode_interleaved, encode_interleaved
from .sparse import top_indices

if TYPE_CHECKING:
    from .chain import Chain
    from .layout import Layout

Variant = Literal["dense", "chunked", "conv"]
What = Literal["update", "weights"]
KINDS: tuple[str, ...] = get_args(Variant)  # the allow-list of decoder architectures
WHAT: tuple[str, ...] = get_args(What)
MAX_HIDDEN_LAYERS = 4
MAX_WIDTH = 1 << 16
MAX_KERNEL = 1 << 13
#: Sender-side state key: the NMSE of the AE part (alpha * Dec(z)) against the stage's input, last message.
AE_NMSE = "ae_nmse"


# -- the networks, in numpy --------------------------------------------------------------------------
def layer_sizes(variant: str, n: int, hidden: list[int], latent: int, chunk: int) -> list[int]:
    """Encoder widths (channels for `conv`), input first; the decoder mirrors them."""
    d_in = {"dense": n, "chunked": chunk, "conv": 1}[variant]
    return [d_in, *hidden, latent]


def decoder_shapes(sizes: list[int], kernel: int = 0) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the decoder: torch's Linear (out, in), or with `kernel` ConvTranspose1d (in, out, kernel)."""
    dec = list(reversed(sizes))
    out: dict[str, tuple[int, ...]] = {}
    for j, (a, b) in enumerate(zip(dec[:-1], dec[1:], strict=True)):
        out[f"dec.{j}.weight"] = (a, b, kernel) if kernel else (b, a)
        out[f"dec.{j}.bias"] = (b,)
    return out


def encoder_shapes(sizes: list[int], kernel: int = 0) -> dict[str, tuple[int, ...]]:
    """Linear (out, in), or with `kernel` Conv1d (out, in, kernel)."""
    out: dict[str, tuple[int, ...]] = {}
    for j, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        out[f"enc.{j}.weight"] = (b, a, kernel) if kernel else (b, a)
        out[f"enc.{j}.bias"] = (b,)
    return out


def conv1d(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """torch's Conv1d(padding=(kernel - stride) / 2): x (batch, c_in, L), L a multiple of stride -> (batch, c_out, L / stride)."""
    k = w.shape[2]
    pad = (k - stride) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, k, axis=2)[:, :, ::stride]
    out: np.ndarray = np.einsum("bcmk,ock->bom", windows, w, optimize=True) + b[None, :, None]
    return out


def conv_transpose1d(z: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """torch's ConvTranspose1d(padding=(kernel - stride) / 2): z (batch, c_in, m) -> (batch, c_out, m * stride)."""
    batch, _, m = z.shape
    c_out, k = w.shape[1], w.shape[2]
    pad = (k - stride) // 2
    blocks = -(-k // stride)
    contrib = np.einsum("bcm,cok->bomk", z, w, optimize=True)  # every input's kernel-wide footprint
    contrib = np.pad(contrib, ((0, 0), (0, 0), (0, 0), (0, blocks * stride - k)))
    out = np.zeros((batch, c_out, (m + blocks) * stride), contrib.dtype)
    for r in range(blocks):  # overlapping footprints: one strided add per stride-wide slice of the kernel
        part = contrib[:, :, :, r * stride : (r + 1) * stride].reshape(batch, c_out, m * stride)
        out[:, :, r * stride : r * stride + m * stride] += part
    cropped: np.ndarray = out[:, :, pad : pad + m * stride] + b[None, :, None]
    return cropped


def _convnet(tensors: StageState, prefix: str, layers: int, x: np.ndarray, stride: int) -> np.ndarray:
    """Conv1d (encoder) or ConvTranspose1d (decoder) layers with tanh between them."""
    op = conv1d if prefix == "enc" else conv_transpose1d
    h = x
    for j in range(layers):
        h = op(h, tensors[f"{prefix}.{j}.weight"], tensors[f"{prefix}.{j}.bias"], stride)
        if j < layers - 1:
            h = np.tanh(h)
    return h.astype(np.float32, copy=False)


def _mlp(tensors: StageState, prefix: str, layers: int, x: np.ndarray) -> np.ndarray:
    """Linear layers with tanh between them (none after the last), rows are samples."""
    h = x
    for j in range(layers):
        w, b = tensors[f"{prefix}.{j}.weight"], tensors[f"{prefix}.{j}.bias"]
        h = h @ w.T + b
        if j < layers - 1:
            h = np.tanh(h)
    return h.astype(np.float32, copy=False)


def _quantize(z: np.ndarray, bits: int) -> tuple[float, float, np.ndarray]:
    if z.size == 0:
        return 0.0, 0.0, np.zeros(0, np.int64)
    lo, hi = float(np.float32(z.min())), float(np.float32(z.max()))
    levels = (1 << bits) - 1
    if not hi > lo:
        return lo, lo, np.zeros(z.shape, np.int64)
    q = np.rint((z - lo) / (hi - lo) * levels)
    return lo, hi, np.minimum(np.maximum(q, 0.0), float(levels)).astype(np.int64)


def _dequantize(q: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    levels = (1 << bits) - 1
    return (np.float32(lo) + q.astype(np.float32) * np.float32((hi - lo) / levels)).astype(np.float32)


def _bf16(v: float) -> bytes:
    """A float as bfloat16 (rounded to nearest even), little-endian."""
    return to_bf16(np.array([v], np.float32)).astype("<u2").tobytes()


def _from_bf16(b: bytes) -> float:
    return float(from_bf16(np.frombuffer(b, dtype="<u2"))[0])


def _round_bf16(v: float) -> float:
    return _from_bf16(_bf16(float(v)))


def _pack(values: np.ndarray, width: int) -> np.ndarray:
    shifts = np.arange(width - 1, -1, -1)
    return ((values[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)


def _unpack(bits: np.ndarray, width: int) -> np.ndarray:
    if bits.size == 0:
        return np.zeros(0, np.int64)
    return bits.reshape(-1, width).astype(np.int64) @ (1 << np.arange(width - 1, -1, -1))


# -- the codec ---------------------------------------------------------------------------------------
@dataclass
class AutoencoderSettings:
    """What the autoencoder is: the `ae` stage's parameters, and the same keys in a plan's `prepass` section.

    The one definition of these settings: the codec takes them from its chain config, the plan's
    `PrepassSpec` inherits them (fedsqueeze/plan.py), and `chain_with_prepass` merges one into the other.
    """

    variant: Variant = "dense"  # the paper's FC funnel | one small AE shared by fixed-size chunks
    what: What = "update"  # update (hybrid, error feedback) | weights (the paper's literal method)
    # funnel hidden widths, encoder side (mirrored in the decoder)
    hidden: list[int] = field(default_factory=list)
    latent: int = 32  # latent size (per chunk for `chunked`)
    bits: int = 8  # bits per latent value on the wire (1..8)
    correction: float = 0.002  # fraction of entries of the residual sent as a sparse correction
    chunk: int = 1024  # chunk length for `chunked`
    stride: int = 64  # `conv`: each layer's step (the latent is n / stride^layers long per channel)
    kernel: int = 128  # `conv`: each layer's kernel width (>= stride, kernel - stride even)
    # update mode, linear decoder: the latent is the least-squares fit, not the encoder's guess
    refine: bool = True

    def __post_init__(self) -> None:
        if self.variant not in KINDS:
            raise CodecError(f"ae: variant must be one of {KINDS}, got {self.variant!r}")
        if self.what not in WHAT:
            raise CodecError(f"ae: what must be one of {WHAT}, got {self.what!r}")
        if (
            not isinstance(self.hidden, list)
            or len(self.hidden) > MAX_HIDDEN_LAYERS
            or any(
                isinstance(h, bool) or not isinstance(h, int) or not 1 <= h <= MAX_WIDTH for h in self.hidden
            )
        ):
            raise CodecError(
                f"ae: hidden must be a list of at most {MAX_HIDDEN_LAYERS} widths in [1, {MAX_WIDTH}]"
            )
        if (
            isinstance(self.latent, bool)
            or not isinstance(self.latent, int)
            or not 1 <= self.latent <= MAX_WIDTH
        ):
            raise CodecError(f"ae: latent must be an integer in [1, {MAX_WIDTH}]")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise CodecError("ae: bits must be an integer in [1, 8]")
        if (
            isinstance(self.correction, bool)
            or not isinstance(self.correction, int | float)
            or not 0 <= self.correction <= 1
        ):
            raise CodecError("ae: correction must be a fraction in [0, 1]")
        if not isinstance(self.refine, bool):
            raise CodecError("ae: refine must be true or false")
        if (
            isinstance(self.chunk, bool)
            or not isinstance(self.chunk, int)
            or not 1 <= self.chunk <= MAX_WIDTH
        ):
            raise CodecError(f"ae: chunk must be an integer in [1, {MAX_WIDTH}]")
        for name in ("stride", "kernel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_KERNEL:
                raise CodecError(f"ae: {name} must be an integer in [1, {MAX_KERNEL}]")
        if self.kernel < self.stride or (self.kernel - self.stride) % 2:
            raise CodecError(
                f"ae: kernel ({self.kernel}) must be at least stride ({self.stride}) and differ from it by an even number"
            )


@register_codec
@dataclass
class Autoencoder(AutoencoderSettings, Codec):
    codec_id: ClassVar[str] = "ae"
    stateful: ClassVar[bool] = True
    output_kind: ClassVar[str] = "bytes"
    #: The aggregator installs an uploaded decoder into this stage's state.
    accepts_decoder: ClassVar[bool] = True

    # -- architecture ------------------------------------------------------------------------------
    def sizes(self, n: int) -> list[int]:
        return layer_sizes(self.variant, n, self.hidden, self.latent, self.chunk)

    def architecture(self, n: int) -> dict[str, Any]:
        """The DecoderArchitecture for a model of n parameters: an allow-listed kind and its sizes."""
        sizes: dict[str, int] = {"input": n, "latent": self.latent, "layers": len(self.hidden)}
        sizes.update({f"hidden_{i}": h for i, h in enumerate(self.hidden)})
        if self.variant == "chunked":
            sizes["chunk"] = self.chunk
        if self.variant == "conv":
            sizes.update(kernel=self.kernel, stride=self.stride)
        return {"kind": self.variant, "sizes": sizes}

    def get_config(self) -> dict[str, Any]:
        """stride and kernel only for `conv`: dense and chunked chains keep their configs and fingerprints."""
        config = super().get_config()
        if self.variant != "conv":
            del config["stride"], config["kernel"]
        return config

    @property
    def _kernel(self) -> int:
        return self.kernel if self.variant == "conv" else 0

    def decoder_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return decoder_shapes(self.sizes(n), self._kernel)

    def encoder_shapes(self, n: int) -> dict[str, tuple[int, ...]]:
        return encoder_shapes(self.sizes(n), self._kernel)

    def decoder_nbytes(self, n: int) -> int:
        return 4 * sum(math.prod(s) for s in self.decoder_shapes(n).values())

    def num_chunks(self, n: int) -> int:
        """Rows of the latent: 1 (dense), chunks (chunked), or each latent channel's length (conv)."""
        if self.variant == "conv":
            return max(1, -(-n // self.downsampling))
        return 1 if self.variant == "dense" else -(-n // self.chunk)

    @property
    def downsampling(self) -> int:
        """conv: how many inputs one latent value stands for (stride^layers)."""
        return int(self.stride ** self._layers())

    def padded_length(self, n: int) -> int:
        if self.variant == "conv":
            return self.num_chunks(n) * self.downsampling
        return n if self.variant == "dense" else self.num_chunks(n) * self.chunk

    def latent_count(self, n: int) -> int:
        return self.latent * self.num_chunks(n)

    def max_k(self, n: int) -> int:
        return min(n, int(math.ceil(self.correction * n - 1e-9)))

    @property
    def error_feedback(self) -> bool:
        return self.what == "update"

    # -- the networks --------------------------------------------------------------------------------
    def _layers(self) -> int:
        return len(self.hidden) + 1

    def _rows(self, v: np.ndarray, n: int) -> np.ndarray:
        if self.variant == "dense":
            return v.reshape(1, n)
        rows = np.zeros(self.padded_length(n), np.float32)
        rows[:n] = v
        return rows.reshape(1, 1, -1) if self.variant == "conv" else rows.reshape(-1, self.chunk)

    def encode_latent(self, state: StageState, v: np.ndarray) -> np.ndarray:
        n = v.size
        if self.variant == "conv":
            return _convnet(state, "enc", self._layers(), self._rows(v, n), self.stride).reshape(-1)
        return _mlp(state, "enc", self._layers(), self._rows(v, n)).reshape(-1)

    def can_fit(self) -> bool:
        """Whether the least-squares latent applies: a linear decoder."""
        return self.refine and not self.hidden

    def _fit_conv(self, state: StageState, v: np.ndarray, iterations: int = 100) -> np.ndarray:
        """Least squares for the linear conv decoder by conjugate gradients on the normal equations (CGLS):
        the decoder D is a ConvTranspose1d, so D^T is the Conv1d with the same kernel; no matrix is formed."""
        n, m, s = v.size, self.num_chunks(v.size), self.stride
        w = state["dec.0.weight"].astype(np.float64)  # ConvTranspose1d (in=latent, out=1, kernel)
        w_adj = np.ascontiguousarray(w)  # the same array read as Conv1d (out=latent, in=1, kernel)
        no_bias_out, no_bias_in = np.zeros(1), np.zeros(self.latent)

        def forward(z: np.ndarray) -> np.ndarray:
            return conv_transpose1d(z.reshape(1, self.latent, m), w, no_bias_out, s).reshape(-1)[:n]

        def adjoint(r: np.ndarray) -> np.ndarray:
            padded = np.zeros((1, 1, self.padded_length(n)))
            padded[0, 0, :n] = r
            return conv1d(padded, w_adj, no_bias_in, s).reshape(-1)

        r = v.astype(np.float64) - float(state["dec.0.bias"][0])
        z = np.zeros(self.latent * m)
        g = adjoint(r)
        d, gg = g.copy(), float(g @ g)
        stop = 1e-12 * gg
        for _ in range(iterations):
            if gg <= stop:
                break
            q = forward(d)
            step = gg / float(q @ q)
            z += step * d
            r -= step * q
            g = adjoint(r)
            gg, previous = float(g @ g), gg
            d = g + (gg / previous) * d
        return z.astype(np.float32)

    def fit_latent(self, state: StageState, v: np.ndarray) -> np.ndarray:
        """The latent whose (linear) decoding is closest to v: least squares, sender side only."""
        n = v.size
        if self.variant == "conv":
            return self._fit_conv(state, v)
        w = state["dec.0.weight"].astype(np.float64)
        rows = self._rows(v, n).astype(np.float64) - state["dec.0.bias"]
        z, *_ = np.linalg.lstsq(w, rows.T, rcond=None)
        return z.T.reshape(-1).astype(np.float32)

    def decode_latent(self, state: StageState, z: np.ndarray, n: int) -> np.ndarray:
        if self.variant == "conv":
            out = _convnet(state, "dec", self._layers(), z.reshape(1, self.latent, -1), self.stride)
            return out.reshape(-1)[:n].astype(np.float32, copy=False)
        rows = _mlp(state, "dec", self._layers(), z.reshape(self.num_chunks(n), self.latent))
        return rows.reshape(-1)[:n].astype(np.float32, copy=False)

    def _require(self, state: StageState, shapes: dict[str, tuple[int, ...]], what: str) -> None:
        missing = [k for k in shapes if k not in state]
        if missing:
            raise CodecError(f"ae: no {what} installed (missing {missing[0]}): the prepass must run first")

    # -- Codec interface ------------------------------------------------------------------------------
    def encode(self, x: Data, spec: Spec, state: StageState) -> tuple[bytes, Data]:
        aspec = require_array_spec(spec, "ae")
        arr = aspec.check(x, "ae input")
        n = aspec.count
        self._require(state, self.encoder_shapes(n), "encoder")
        self._require(state, self.decoder_shapes(n), "decoder")
        e = with_memory(arr, state) if self.error_feedback else arr
        if self.what == "update":
            rms = float(np.sqrt(np.mean(np.square(e, dtype=np.float64)))) if n else 0.0
            if rms == 0:
                z = np.zeros(self.latent_count(n), np.float32)
            elif self.can_fit():
                z = self.fit_latent(state, e / np.float32(rms))
            else:
                z = self.encode_latent(state, e / np.float32(rms))
        else:
            z = self.encode_latent(state, e)
        lo, hi, q = _quantize(z, self.bits)
        lo, hi = _round_bf16(lo), _round_bf16(hi)
        levels = (1 << self.bits) - 1
        if hi > lo:
            q = np.minimum(np.maximum(np.rint((z - lo) / (hi - lo) * levels), 0.0), float(levels)).astype(
                np.int64
            )
        else:
            q = np.zeros(z.shape, np.int64)
        d = self.decode_latent(state, _dequantize(q, lo, hi, self.bits), n)
        if self.what == "update":
            dd = float(np.dot(d.astype(np.float64), d))
            alpha = _round_bf16(np.dot(e.astype(np.float64), d) / dd) if dd > 0 else 0.0
        else:
            alpha = 1.0
        base = (np.float32(alpha) * d).astype(np.float32)
        resid = e - base
        energy = float(np.dot(e.astype(np.float64), e))
        state[AE_NMSE] = np.array(
            [float(np.dot(resid.astype(np.float64), resid)) / energy if energy > 0 else 0.0]
        )
        idx = top_indices(resid, self.max_k(n))
        mag = _round_bf16(np.mean(np.abs(resid[idx]))) if idx.size else 0.0
        signs = (np.asarray(resid[idx]) < 0).astype(np.uint8)
        b, position_bits = encode_interleaved(idx, n)
        side = (
            SideWriter()
            .raw(_bf16(alpha))
            .raw(_bf16(lo))
            .raw(_bf16(hi))
            .varint(idx.size)
            .u8(b)
            .raw(_bf16(mag))
            .getvalue()
        )
        bits = np.concatenate([_pack(q, self.bits), position_bits, signs])
        return side, np.packbits(bits).tobytes()

    def _parse_side(self, side: bytes, n: int) -> tuple[float, float, float, int, int, float]:
        r = SideReader(side, "ae header")
        alpha, lo, hi = _from_bf16(r.raw(2)), _from_bf16(r.raw(2)), _from_bf16(r.raw(2))
        k, b, mag = r.varint(), r.u8(), _from_bf16(r.raw(2))
        r.finish()
        if not all(math.isfinite(v) for v in (alpha, lo, hi, mag)):
            raise CodecError("ae: non-finite value in the header")
        if hi < lo:
            raise CodecError("ae: latent range is inverted")
        if k > self.max_k(n):
            raise CodecError(f"ae: {k} corrections, the plan allows at most {self.max_k(n)}")
        if b > 30:
            raise CodecError(f"ae: Rice parameter {b} out of range")
        return alpha, lo, hi, k, b, mag

    def output_spec(self, spec: Spec, side: bytes) -> Spec:
        n = require_array_spec(spec, "ae").count
        _, _, _, k, b, _ = self._parse_side(side, n)
        bits = self.latent_count(n) * self.bits + k * (b + 1) + (n >> b) + k
        return BytesSpec((bits + 7) // 8)

    def decode(self, side: bytes, y: Data, spec: Spec, state: StageState, hint: object = None) -> Data:
        n = require_array_spec(spec, "ae").count
        self._require(state, self.decoder_shapes(n), "decoder")
        alpha, lo, hi, k, b, mag = self._parse_side(side, n)
        bits = np.unpackbits(np.frombuffer(bytes(y), np.uint8))
        nz = self.latent_count(n) * self.bits
        if len(bits) < nz:
            raise CodecError("ae: latent truncated")
        q = _unpack(bits[:nz], self.bits)
        idx, end = decode_interleaved(bits, nz, k, b, n, "ae: correction")
        if end + k > len(bits) or len(bits) - (end + k) >= 8:
            raise CodecError("ae: body length does not match the header")
        if k and np.any(np.diff(idx) <= 0):
            raise CodecError("ae: correction positions are not increasing")
        signs = bits[end : end + k]
        d = self.decode_latent(state, _dequantize(q, lo, hi, self.bits), n)
        out = (np.float32(alpha) * d).astype(np.float32)
        if k:
            out[idx] += np.where(signs == 1, -np.float32(mag), np.float32(mag)).astype(np.float32)
        if not np.isfinite(out).all():
            raise CodecError("ae: decoded update contains NaN or Inf")
        return out

    def update(self, state: StageState, event: StageUpdate) -> None:
        if not self.error_feedback or event.x is None:
            return  # the receiver keeps no memory; weights mode keeps none
        assert isinstance(event.x, np.ndarray) and isinstance(event.x_hat, np.ndarray)
        remember(state, with_memory(event.x, state), event.x_hat)


# -- decoders on the wire ----------------------------------------------------------------------------
def find_stage(chain: Any) -> tuple[int, Autoencoder] | None:
    """(index, stage) of the chain's autoencoder stage, or None; `state.stage(index)` holds its networks."""
    found = chain.find(Autoencoder)
    if found is None:
        return None
    index, stage = found
    assert isinstance(stage, Autoencoder)
    return index, stage


def decoder_layout(expected: dict[str, tuple[int, ...]]) -> Layout:
    """The decoder's tensors as a codec Layout (float32, in `decoder_shapes()` order)."""
    from .layout import Layout, TensorInfo

    return Layout(tuple(TensorInfo(k, tuple(s), "float32") for k, s in expected.items()))


def decoder_chain(config: str) -> Chain | None:
    """The codec chain decoder uploads travel through (`prepass.decoder_chain`), or None for raw fp32.

    It must be stateless (one message, no memory shared with later ones) and hold no `ae` stage."""
    from .chain import Chain

    return Chain.parse_stateless(config, "decoder chain", "a decoder travels as one message")


PAYLOAD_KEY = "payload"  # the one U8 tensor of a compressed decoder upload


def decoder_to_bytes(
    tensors: dict[str, np.ndarray], collaborator_id: str = "", chain: Chain | None = None
) -> bytes:
    """safetensors bytes of a decoder; the metadata binds it to the collaborator that trained it.

    With `chain` (from `decoder_chain`), the decoder's weights go through that codec chain first and
    travel as one U8 tensor `payload`; the metadata also names the chain."""
    from safetensors.numpy import save

    meta = {"collaborator_id": collaborator_id} if collaborator_id else {}
    if chain is None:
        return save(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, metadata=meta or None
        )
    layout = decoder_layout({k: tuple(v.shape) for k, v in tensors.items()})
    flat = np.concatenate([np.asarray(v, np.float32).reshape(-1) for v in tensors.values()])
    data = chain.encode(flat, layout).data
    return save({PAYLOAD_KEY: np.frombuffer(data, np.uint8)}, metadata={**meta, "chain": str(chain)})


def read_safetensors_header(blob: bytes, max_header: int = 1 << 20) -> dict[str, Any]:
    """The JSON header of a safetensors blob, parsed without touching the tensors."""
    if len(blob) < 8:
        raise CodecError("decoder is not safetensors: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > max_header or 8 + length > len(blob):
        raise CodecError(f"decoder is not safetensors: header length {length} is implausible")
    try:
        header = json.loads(blob[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"decoder is not safetensors: header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CodecError("decoder is not safetensors: header is not an object")
    return header


def _load_safetensors(blob: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    try:
        return dict(load(bytes(blob)))
    except Exception as exc:  # safetensors raises its own error types
        raise CodecError(f"decoder is not valid safetensors: {exc}") from exc


def validate_decoder(
    blob: bytes, expected: dict[str, tuple[int, ...]], max_bytes: int, chain: Chain | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Check an uploaded decoder against the expected tensor shapes; returns (tensors, metadata).

    Refuses (CodecError): more than max_bytes, anything that is not safetensors (a pickle, say),
    extra or missing keys, a dtype other than F32, wrong shapes, NaN or Inf. With `chain` (the
    plan's decoder chain), the blob must instead hold one U8 tensor `payload`, name that chain in its
    metadata, and decode through it to the expected tensors (the layout fixes its output size).
    """
    if len(blob) > max_bytes:
        raise CodecError(f"decoder of {len(blob)} bytes exceeds the size cap of {max_bytes} bytes")
    header = read_safetensors_header(blob)
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("decoder metadata must map strings to strings")
    meta = {str(k): str(v) for k, v in meta.items()}
    if chain is not None:
        return _decode_compressed(blob, header, meta, expected, chain), meta
    if "chain" in meta:
        raise CodecError(f"decoder was compressed with {meta['chain']!r}, the plan expects raw fp32")
    extra, missing = sorted(set(header) - set(expected)), sorted(set(expected) - set(header))
    if extra or missing:
        raise CodecError(
            f"decoder keys do not match the plan's architecture: extra {extra}, missing {missing}"
        )
    for name, shape in expected.items():
        info = header[name]
        if not isinstance(info, dict) or info.get("dtype") != "F32":
            raise CodecError(
                f"decoder tensor {name!r} must be F32, got {info.get('dtype') if isinstance(info, dict) else info!r}"
            )
        if tuple(info.get("shape", ())) != tuple(shape):
            raise CodecError(
                f"decoder tensor {name!r} has shape {tuple(info.get('shape', ()))}, the plan needs {tuple(shape)}"
            )
    tensors = _load_safetensors(blob)
    for name, arr in tensors.items():
        if arr.dtype != np.float32 or arr.shape != tuple(expected[name]):
            raise CodecError(f"decoder tensor {name!r} does not match the plan")
        if not np.isfinite(arr).all():
            raise CodecError(f"decoder tensor {name!r} contains NaN or Inf")
    return {k: np.ascontiguousarray(v) for k, v in tensors.items()}, meta


def _decode_compressed(
    blob: bytes,
    header: dict[str, Any],
    meta: dict[str, str],
    expected: dict[str, tuple[int, ...]],
    chain: Chain,
) -> dict[str, np.ndarray]:
    if meta.get("chain") != str(chain):
        raise CodecError(
            f"decoder was compressed with {meta.get('chain')!r}, the plan's decoder chain is {str(chain)!r}"
        )
    if set(header) != {PAYLOAD_KEY}:
        raise CodecError(f"a compressed decoder holds one tensor {PAYLOAD_KEY!r}, got {sorted(header)}")
    info = header[PAYLOAD_KEY]
    if not isinstance(info, dict) or info.get("dtype") != "U8" or len(info.get("shape", ())) != 1:
        raise CodecError(f"decoder tensor {PAYLOAD_KEY!r} must be 1-D U8")
    data = _load_safetensors(blob)[PAYLOAD_KEY]
    flat = chain.decode(data.tobytes(), decoder_layout(expected))  # CodecError on anything malformed
    if not np.isfinite(flat).all():
        raise CodecError("decoder contains NaN or Inf")
    ends = np.cumsum([math.prod(s) for s in expected.values()])[:-1]
    return {
        k: np.ascontiguousarray(part.reshape(s), dtype=np.float32)
        for (k, s), part in zip(expected.items(), np.split(flat, ends), strict=True)
    }


# -- the plan's prepass settings configure the `ae` stage -------------------------------------------
AE_PLAN_KEYS = tuple(f.name for f in dataclasses.fields(AutoencoderSettings))


def chain_with_prepass(config: Any, settings: AutoencoderSettings) -> Any:
    """The uplink chain config with every `ae` stage's unset parameters taken from the plan's prepass settings."""
    from .chain import parse_stage

    if isinstance(config, str):
        stages: Any = [parse_stage(p) for p in config.split("|") if p.strip()]
    elif isinstance(config, dict) and "chain" in config:
        stages = config["chain"]
    elif isinstance(config, dict):
        stages = [config]
    else:
        stages = config
    if not isinstance(stages, list) or not any(isinstance(s, dict) and s.get("id") == "ae" for s in stages):
        return config
    defaults = {k: getattr(settings, k) for k in AE_PLAN_KEYS}
    return [{**defaults, **s} if isinstance(s, dict) and s.get("id") == "ae" else s for s in stages]
