"""The host-side geometry of a whole batch of mono signals, computed once (../shared/DESIGN.md).

Every (signal, segment, band) becomes one sequence of L + 1 tokens [CLS, patch 1..L] in one packed
(total_tokens, D) buffer. Segments are ordered by patch count (then signal, then time) with the bands of a
segment together, so all sequences of one length are consecutive and attention takes them as one view.
`cu_seqlens` gives the token offsets in the FlashAttention convention. Nothing is padded between signals. Every later stage (front end, tokens,
attention, output gathering, pretraining batches) reads these small integer tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import geometry

HOST = torch.device("cpu")  # the plan's tensors, whatever torch's default device: a caller's GPU default or meta


@dataclass
class Plan:
    sample_rates: list[int]
    lengths: list[int]  # samples per signal
    frames: list[int]
    bands: list[int]
    # spectrogram buffer: signal i is a (bands_i * 32, frames_i) band image at spec_offsets[i] (band layout)
    spec_offsets: torch.Tensor  # (signals + 1,) int64
    # one entry per sequence
    seq_signal: torch.Tensor  # (S,) int64
    seq_band: torch.Tensor  # (S,) band index within its signal
    seq_frame_start: torch.Tensor  # (S,) first frame of its segment
    seq_frames: torch.Tensor  # (S,) frames in its segment
    seq_patches: torch.Tensor  # (S,) L
    seq_position: torch.Tensor  # (S,) float32 FPE position p of its band
    cu_seqlens: torch.Tensor  # (S + 1,) int32 token offsets
    # one entry per segment, or per piece of a segment's bands: (signal, first sequence, bands, patches, first band)
    segments: list[tuple[int, int, int, int, int]] = field(default_factory=list)

    def packing(self, device=None, padding: int = 0):
        """The plan's sequences back to back, then `padding` one-token sequences (rows that no output reads)."""
        from .packed import Packing

        lengths = self.seq_patches + 1
        return Packing.from_lengths(torch.cat([lengths, lengths.new_ones(padding)]) if padding else lengths, device)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_signal)

    @property
    def total_tokens(self) -> int:
        return int(self.cu_seqlens[-1])

    def cls_rows(self) -> torch.Tensor:
        """Row of each sequence's CLS token in the packed buffer."""
        return self.cu_seqlens[:-1].long()

    def output_rows(self) -> torch.Tensor:
        """The packed buffer's rows in output order: every CLS row (sequence order), then each segment's patch
        rows in (patch, band) order, so that a segment's frame embeddings are one (patches, bands * D) block
        and consecutive segments of a signal (the plan keeps them in time order) one block too."""
        patches = self.seq_patches
        bands = torch.tensor([nb for _, _, nb, _, _ in self.segments], dtype=torch.int64, device=HOST)
        segment_rows = bands * torch.tensor([p for _, _, _, p, _ in self.segments], dtype=torch.int64, device=HOST)
        segment_start = torch.cumsum(segment_rows, 0) - segment_rows
        first_band = torch.tensor([b for *_, b in self.segments], dtype=torch.int64, device=HOST)
        # per sequence: where its segment's block starts, the segment's band count, the sequence's band in it
        sequence_segment = torch.repeat_interleave(torch.arange(len(self.segments), device=HOST), bands)
        block, stride = segment_start[sequence_segment], bands[sequence_segment]
        band = self.seq_band - first_band[sequence_segment]
        # per patch token: its sequence and patch index
        sequence = torch.repeat_interleave(torch.arange(self.num_sequences, device=HOST), patches)
        patch = torch.arange(len(sequence), device=HOST) - (torch.cumsum(patches, 0) - patches)[sequence]
        order = torch.empty(len(sequence), dtype=torch.int64, device=HOST)
        order[block[sequence] + patch * stride[sequence] + band[sequence]] = self.cls_rows()[sequence] + 1 + patch
        return torch.cat([self.cls_rows(), order])

    def patch_rows(self) -> torch.Tensor:
        """Rows of all patch tokens in packed order (every row that is not a CLS)."""
        is_patch = torch.ones(self.total_tokens, dtype=torch.bool, device=HOST)
        is_patch[self.cls_rows()] = False
        return is_patch.nonzero().squeeze(1)


def make_plan(lengths: list[int], sample_rates: list[int],
              pieces: list[list[tuple[int, int, int, int]]] | None = None) -> Plan:
    """The plan of mono signals with these sample counts and rates (all already validated).

    `pieces[i]`, when given, replaces signal i's segments by these (first frame, end frame, first band, end
    band) pieces of its frames: how a signal, or one segment of a very high rate, too large for a memory
    budget is encoded over several passes (the signal then being a span of frames of a longer one, whose
    segments the caller cut by the released rule)."""
    if len(lengths) != len(sample_rates):  # zipped, the extra signals were dropped from the plan without a word
        raise ValueError(f"a plan needs one sample rate per signal: {len(lengths)} lengths, {len(sample_rates)} rates")
    frames = [geometry.n_frames(n, sr) for n, sr in zip(lengths, sample_rates)]
    bands = [geometry.n_bands(sr) for sr in sample_rates]
    spec_sizes = [nb * geometry.BAND_BINS * t for nb, t in zip(bands, frames)]
    units = []  # (patches, signal, start frame, end frame, first band, end band)
    for i, t in enumerate(frames):
        chosen = [(*frame_range, 0, bands[i]) for frame_range in geometry.segments(t)] if pieces is None \
            else pieces[i]
        units += [(geometry.n_patches(end - start), i, start, end, first, end_band)
                  for start, end, first, end_band in chosen]
    units.sort()
    seq_signal, seq_band, seq_start, seq_frames, seq_patches, seq_position, segments = [], [], [], [], [], [], []
    positions = {
        sr: [geometry.band_position(sr, *geometry.band_edges(sr, b)) for b in range(geometry.n_bands(sr))]
        for sr in set(sample_rates)
    }
    for patches, i, start, end, first_band, end_band in units:
        nb = end_band - first_band
        segments.append((i, len(seq_signal), nb, patches, first_band))
        seq_signal += [i] * nb
        seq_band += range(first_band, end_band)
        seq_start += [start] * nb
        seq_frames += [end - start] * nb
        seq_patches += [patches] * nb
        seq_position += positions[sample_rates[i]][first_band:end_band]
    patches = torch.tensor(seq_patches, dtype=torch.int64, device=HOST)
    cu_seqlens = torch.zeros(len(patches) + 1, dtype=torch.int32, device=HOST)
    cu_seqlens[1:] = torch.cumsum(patches + 1, 0)
    spec_offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64, device=HOST)
    spec_offsets[1:] = torch.cumsum(torch.tensor(spec_sizes, dtype=torch.int64, device=HOST), 0)
    return Plan(
        sample_rates=list(sample_rates),
        lengths=list(lengths),
        frames=frames,
        bands=bands,
        spec_offsets=spec_offsets,
        seq_signal=torch.tensor(seq_signal, dtype=torch.int64, device=HOST),
        seq_band=torch.tensor(seq_band, dtype=torch.int64, device=HOST),
        seq_frame_start=torch.tensor(seq_start, dtype=torch.int64, device=HOST),
        seq_frames=torch.tensor(seq_frames, dtype=torch.int64, device=HOST),
        seq_patches=patches,
        seq_position=torch.tensor(seq_position, dtype=torch.float64, device=HOST).to(torch.float32),
        cu_seqlens=cu_seqlens,
        segments=segments,
    )
