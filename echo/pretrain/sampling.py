"""From examples to packed training batches (spec section 8).

Each clip is a random crop (of one length, or of random lengths down to `shortest_crop_seconds`); it
contributes 2-5 random 32-bin bands at random bin offsets (FPE from each band's own centre), and each band
sequence is masked independently in every clone (uniform random masking, an exact count per sequence). Clips
are added to a batch until the next would overflow a token budget (teacher tokens: every band sequence's
L + 1), so batches hold many short clips or few long ones, never padding.

Everything random about a clip is drawn from its stream's generator using only the example's rate and length
(`draw_clip`), and audio is read afterwards (`materialise`): a resumed run replays the batches it already
trained on without reading their audio. A clip whose audio turns out unreadable only then (a truncated or
corrupt stream, NaN samples) is dropped from its batch, and a batch left without clips is passed over: the plan
stays unchanged, and each batch names its place in it, so a checkpoint can say where each stream resumes.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from .. import geometry
from ..ops import stft as stft_ops
from ..ops import tokens as token_ops
from .corpus import Example, UnreadableAudio

log = logging.getLogger("echo.pretrain")

# Planned batches in a row without one readable clip after which a stream gives up: the data is (nearly) all
# damaged, and going on would spin without training.
UNREADABLE_BATCHES_LIMIT = 100


# The shortest clip worth a crop: two patches, so that each band sequence has a token to mask. At 0.15 s every
# sequence is one patch, nothing is masked, and the frame loss is the mean of nothing (NaN).
MIN_CLIP_SECONDS = 0.2


@dataclass(frozen=True)
class SamplingConfig:
    crop_seconds: float = 10.0
    min_bands: int = 2
    max_bands: int = 5
    clones: int = 4
    mask_ratio: float = 0.8
    tokens_per_batch: int = 16384
    # Crops of random length, log-uniform from this to crop_seconds: clips as short as the ones an embedding is
    # asked about (0.2-2 s key clicks, machine snippets). None: every crop is crop_seconds (or the whole file).
    shortest_crop_seconds: float | None = None

    def __post_init__(self):
        if not MIN_CLIP_SECONDS <= self.crop_seconds <= 20:
            raise ValueError(f"crop_seconds must be in [{MIN_CLIP_SECONDS}, 20] (two patches, one to mask, to one "
                             f"2000-frame pass), got {self.crop_seconds}")
        if self.shortest_crop_seconds is not None and not (
                MIN_CLIP_SECONDS <= self.shortest_crop_seconds <= self.crop_seconds):
            raise ValueError(f"shortest_crop_seconds must be in [{MIN_CLIP_SECONDS}, crop_seconds = "
                             f"{self.crop_seconds}], got {self.shortest_crop_seconds}")
        if not 1 <= self.min_bands <= self.max_bands:
            raise ValueError(f"need 1 <= min_bands <= max_bands, got {self.min_bands} and {self.max_bands}")
        if self.clones < 1:
            raise ValueError(f"clones must be at least 1, got {self.clones}")
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.tokens_per_batch < self.max_clip_tokens:
            raise ValueError(f"tokens_per_batch {self.tokens_per_batch} is smaller than one clip can take: "
                             f"{self.max_bands} bands x {self.max_clip_patches + 1} tokens = {self.max_clip_tokens}")

    @property
    def max_clip_patches(self) -> int:
        return geometry.n_patches(round(self.crop_seconds * 100))

    @property
    def max_clip_tokens(self) -> int:
        return self.max_bands * (min(self.max_clip_patches, geometry.MAX_PATCHES) + 1)


def masked_count(patches: int, ratio: float) -> int:
    """Masked patches of one band sequence: round(ratio * L), keeping at least one patch visible."""
    return min(round(ratio * patches), patches - 1)


@dataclass
class ClipPlan:
    """Everything random about one clip, drawn before its audio is read."""

    example: Example
    start: int  # first sample of the crop
    samples: int
    band_starts: list[int]  # first bin of each band (not on the 32-bin grid)
    masks: np.ndarray  # (clones, bands, L) bool, True = masked

    @property
    def patches(self) -> int:
        return self.masks.shape[-1]

    @property
    def tokens(self) -> int:
        return len(self.band_starts) * (self.patches + 1)


def crop_samples(example: Example, seconds: float) -> int:
    """Samples of a crop: `seconds`, at most the file, and at most `seconds` of 10 ms frames (and one 2000-frame
    pass). The hop is 10 ms rounded down (220 samples at 22050 Hz), so `seconds` of samples can hold more frames,
    and patches, than SamplingConfig checked the token budget for."""
    rate = example.sample_rate
    frames = min(round(seconds * 100), geometry.SEGMENT_FRAMES)
    longest = geometry.n_fft(rate) + (frames - 1) * geometry.hop(rate)
    return min(example.frames, round(seconds * rate), longest)


def crop_seconds(rng: np.random.Generator, config: SamplingConfig) -> float:
    """The length drawn for one crop; nothing is drawn for fixed crops, so their runs replay as before."""
    if config.shortest_crop_seconds is None:
        return config.crop_seconds
    return math.exp(rng.uniform(math.log(config.shortest_crop_seconds), math.log(config.crop_seconds)))


def draw_clip(example: Example, rng: np.random.Generator, config: SamplingConfig) -> ClipPlan:
    samples = crop_samples(example, crop_seconds(rng, config))
    start = int(rng.integers(0, example.frames - samples + 1))
    patches = geometry.n_patches(geometry.n_frames(samples, example.sample_rate))
    bands = int(rng.integers(config.min_bands, config.max_bands + 1))
    highest_start = max(geometry.n_bins(example.sample_rate) - geometry.BAND_BINS, 0)
    band_starts = rng.integers(0, highest_start + 1, size=bands).tolist()
    masked = masked_count(patches, config.mask_ratio)
    order = np.argsort(rng.random((config.clones, bands, patches)), axis=-1)  # a uniform permutation per sequence
    masks = np.zeros((config.clones, bands, patches), dtype=bool)
    np.put_along_axis(masks, order[..., :masked], True, axis=-1)
    return ClipPlan(example, start, samples, band_starts, masks)


def band_image(spec: torch.Tensor, sample_rate: int, start: int) -> tuple[torch.Tensor, float]:
    """32 rows of a (F, T) spectrogram from bin `start`, and the FPE position of their centre. Below 2480 Hz
    there are fewer than 32 bins: zero rows go before the real ones, as in the grid split."""
    bins = spec.shape[0]
    end = min(start + geometry.BAND_BINS, bins)
    rows = spec[start:end]
    if end - start < geometry.BAND_BINS:
        rows = torch.cat([rows.new_zeros(geometry.BAND_BINS - (end - start), rows.shape[1]), rows])
    return rows, geometry.band_position(sample_rate, start, end)


def clip_spectrogram(plan: ClipPlan) -> torch.Tensor:
    """The crop's (F, T) front end, computed at the bins of its bands only; the other rows stay zero and are
    never read."""
    rate = plan.example.sample_rate
    wave = torch.from_numpy(np.ascontiguousarray(plan.example.read(plan.start, plan.samples)))
    needed = torch.zeros(geometry.n_bins(rate), dtype=torch.bool, device="cpu")
    for start in plan.band_starts:
        needed[start: start + geometry.BAND_BINS] = True
    bins = needed.nonzero().squeeze(1)
    rows = stft_ops.spectrogram_bins(wave, rate, bins)
    spec = rows.new_zeros(len(needed), rows.shape[-1])
    spec[bins] = rows
    return spec


@dataclass
class Batch:
    """A packed batch; every index is computed here, on the host, so the step never waits on the device.

    Teacher sequence s holds `lengths[s]` patches: rows of `patches` in order (`patch_sequence`), sequences
    sorted by length. Student sequence j is a masked clone of teacher sequence `student_sequence[j]`. The
    decoder sees every position of every student sequence, back to back: decoder row r is teacher patch
    `decoder_source[r]`, masked or not (`masked[r]`). The student encodes only the rows `visible_rows` (those
    not masked, in order, `visible_sequence` naming their student sequence) plus one CLS per sequence."""

    patches: torch.Tensor  # (P, 512) float32
    lengths: torch.Tensor  # (S,) int64 patches per teacher sequence
    positions: torch.Tensor  # (S,) float32 FPE position p
    patch_sequence: torch.Tensor  # (P,) teacher sequence of each patch
    patch_position: torch.Tensor  # (P,) 1-based time index of each patch in its sequence
    student_sequence: torch.Tensor  # (Q,)
    student_lengths: torch.Tensor  # (Q,) tokens: visible patches + CLS
    decoder_source: torch.Tensor  # (R,)
    masked: torch.Tensor  # (R,) bool
    masked_rows: torch.Tensor  # (R - V,) decoder rows the loss is taken at
    visible_rows: torch.Tensor  # (V,) decoder rows the student encodes
    visible_sequence: torch.Tensor  # (V,) their student sequence
    clips: int
    audio_seconds: float
    stream: int = 0  # set by BatchStream: the stream of this rank that made the batch,
    plan_index: int = 0  # and the batch's index among those that stream planned (readable or not)

    def _apply(self, function) -> "Batch":
        return Batch(**{f.name: function(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                        for f in fields(self)})

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return self._apply(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._apply(torch.Tensor.pin_memory)

    @property
    def teacher_tokens(self) -> int:
        return len(self.patches) + len(self.lengths)

    @property
    def student_tokens(self) -> int:
        return len(self.visible_rows) + len(self.student_sequence)


def materialise(plans: list[ClipPlan], clones: int, reported: set[str] | None = None) -> Batch | None:
    """Read the crops, cut the bands into patches and lay out teacher, student and decoder rows. A clip whose
    audio cannot be read is dropped, and its file reported unless already in `reported` (the files reported
    so far, added to). None when no clip of the batch could be read."""
    reported = set() if reported is None else reported
    images, positions, sequence_masks = [], [], []
    seconds, clips = 0.0, 0
    for plan in plans:
        rate = plan.example.sample_rate
        try:
            spec = clip_spectrogram(plan)
        except UnreadableAudio as error:
            if error.source not in reported:
                reported.add(error.source)
                log.warning("skipping unreadable audio in %s: %s", error.source, error.reason)
            continue
        for band, start in enumerate(plan.band_starts):
            rows, position = band_image(spec, rate, start)
            images.append(token_ops.band_patches(rows))
            positions.append(position)
            sequence_masks.append(torch.from_numpy(plan.masks[:, band]))  # (clones, L)
        seconds += plan.samples / rate
        clips += 1
    if not clips:
        return None
    # on the host whatever torch's default device (a default GPU failed in forked data workers, which cannot use CUDA)
    lengths = torch.tensor([len(image) for image in images], dtype=torch.int64, device="cpu")
    order = torch.sort(lengths, stable=True).indices.tolist()  # equal lengths consecutive: attention takes views
    lengths = lengths[order]
    first = torch.cumsum(lengths, 0) - lengths
    students, sources, masked = [], [], []  # per student sequence
    for length in torch.unique_consecutive(lengths).tolist():
        members = (lengths == length).nonzero().squeeze(1).tolist()
        for clone in range(clones):
            for s in members:
                students.append(s)
                sources.append(first[s] + torch.arange(length, device="cpu"))
                masked.append(sequence_masks[order[s]][clone])
    masked = torch.cat(masked)
    visible_rows = (~masked).nonzero().squeeze(1)
    students = torch.tensor(students, dtype=torch.int64, device="cpu")
    decoder_sequence = torch.repeat_interleave(torch.arange(len(students), device="cpu"), lengths[students])
    return Batch(
        patches=torch.cat([images[i] for i in order]),
        lengths=lengths,
        positions=torch.tensor([positions[i] for i in order], dtype=torch.float64, device="cpu").to(torch.float32),
        patch_sequence=torch.repeat_interleave(torch.arange(len(lengths), device="cpu"), lengths),
        patch_position=torch.cat([torch.arange(1, n + 1, device="cpu") for n in lengths.tolist()]),
        student_sequence=students,
        student_lengths=torch.bincount(decoder_sequence[visible_rows], minlength=len(students)) + 1,
        decoder_source=torch.cat(sources),
        masked=masked,
        masked_rows=masked.nonzero().squeeze(1),
        visible_rows=visible_rows,
        visible_sequence=decoder_sequence[visible_rows],
        clips=clips,
        audio_seconds=seconds,
    )


def plan_batches(examples: Iterator[Example], rng: np.random.Generator,
                 config: SamplingConfig) -> Iterator[list[ClipPlan]]:
    """Clips packed greedily by the token budget; a clip that would overflow starts the next batch. The examples are
    endless (epoch after epoch): a budget larger than the stream's share of the corpus takes a file into a batch
    more than once, with other crops, bands and masks, as more clones would. The budget is bounded by memory
    instead (trainer.check_memory): a budget no machine could hold was packed here until the memory ran out."""
    batch: list[ClipPlan] = []
    used = 0
    for example in examples:
        clip = draw_clip(example, rng, config)
        if batch and used + clip.tokens > config.tokens_per_batch:
            yield batch
            batch, used = [], 0
        batch.append(clip)
        used += clip.tokens


def batches_to_skip(consumed: int, stream: int, streams: int) -> int:
    """Batches of one stream among the first `consumed`, when batch k comes from stream k % streams."""
    return max(0, (consumed - stream + streams - 1) // streams)


class BatchStream(torch.utils.data.IterableDataset):
    """The endless batches of one rank. With W DataLoader workers the rank has W streams (stream w reads part
    rank * W + w of the corpus) and global batch k comes from stream k % W, so the order depends only on the
    seed, the world size and W. A resumed stream replays, without reading audio, the batches it planned before:
    `positions[w]` of stream w (the `plan_index + 1` of its last batch trained on, from a checkpoint). By default
    it is stream w's share of the `consumed` batches, which is right unless a planned batch held no readable
    clip and was passed over."""

    def __init__(self, corpus, config: SamplingConfig, seed: int, rank: int = 0, world: int = 1,
                 workers: int = 0, consumed: int = 0, positions: list[int] | None = None):
        self.corpus, self.config, self.seed = corpus, config, seed
        self.rank, self.world, self.workers, self.consumed = rank, world, max(workers, 1), consumed
        self.positions = list(positions) if positions is not None else [
            batches_to_skip(consumed, stream, self.workers) for stream in range(self.workers)]
        corpus.check_parts(self.world * self.workers)

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        # The loader asks its workers in turn from worker 0, and global batch k belongs to stream k % W: after
        # `consumed` batches, worker 0 must play stream consumed % W.
        stream = ((info.id if info is not None else 0) + self.consumed) % self.workers
        part = self.rank * self.workers + stream
        rng = np.random.default_rng([self.seed, part])
        plans = plan_batches(self.corpus.examples(self.seed, part, self.world * self.workers), rng, self.config)
        for _ in range(self.positions[stream]):
            next(plans)
        reported: set[str] = set()
        unreadable_in_a_row = 0
        # A batch's plans go before the next batch's are drawn: a shard's hold their files' bytes, and kept while
        # the next were drawn they doubled a stream's (+69 MB a data worker for 10 s clips at 48 kHz). Not
        # enumerate(plans): the result tuple it reuses held the last plans until the next were all drawn.
        plan_index = self.positions[stream] - 1
        for clips in plans:
            plan_index += 1
            batch = materialise(clips, self.config.clones, reported)
            del clips
            if batch is not None:
                unreadable_in_a_row = 0
                batch.stream, batch.plan_index = stream, plan_index
                yield batch
                continue
            unreadable_in_a_row += 1
            if unreadable_in_a_row == UNREADABLE_BATCHES_LIMIT:
                raise ValueError(f"{unreadable_in_a_row} batches in a row held no readable clip: the audio is "
                                 f"(nearly) all damaged, e.g. {', '.join(sorted(reported)[:3])}")


def expected_clip_tokens(config: SamplingConfig) -> float:
    """Teacher tokens of an average clip as long as its crop: for the nominal clips-per-batch of lr scaling."""
    mean_bands = (config.min_bands + config.max_bands) / 2
    seconds = config.crop_seconds
    if config.shortest_crop_seconds is not None and config.shortest_crop_seconds < seconds:
        seconds = (seconds - config.shortest_crop_seconds) / math.log(seconds / config.shortest_crop_seconds)
    return mean_bands * (min(geometry.n_patches(round(seconds * 100)), geometry.MAX_PATCHES) + 1)


def nominal_clips_per_batch(config: SamplingConfig) -> int:
    return max(1, math.floor(config.tokens_per_batch / expected_clip_tokens(config)))
