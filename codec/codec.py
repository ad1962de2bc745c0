"""A lossy image codec from a vqgpt tokenizer and its prior: codes entropy-coded with the prior's own
conditional distributions.

Compression: image -> the tokenizer's codes (of multi-level codes, the first ``levels`` levels: the rate)
-> for every code, the prior's distribution given the class and the codes before it -> an integer
frequency table -> rANS (``constriction``). Decompression runs the same prior step by step (prior.steps:
a code a step for a flat prior, a level of a position for a depth prior, a whole scale for a next-scale
prior), decoding each step's codes, then the tokenizer's decoder: the output is exactly
``decode(encode(x), levels)``.

The two sides must compute identical tables: one differing frequency derails the rest of the stream.
Teacher-forced and step-by-step logits differ in their last bits, and so do different batch sizes, so
both sides take the same path by construction: :meth:`Codec._tables` is one generator, run step by step
with the KV cache on groups of the same images (one image for a single file; the archive's recorded group
size otherwise), in float64 on the CPU, and its probabilities are rounded to integer frequencies (16 bits,
every code at least 1) before the coder sees them. A CRC-16 of the codes in each record turns any
remaining mismatch (another machine's float64 rounding on a table entry at a rounding boundary) into
an error, never a silently wrong image.

Why constriction: a maintained Rust library with Python bindings, stack (ANS) and queue (range) coders
over exactly the categorical models a prior gives, and bit-exact decoding of what it encoded.
"""

from __future__ import annotations

import binascii
import copy
import hashlib
import io
import math
import struct
from dataclasses import dataclass
from typing import BinaryIO

import constriction
import numpy as np
import torch

from common.cli import UserError
from prior import PriorInfo, architecture, load_prior, prior_steps
from tokenizer import VQVAE

PRECISION = 16  # integer tables sum to 2**16
VERSION = 1
MAGIC_FILE, MAGIC_ARCHIVE = b"VQ", b"VQA"
# One image: magic, version, flags (bit 0: entropy-coded with a prior; bits 4-7: the levels coded, minus one),
# models id, grid h, grid w, condition, CRC-16.
FILE_HEADER = struct.Struct("<2sBBIBBHH")
# Many images: magic, version, flags (bit 0: prior, bit 1: names, bits 4-7: levels minus one), models id, grid h, grid w, group size, count.
ARCHIVE_HEADER = struct.Struct("<3sBBIBBHI")
NULL = 0xFFFF  # the condition of an unconditional record


class CodecError(UserError):
    """A file that cannot be decoded with these models; the message says why in one line."""


@dataclass
class Record:
    codes: np.ndarray  # (T,) code ids: the levels coded, level after level
    condition: int  # class id, or -1 for the null class


def integer_table(logits: torch.Tensor, precision: int = PRECISION) -> np.ndarray:
    """Logits (N, K) -> integer frequencies (N, K), each >= 1, each row summing to 2**precision.

    ``floor(p * (2**precision - K)) + 1``, and what rounding leaves over goes to the most likely code.
    Integer arithmetic from the probabilities on: both sides derive the same table from the same logits.
    """
    total, k = 1 << precision, logits.shape[-1]
    p = torch.softmax(logits.double(), dim=-1).numpy()
    freqs = np.floor(p * (total - k)).astype(np.int64) + 1
    freqs[np.arange(len(freqs)), p.argmax(-1)] += total - freqs.sum(-1)
    return freqs


def models_id(*models: torch.nn.Module) -> int:
    """32 bits of a SHA-256 over the models' weights: which tokenizer and prior made a file."""
    h = hashlib.sha256()
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:4], "little")


def _crc(codes: np.ndarray) -> int:
    return binascii.crc_hqx(np.asarray(codes, dtype="<u2").tobytes(), 0)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


class _Reader:
    """Reads a file object (or bytes) piece by piece, with one-line errors for a short file."""

    def __init__(self, data: bytes | BinaryIO, what: str):
        self.file = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
        self.pos, self.what = 0, what

    def take(self, n: int) -> bytes:
        out = self.file.read(n)
        self.pos += len(out)
        if len(out) < n:
            raise CodecError(f"{self.what} is truncated: {self.pos} bytes, more expected")
        return out

    def rest(self) -> bytes:
        out = self.file.read()
        self.pos += len(out)
        return out

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            (b,) = self.take(1)
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n


class Codec:
    """Compress images to bytes and back with a tokenizer and (optionally) its prior.

    >>> codec = Codec.from_pretrained("runs/prior")            # the prior and the tokenizer it names
    >>> data = codec.compress(image, label=7)                  # image (C, H, W) in [-1, 1]
    >>> codec.decompress(data)                                 # the tokenizer's reconstruction, exactly

    ``levels``: of multi-level codes, code the first ``levels`` levels (every prefix decodes: the rate); by
    default all the prior models (all the tokenizer's without a prior). A file records the levels it holds.
    """

    def __init__(self, tokenizer: VQVAE, prior=None, info: PriorInfo | None = None, levels: int | None = None):
        self.tokenizer = tokenizer.eval()
        self.num_codes = tokenizer.config.num_codes
        self.prior, self.info = None, info
        if prior is not None:
            info.check_tokenizer(tokenizer)
            # A float64 CPU copy: the tables' path, the same for the encoder and the decoder.
            self.prior = copy.deepcopy(prior).to("cpu", torch.float64).eval()
        self.id = models_id(*[m for m in (tokenizer, prior) if m is not None])
        self._model = constriction.stream.model.Categorical(perfect=False)
        self.levels = levels
        most = info.code_layout.num_levels if prior is not None else tokenizer.num_levels
        if levels is not None and not 1 <= levels <= most:
            whose = f"the prior models {info.code_layout.describe()}" if prior is not None else f"the tokenizer makes {tokenizer.num_levels} level{'s' * (most > 1)}"  # fmt: skip
            raise UserError(f"--levels {levels}: {whose}; expected 1 to {most}")
        if levels is not None and not self.can_code(levels):
            raise UserError(f"--levels {levels}: a {architecture(prior.config)} prior codes the {most} levels of a position together; "
                            f"code all of them, or train a prior with --levels {levels}")  # fmt: skip

    @classmethod
    def from_pretrained(cls, prior: str | None = None, tokenizer: str | None = None, levels: int | None = None) -> Codec:
        """A prior folder or Hub id (and the tokenizer it names, or ``tokenizer``); or a tokenizer alone."""
        if prior is None:
            if tokenizer is None:
                raise UserError("the codec needs a prior (--prior) or at least a tokenizer (--tokenizer)")
            return cls(VQVAE.from_pretrained(tokenizer), levels=levels)
        model, info = load_prior(prior)
        ref = tokenizer or info.tokenizer
        if not ref:
            raise UserError(f"prior {prior} names no tokenizer; pass --tokenizer")
        return cls(VQVAE.from_pretrained(ref), model, info, levels)

    @property
    def bits_per_code(self) -> int:
        return max(1, math.ceil(math.log2(self.num_codes)))

    # -- codes <-> images ----------------------------------------------------------------------------

    def layout(self, grid: tuple[int, int]):
        """The tokenizer's levels of codes (tokenizer.codes) on a ``grid`` of positions."""
        f = self.tokenizer.downsample_factor
        return self.tokenizer.code_layout(grid[0] * f, grid[1] * f)

    def can_code(self, levels: int) -> bool:
        """Whether the first ``levels`` levels can be coded alone: without a prior always; with one, when its steps
        (prior.steps) emit every code of those levels before any other (a flat or next-scale prior: any prefix; a
        depth prior, which emits all the levels of a position together: all its levels only)."""
        if self.prior is None:
            return True
        n = self.info.code_layout.length(levels)
        emitted = torch.cat([where for where, _ in prior_steps(self.prior, self.info.seq_len).order])
        return bool((emitted[:n] < n).all())

    @property
    def coded_levels(self) -> int:
        """The levels compress codes: ``levels``, else all the prior models, else all the tokenizer's."""
        return self.levels or (self.info.code_layout.num_levels if self.info is not None else self.tokenizer.num_levels)

    def encode_images(self, images: torch.Tensor) -> np.ndarray:
        """Images (N, C, H, W) in [-1, 1] -> codes (N, T) of the levels coded."""
        device = next(self.tokenizer.parameters()).device
        codes = self.tokenizer.encode(images.to(device), self.coded_levels)
        return self.layout(self.grid(tuple(images.shape[-2:]))).flatten(codes, self.coded_levels).cpu().numpy()

    def decode_codes(self, codes: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
        """Codes (N, T) of the first levels of ``grid``'s layout (as many as T holds) -> images."""
        device = next(self.tokenizer.parameters()).device
        levels = self.layout(grid).levels_of(np.shape(codes)[1])
        return self.tokenizer.decode(torch.as_tensor(codes, dtype=torch.long, device=device), levels=levels, grid=tuple(grid)).cpu()

    # -- the tables: one path for both sides ---------------------------------------------------------

    @torch.inference_mode()
    def _tables(self, conditions: list[int], t_len: int):
        """Generator of (positions, integer tables (G*n, K)), one per step of the prior (prior.steps) over the
        first ``t_len`` codes, for a group of G records.

        After each table it must be sent the codes (G, n) at those positions: the known ones when
        compressing, the decoded ones when decompressing. The two sides therefore run the same forward
        passes on the same batch, step by step with the prior's caches.
        """
        layout, k = self.info.layout, self.info.num_codes
        steps = prior_steps(self.prior, self.info.seq_len)
        order = [(where, level) for where, level in steps.order if int(where.max()) < t_len]
        logits = steps.start(layout.condition_tokens(torch.tensor(conditions)))
        for i, (where, _) in enumerate(order):
            codes = yield where.numpy(), integer_table(logits[..., :k].reshape(-1, k))
            if i + 1 < len(order):
                logits = steps.feed(torch.as_tensor(np.asarray(codes), dtype=torch.long).view(len(conditions), -1))

    def _encode_group(self, records: list[Record]) -> bytes:
        """A group of records -> one stream: with a prior, one ANS stream over every code of the group,
        in the order the decoder meets them (position by position, record by record)."""
        if self.prior is None:
            return b"".join(self._pack_bits(r.codes) for r in records)
        codes = np.stack([r.codes for r in records])  # (G, T)
        tables, symbols, steps = self._tables([r.condition for r in records], codes.shape[1]), [], []
        where, table = next(tables)
        while True:
            symbols.append(codes[:, where].reshape(-1))  # (G*n,): record-major within a step, as its table
            steps.append(table)
            try:
                where, table = tables.send(codes[:, where])
            except StopIteration:
                break
        probabilities = np.concatenate(steps).astype(np.float64) / (1 << PRECISION)  # (T*G, K), step after step
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(np.concatenate(symbols).astype(np.int32), self._model, probabilities)
        return coder.get_compressed().tobytes()

    def _decode_group(self, payload: bytes, conditions: list[int], t_len: int, what: str) -> np.ndarray:
        """One stream -> the codes (G, T) of its records, decoded position by position."""
        g_len = len(conditions)
        if self.prior is None:
            per = math.ceil(t_len * self.bits_per_code / 8)
            if len(payload) != per * g_len:
                raise CodecError(f"{what} is damaged: {len(payload)} bytes of codes, {per * g_len} expected")
            return np.stack([self._unpack_bits(payload[i * per : (i + 1) * per], t_len) for i in range(g_len)])
        if len(payload) % 4 or not payload:
            raise CodecError(f"{what} is damaged: {len(payload)} bytes of coded data (a non-empty multiple of 4 was written)")
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype=np.uint32).copy())
        tables = self._tables(conditions, t_len)
        where, table = next(tables)
        out = np.zeros((g_len, t_len), dtype=np.int64)
        while True:
            try:
                out[:, where] = coder.decode(self._model, table.astype(np.float64) / (1 << PRECISION)).reshape(g_len, -1)
            except Exception as e:  # the coder ran out of data
                raise CodecError(f"{what} is damaged or was made with other models ({type(e).__name__})") from None
            try:
                where, table = tables.send(out[:, where])
            except StopIteration:
                return out

    def _pack_bits(self, codes: np.ndarray) -> bytes:
        """No prior: every code in ceil(log2 K) bits."""
        bits = np.unpackbits(codes.astype(">u4").view(np.uint8).reshape(-1, 4), axis=1)[:, -self.bits_per_code :]
        return np.packbits(bits.reshape(-1)).tobytes()

    def _unpack_bits(self, data: bytes, t_len: int) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: t_len * self.bits_per_code].reshape(t_len, -1)
        return (bits.astype(np.int64) << np.arange(self.bits_per_code - 1, -1, -1)).sum(1)

    # -- records <-> files ---------------------------------------------------------------------------

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The code grid of images of ``image_size`` (H, W); the prior's, which must agree."""
        grid = tuple(self.tokenizer.code_grid(*image_size))
        if self.info is not None and grid != tuple(self.info.grid):
            raise UserError(f"{image_size[0]}x{image_size[1]} images make {grid[0]}x{grid[1]} code grids but the prior models {self.info.grid[0]}x{self.info.grid[1]}")  # fmt: skip
        return grid

    def _levels_flag(self, t_len: int, grid: tuple[int, int]) -> int:
        """The header's bits 4-7: how many levels ``t_len`` codes on ``grid`` are, minus one."""
        return (self.layout(grid).levels_of(t_len) - 1) << 4

    def _check(self, magic_ok: bool, version: int, flags: int, ident: int, grid, what: str) -> int:
        """Refuse a file these models cannot decode; the number of codes of each of its records."""
        if not magic_ok:
            raise CodecError(f"{what} is not a vqgpt codec file (wrong magic bytes)")
        if version != VERSION:
            raise CodecError(f"{what} has format version {version}; this vqgpt reads version {VERSION}")
        if bool(flags & 1) != (self.prior is not None):
            need = "a prior" if flags & 1 else "no prior (--tokenizer only)"
            raise CodecError(f"{what} was coded with {need}; decode it with the same models")
        if ident != self.id:
            raise CodecError(f"{what} was made by another tokenizer/prior pair (models id {ident:08x}, these are {self.id:08x})")
        if self.info is not None and tuple(grid) != tuple(self.info.grid):
            raise CodecError(f"{what} holds {grid[0]}x{grid[1]} code grids but the prior makes {self.info.grid[0]}x{self.info.grid[1]}")
        levels, layout = (flags >> 4) + 1, self.layout(grid)
        if levels > (self.info.code_layout.num_levels if self.info is not None else layout.num_levels):
            raise CodecError(f"{what} holds {levels} levels of codes but these models code {self.coded_levels}")
        return layout.length(levels)

    def compress(self, image: torch.Tensor, label: int = -1) -> bytes:
        """One image (C, H, W) in [-1, 1] -> a file: a 13-byte header and its coded codes."""
        return self.compress_codes(self.encode_images(image[None])[0], label, self.grid(tuple(image.shape[-2:])))

    def compress_codes(self, codes: np.ndarray, label: int, grid: tuple[int, int]) -> bytes:
        payload = self._encode_group([Record(np.asarray(codes), label)])
        flags = int(self.prior is not None) | self._levels_flag(len(codes), grid)
        header = FILE_HEADER.pack(MAGIC_FILE, VERSION, flags, self.id, grid[0], grid[1],
                                  NULL if label < 0 else label, _crc(codes))  # fmt: skip
        return header + payload

    def decompress_codes(self, data: bytes, what: str = "file") -> tuple[np.ndarray, int, tuple[int, int]]:
        """A file -> (codes (T,) of the levels it holds, condition, grid)."""
        r = _Reader(data, what)
        magic, version, flags, ident, h, w, cond, crc = FILE_HEADER.unpack(r.take(FILE_HEADER.size))
        t_len = self._check(magic == MAGIC_FILE, version, flags, ident, (h, w), what)
        label = -1 if cond == NULL else cond
        codes = self._decode_group(r.rest(), [label], t_len, what)[0]
        if _crc(codes) != crc:
            raise CodecError(f"{what} did not decode to the codes it was made from (CRC mismatch): damaged, or a table differed")
        return codes, label, (h, w)

    def decompress(self, data: bytes, what: str = "file") -> torch.Tensor:
        """A file -> the tokenizer's reconstruction (C, H, W) in [-1, 1], exactly ``decode(encode(x))``."""
        codes, _, grid = self.decompress_codes(data, what)
        return self.decode_codes(codes[None], grid)[0]

    def compress_archive(self, codes: np.ndarray, labels: list[int], grid: tuple[int, int], names: list[str] | None = None,
                         group: int = 256, progress=None) -> bytes:  # fmt: skip
        """Many images' codes (N, T) -> one archive (:class:`ArchiveWriter`, in memory)."""
        out = io.BytesIO()
        with ArchiveWriter(self, out, len(codes), grid, names is not None, group, progress) as writer:
            writer.add(codes, labels, names)
        return out.getvalue()

    def read_archive(self, data: bytes | BinaryIO, what: str = "archive", progress=None):
        """An archive (bytes, or a file read piece by piece) -> (grid, count, codes per image, groups): ``groups`` yields
        (codes (g, T), conditions, names or None) one group at a time, each checked against its CRCs."""
        r = _Reader(data, what)
        magic, version, flags, ident, h, w, group, count = ARCHIVE_HEADER.unpack(r.take(ARCHIVE_HEADER.size))
        t_len = self._check(magic == MAGIC_ARCHIVE, version, flags, ident, (h, w), what)

        def groups():
            done = 0
            for start in range(0, count, group):
                chunk, names = [], []
                for _ in range(min(group, count - start)):
                    cond, crc = struct.unpack("<HH", r.take(4))
                    chunk.append((-1 if cond == NULL else cond, crc))
                    if flags & 2:
                        names.append(r.take(r.varint()).decode())
                decoded = self._decode_group(r.take(r.varint()), [c[0] for c in chunk], t_len, what)
                for i, ((cond, crc), c) in enumerate(zip(chunk, decoded)):
                    if _crc(c) != crc:
                        raise CodecError(f"{what}: image {done + i} did not decode to its codes (CRC mismatch): damaged, or a table differed")  # fmt: skip
                done += len(chunk)
                if progress is not None:
                    progress.update(len(chunk))
                yield decoded, [c[0] for c in chunk], (names if flags & 2 else None)
            extra = len(r.rest())
            if extra:
                raise CodecError(f"{what} has {extra} bytes after its last image")

        return (h, w), count, t_len, groups()

    def decompress_archive(self, data: bytes | BinaryIO, what: str = "archive", progress=None):
        """An archive -> (codes (N, T), conditions, names or None, grid), all in memory."""
        grid, _, t_len, groups = self.read_archive(data, what, progress)
        parts = list(groups)
        codes = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, t_len), dtype=np.int64)
        names = [n for p in parts for n in p[2]] if parts and parts[0][2] is not None else None
        return codes, [c for p in parts for c in p[1]], names, grid


class ArchiveWriter:
    """Images' codes -> one archive, written to ``out`` as they come (:meth:`add` any number at a time).

    Images are coded in groups of ``group``, each group one stream decoded as one batch: per image only
    its condition and CRC (4 bytes) are added. The header holds ``count``, the number of images to come."""

    def __init__(self, codec: Codec, out: BinaryIO, count: int, grid: tuple[int, int], names: bool = False,
                 group: int = 256, progress=None):  # fmt: skip
        if not 1 <= group <= 0xFFFF:
            raise UserError(f"archive group size {group}: expected 1..65535")
        self.codec, self.out, self.count, self.names, self.group, self.progress = codec, out, count, names, group, progress
        self.pending: list[tuple[np.ndarray, int, str | None]] = []
        self.written, self.header = 0, (codec, grid)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()

    def _start(self, t_len: int) -> None:
        codec, grid = self.header
        flags = int(codec.prior is not None) | (2 if self.names else 0) | codec._levels_flag(t_len, grid)
        self.out.write(ARCHIVE_HEADER.pack(MAGIC_ARCHIVE, VERSION, flags, codec.id, grid[0], grid[1], self.group, self.count))
        self.header = None

    def _flush(self, n: int) -> None:
        records = [Record(np.asarray(c), int(lb)) for c, lb, _ in self.pending[:n]]
        for rec, (_, _, name) in zip(records, self.pending[:n]):
            self.out.write(struct.pack("<HH", NULL if rec.condition < 0 else rec.condition, _crc(rec.codes)))
            if self.names:
                self.out.write(_varint(len(name.encode())) + name.encode())
        payload = self.codec._encode_group(records)
        self.out.write(_varint(len(payload)) + payload)
        del self.pending[:n]
        self.written += n
        if self.progress is not None:
            self.progress.update(n)

    def add(self, codes: np.ndarray, labels: list[int], names: list[str] | None = None) -> None:
        if self.header is not None:
            self._start(np.shape(codes)[1])
        self.pending += zip(codes, labels, names if names is not None else [None] * len(codes))
        while len(self.pending) >= self.group:
            self._flush(self.group)

    def close(self) -> None:
        if self.header is not None:  # no images at all
            self._start(self.codec.layout(self.header[1]).length(self.codec.coded_levels))
        if self.pending:
            self._flush(len(self.pending))
        if self.written != self.count:
            raise CodecError(f"the archive's header announced {self.count} images but {self.written} were added")
