"""Synthetic machine signals whose physics is known, so tests, the demo and pretraining can check what a
model sees against what was put in.

A machine is a shaft turning at `shaft_hz` (optionally drifting: speed variation), seen by an
accelerometer or microphone:

- shaft harmonics k * fr, k = 1..harmonics, amplitude decaying by `harmonic_decay` per order;
- imbalance raises the 1x harmonic, misalignment raises 2x (and 3x at 40 % of that), however few harmonics
  the machine has: the classic vibration-analysis signatures;
- a gear of Z teeth meshes at Z * fr; its mesh tone is amplitude-modulated by the shaft, which puts
  sidebands at Z * fr +- j * fr;
- a bearing defect makes one impact per passage of a rolling element over it. Each impact rings the
  structure's resonance (a decaying sinusoid), so the fault shows in the envelope of the resonance band
  at the defect frequency. With n balls of diameter d on pitch diameter D and contact angle phi, and
  r = (d / D) cos(phi):

      cage       FTF  = fr / 2 * (1 - r)
      outer race BPFO = n * fr / 2 * (1 - r)
      inner race BPFI = n * fr / 2 * (1 + r)
      ball       BSF  = D / (2 d) * fr * (1 - r^2)

  (SKF 6205, the Case Western bearing: BPFO = 3.5848 fr, BPFI = 5.4152 fr, BSF = 2.3567 fr.) An inner-race
  defect turns with the shaft through the load zone, so its impacts are amplitude-modulated at fr
  (sidebands at BPFI +- fr); a ball defect is modulated at the cage frequency; an outer-race defect sits
  still and is not modulated. Impacts slip by ~1 % of a period, as real rolling elements do, and fall on whole
  samples (up to half a sample more: 8 % of a 160 Hz period at a rate of 1 kHz). A simplification:
  a ball defect strikes once per BSF period here, where a real one strikes both races, twice per period (its
  envelope spectrum then leans to 2 BSF).
- load scales the gear mesh and the bearing impacts, and may drift (load variation);
- white background noise, and optionally a recorded noise mixed in at a chosen SNR (`mix`).

Everything is drawn from `numpy.random.default_rng(seed)`, seed a non-negative integer (None would draw
another signal at each call): the same machine, rate, length and seed give the same samples (another length
or rate draws differently: a shorter clip is not a prefix of a longer one). The speed and load drifts are
scaled to reach their full variation within each clip.

Nothing aliases: a harmonic at or above Nyquist is left out, and so is the whole gear once its top sideband
would be; the resonance is lowered to 0.4 x the sample rate where it lies above; a bearing defect whose impact
rate reaches Nyquist is refused (a faulty machine needs a rate of a few hundred Hz at least).
"""
from __future__ import annotations

import decimal
import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np

from ..inputs import check_sample_rate

FAULTS = ("outer", "inner", "ball")
RESONANCE_LIMIT = 0.4  # of the sample rate: the resonance stays clearly below Nyquist
BLOCK = 1 << 16  # samples a block of the per-sample stages: temporaries of 512 KiB each, not of the whole clip
MAX_SNR_DB = 200.0


def _check(owner: str, name: str, value, low: float, high: float = math.inf, bounds: str = "[]",
           integer: bool = False, any_size: bool = False) -> None:
    """Refuse `value` unless it is a finite number (an integer if `integer`) from `low` to `high`, each bound
    included where `bounds` has a square bracket. Finiteness is tested first: NaN passes no comparison, so a
    `value <= 0` test alone lets it through. A number past float's range (an int of 10**400) is not finite either:
    the float arithmetic after the check raised OverflowError on it. `any_size` lets any integer through (a seed,
    which numpy takes as it is)."""
    kind = numbers.Integral if integer else numbers.Real
    ok = not isinstance(value, bool) and isinstance(value, kind) and (any_size or _finite(value))
    ok = ok and (value >= low if bounds[0] == "[" else value > low)
    ok = ok and (value <= high if bounds[1] == "]" else value < high)
    if not ok:
        where = (f"{'>=' if bounds[0] == '[' else '>'} {low}" if high == math.inf
                 else f"in {bounds[0]}{low}, {high}{bounds[1]}")
        raise ValueError(f"{owner}.{name} must be {'an integer' if integer else 'a finite number'} {where}, "
                         f"got {_shown(value)}")


def _finite(value) -> bool:
    """math.isfinite(value), False where the value is past float's range (an int or Fraction of 10**400), on which
    it raises OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _shown(value) -> str:
    """repr(value), but a rational past float's range in scientific notation: an int's repr fails past 4300
    digits (ValueError, naming no field), and 400 digits say less than 1.000e+400."""
    if isinstance(value, numbers.Rational) and not _finite(value):
        return f"{decimal.Decimal(value.numerator) / value.denominator:.3e} (past float's range)"
    return repr(value)


@dataclass(frozen=True)
class Bearing:
    """Rolling-element bearing geometry. The default is an SKF 6205 deep-groove bearing.

    balls: the number n of rolling elements; ball_diameter d and pitch_diameter D: in mm (any one unit: only
    d / D counts); contact_angle: phi in degrees, 0 for a deep-groove bearing."""

    balls: int = 9
    ball_diameter: float = 7.94
    pitch_diameter: float = 39.04
    contact_angle: float = 0.0

    def __post_init__(self):
        """Keep r = (d / D) cos(phi) in [0, 1): at r >= 1 the cage, outer-race and ball rates turn negative,
        and d = 0 divides the ball rate by zero."""
        _check("Bearing", "balls", self.balls, 1, integer=True)
        _check("Bearing", "pitch_diameter", self.pitch_diameter, 0, bounds="(]")
        _check("Bearing", "ball_diameter", self.ball_diameter, 0, bounds="(]")
        if self.ball_diameter >= self.pitch_diameter:
            raise ValueError(f"Bearing.ball_diameter must be smaller than pitch_diameter {self.pitch_diameter}, "
                             f"got {self.ball_diameter!r}")
        _check("Bearing", "contact_angle", self.contact_angle, 0, 90, bounds="[)")

    def defect_frequencies(self, shaft_hz: float) -> dict[str, float]:
        """Impact rates in Hz of a defect on each part, and the cage rate, for a shaft at `shaft_hz` (a ball's is
        its spin rate BSF, at which this module strikes it: a real ball defect strikes twice per spin)."""
        _check("Bearing.defect_frequencies", "shaft_hz", shaft_hz, 0, bounds="(]")  # NaN or < 0 is no rate
        r = self.ball_diameter / self.pitch_diameter * math.cos(math.radians(self.contact_angle))
        return {
            "cage": shaft_hz / 2 * (1 - r),
            "outer": self.balls * shaft_hz / 2 * (1 - r),
            "inner": self.balls * shaft_hz / 2 * (1 + r),
            "ball": self.pitch_diameter / (2 * self.ball_diameter) * shaft_hz * (1 - r * r),
        }


@dataclass(frozen=True)
class Machine:
    """One machine's parameters. Amplitudes are in arbitrary units relative to a healthy 1x of 0.1.

    shaft_hz: the shaft's speed in Hz (rpm / 60). harmonics: how many shaft orders sound, each harmonic_decay
    times the one below. imbalance: extra 1x; misalignment: extra 2x (and 3x at 40 % of it); both as multiples
    of the healthy 1x. gear_teeth: Z of a gear on the shaft (0: no gear), meshing at Z x shaft_hz at gear_level,
    its amplitude modulated by the shaft to depth gear_modulation m: sideband pair j of `sidebands` pairs has
    m^j / 2 of the mesh (those whose level underflows to 0 cost nothing). bearing, fault: the Bearing and the
    part with a defect (None, "outer", "inner" or "ball"). fault_level: each impact's amplitude (the ring it
    starts peaks at up to ~fault_level x load). resonance_hz, resonance_damping: the structural mode the
    impacts ring (Hz, damping ratio). slip: the impacts' timing jitter, a standard deviation as a fraction of
    the defect period. load: a factor on the gear mesh and the impacts. speed_variation, load_variation: the
    peak relative drift of speed and load within a clip. noise: the standard deviation of white background
    noise."""

    shaft_hz: float = 29.5
    harmonics: int = 8
    harmonic_decay: float = 0.6
    imbalance: float = 0.0
    misalignment: float = 0.0
    gear_teeth: int = 0
    gear_level: float = 0.05
    gear_modulation: float = 0.4
    sidebands: int = 3
    bearing: Bearing = field(default_factory=Bearing)
    fault: str | None = None
    fault_level: float = 0.5
    resonance_hz: float = 3000.0
    resonance_damping: float = 0.05
    slip: float = 0.01
    speed_variation: float = 0.0
    load: float = 1.0
    load_variation: float = 0.0
    noise: float = 0.01

    def __post_init__(self):
        """Refuse what would crash the generator or silently make another signal than the one described:
        an undamped mode never decays and one damped at or past critical does not ring (0 < damping < 1), a
        variation of 100 % stops the shaft, a gear with no more teeth than sidebands folds its lower sidebands
        through 0 Hz, a slip of a whole defect period erases the defect rate, and negative amplitudes, levels
        or noise have no meaning."""
        if self.fault not in (None, *FAULTS):
            raise ValueError(f"unknown bearing fault {self.fault!r}; known: {', '.join(FAULTS)} or None")
        if not isinstance(self.bearing, Bearing):
            raise ValueError(f"Machine.bearing must be a Bearing, got {self.bearing!r}")
        _check("Machine", "shaft_hz", self.shaft_hz, 0, bounds="(]")
        _check("Machine", "harmonics", self.harmonics, 1, integer=True)
        _check("Machine", "harmonic_decay", self.harmonic_decay, 0, 1)
        for name in ("imbalance", "misalignment", "gear_level", "fault_level", "load", "noise"):
            _check("Machine", name, getattr(self, name), 0)
        _check("Machine", "sidebands", self.sidebands, 0, integer=True)
        _check("Machine", "gear_teeth", self.gear_teeth, 0, integer=True)
        if 0 < self.gear_teeth <= self.sidebands:
            raise ValueError(f"Machine.gear_teeth must be 0 (no gear) or more than sidebands {self.sidebands}, "
                             f"got {self.gear_teeth!r}")
        # the top sideband's order, met in float arithmetic: each term within float's range, their sum need not be
        _check("Machine", "gear_teeth + sidebands", self.gear_teeth + self.sidebands, 0, integer=True)
        _check("Machine", "gear_modulation", self.gear_modulation, 0, 1)
        _check("Machine", "resonance_hz", self.resonance_hz, 0, bounds="(]")
        _check("Machine", "resonance_damping", self.resonance_damping, 0, 1, bounds="()")
        for name in ("slip", "speed_variation", "load_variation"):
            _check("Machine", name, getattr(self, name), 0, 1, bounds="[)")

    @property
    def defect_hz(self) -> float | None:
        """The impact rate of this machine's bearing fault at its nominal speed (None when healthy)."""
        return None if self.fault is None else self.bearing.defect_frequencies(self.shaft_hz)[self.fault]


def _blocks(n_samples: int):
    """Consecutive slices of BLOCK samples covering `n_samples`: a per-sample stage built block by block holds
    temporaries of one block, not of the whole clip, and gives the same samples."""
    return (slice(start, min(start + BLOCK, n_samples)) for start in range(0, n_samples, BLOCK))


def _drift(rng: np.random.Generator, n_samples: int, sample_rate: int, slowest_hz: float = 0.05,
           fastest_hz: float = 0.5) -> np.ndarray:
    """A slow random curve with peak |1|: four sinusoids of random frequency and phase."""
    frequencies, phases = rng.uniform(slowest_hz, fastest_hz, 4), rng.uniform(0, 2 * np.pi, 4)
    curve = np.empty(n_samples)
    for block in _blocks(n_samples):
        t = np.arange(block.start, block.stop) / sample_rate
        curve[block] = sum(np.sin(2 * np.pi * f * t + p) for f, p in zip(frequencies, phases))
    curve /= max(curve.max(), -curve.min(), 1e-12)  # the peak |curve|, without an array of |curve|
    return curve


def _varying(rng: np.random.Generator, n_samples: int, sample_rate: int, mean: float, variation: float):
    """mean * (1 + variation * a drift), worked out in the drift's own array."""
    values = _drift(rng, n_samples, sample_rate)
    values *= variation
    values += 1
    values *= mean
    return values


def _resonance(sample_rate: int, hz: float, damping: float, n_samples: int) -> np.ndarray:
    """Impulse response of a single-mode structure, rung until it has decayed by 60 dB or for `n_samples` (the
    convolution keeps no more): a slow or barely damped mode would otherwise ring for hours of samples."""
    omega = 2 * np.pi * hz
    decay = damping * omega
    ring = min(n_samples, math.log(1000) / decay * sample_rate)
    t = np.arange(max(2, int(ring))) / sample_rate
    return np.exp(-decay * t) * np.sin(omega * math.sqrt(1 - damping**2) * t)


def _add_tones(out: np.ndarray, machine: Machine, shaft_phase: np.ndarray, load: np.ndarray, tones, gear) -> None:
    """Add to `out`, a block at a time, the shaft harmonics `tones` (order, amplitude, phase) and, where `gear`
    holds its phases (the sidebands' and the mesh's), the gear mesh. A function of its own, so that no view of a
    block outlives it and keeps the whole phase or load alive."""
    for block in _blocks(len(out)):
        phase, chunk = shaft_phase[block], out[block]
        for order, amplitude, start in tones:
            chunk += amplitude * np.sin(order * phase + start)
        if gear is not None:
            sideband_phases, mesh_start = gear
            sidebands = 0  # summed before the 1 is added, in the order the signal always had
            for j, start in enumerate(sideband_phases, start=1):
                sidebands = sidebands + machine.gear_modulation**j * np.cos(j * phase + start)
            chunk += machine.gear_level * load[block] * (1 + sidebands) * np.sin(
                machine.gear_teeth * phase + mesh_start)


def _impacts(machine: Machine, rng, shaft_phase: np.ndarray, load: np.ndarray, sample_rate: int):
    """The bearing fault's impacts: their sample positions and amplitudes (scaled by load and modulation)."""
    ratios = machine.bearing.defect_frequencies(1.0)
    starts = []  # where a new defect cycle begins, found a block at a time (each block from the sample before)
    for block in _blocks(len(shaft_phase)):
        first = max(block.start - 1, 0)
        cycles = np.floor(ratios[machine.fault] * shaft_phase[first: block.stop] / (2 * np.pi))
        starts.append(np.flatnonzero(np.diff(cycles)) + first + 1)
    starts = np.concatenate(starts)
    period = sample_rate / machine.defect_hz
    positions = np.rint(starts + rng.normal(0, machine.slip * period, len(starts))).astype(np.int64)
    positions = positions[(positions >= 0) & (positions < len(shaft_phase))]
    phase = shaft_phase[positions]
    if machine.fault == "inner":  # the defect turns through the load zone once per revolution
        modulation = 0.5 * (1 + np.cos(phase))
    elif machine.fault == "ball":  # the ball is carried through the load zone by the cage
        modulation = 0.5 * (1 + np.cos(ratios["cage"] * phase))
    else:
        modulation = np.ones(len(positions))
    return positions, machine.fault_level * load[positions] * modulation


def _fft_size(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n: numpy's FFT of a length with a large prime factor is many times slower (1.5 s
    against 0.1 s at 4.8 million samples)."""
    best = 1 << (n - 1).bit_length()
    fives = 1
    while fives < best:
        odd = fives
        while odd < best:
            size = odd << ((n - 1) // odd).bit_length()  # the least odd * 2^a >= n
            best, odd = min(best, size), odd * 3
        fives *= 5
    return best


def _ring(positions: np.ndarray, amplitudes: np.ndarray, kernel: np.ndarray, n_samples: int) -> np.ndarray:
    """The first `n_samples` of the linear convolution of `kernel` with the impact train (`amplitudes` at
    `positions`), zero-padded to a fast FFT size. The train is built here, to be freed once transformed, and the
    spectra are multiplied in place: two arrays of the FFT's size at a time. The FFT itself is what it was (its
    samples to the bit), so these two cannot be made smaller."""
    size = _fft_size(n_samples + len(kernel) - 1)
    train = np.zeros(n_samples)
    np.add.at(train, positions, amplitudes)
    spectrum = np.fft.rfft(train, size)
    del train
    spectrum *= np.fft.rfft(kernel, size)
    return np.fft.irfft(spectrum, size)[:n_samples]


def machine_signal(machine: Machine, sample_rate: int, n_samples: int, seed: int = 0,
                   background=None, background_snr_db: float | None = None) -> np.ndarray:
    """`n_samples` float32 samples of `machine` at `sample_rate` Hz. `background`: a recorded noise (1-D, at
    `sample_rate`, or a (waveform, rate) pair as echo.data.sample returns, whose rate is checked) mixed in at
    `background_snr_db` dB below the machine (10 dB unless given; tiled if shorter). The samples are in the
    machine's units, not scaled to [-1, 1] (a random_machine's faulty clip may peak past 1.5): scale them before
    writing fixed-point audio."""
    if not isinstance(machine, Machine):
        raise ValueError(f"synthetic signal: machine must be a Machine, got {machine!r}")
    sample_rate = check_sample_rate(sample_rate, "synthetic signal: ")
    # None or a Generator would not reproduce the signal; numpy takes an integer of any size
    _check("machine_signal", "seed", seed, 0, integer=True, any_size=True)
    if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or n_samples < 1:
        raise ValueError(f"synthetic signal: n_samples must be a positive integer, got {n_samples!r}")
    if background is None and background_snr_db is not None:  # it was ignored: a clean clip, not the SNR asked
        raise ValueError(f"machine_signal.background_snr_db {background_snr_db!r} is given without a background: "
                         f"it sets the level of background= (a recorded noise); the machine's own white noise is "
                         f"Machine.noise")
    if background is not None:  # named as the caller knows it, before a long clip is generated for nothing
        background_snr_db = 10.0 if background_snr_db is None else background_snr_db
        _check("machine_signal", "background_snr_db", background_snr_db, -MAX_SNR_DB, MAX_SNR_DB)
    if isinstance(background, tuple) and len(background) == 2 and np.ndim(background[0]) > np.ndim(background[1]):
        background, background_rate = background  # a waveform and a scalar rate, not two samples or channels
        background_rate = check_sample_rate(background_rate, "synthetic signal: the background's ")
        if background_rate != sample_rate:  # mixed as it is, it would sound at another pitch and tempo
            raise ValueError(f"synthetic signal: the background is recorded at {background_rate} Hz, not at the "
                             f"signal's {sample_rate} Hz: resample it first")
    rng = np.random.default_rng(seed)
    nyquist = sample_rate / 2
    # Each full-length array is made once and worked on in place (8 bytes a sample each), and per-sample stages
    # run a block at a time: the samples are those of the whole-array expressions, operation for operation.
    speed = _varying(rng, n_samples, sample_rate, machine.shaft_hz, machine.speed_variation)
    top_speed = float(speed.max())  # a Python float: Nyquist over a shaft of 1e-320 Hz is inf, with no warning
    start = rng.uniform(0, 2 * np.pi)
    shaft_phase = np.cumsum(speed, out=speed)  # integrated in place: the speed's array becomes the phase
    del speed
    shaft_phase *= 2 * np.pi
    shaft_phase /= sample_rate
    shaft_phase += start
    load = _varying(rng, n_samples, sample_rate, machine.load, machine.load_variation)
    if machine.fault is not None:
        defect_top = machine.bearing.defect_frequencies(top_speed)[machine.fault]
        if defect_top >= nyquist:  # over one impact per two samples: the impact train itself would alias
            raise ValueError(f"synthetic signal: the {machine.fault} defect rate reaches {defect_top:.1f} Hz, at or "
                             f"above the Nyquist frequency {nyquist:g} Hz of sample rate {sample_rate}")

    healthy_1x = 0.1
    # misalignment's 2x and 3x are lines of their own: harmonics=1 or 2 left them out without a word
    lines = max(machine.harmonics, 3 if machine.misalignment else 1)
    below = int(min(lines, nyquist / top_speed + 1))  # never alias a harmonic: orders 1..below lie under Nyquist
    while below and below * top_speed >= nyquist:
        below -= 1
    # Each order below Nyquist draws a phase (a seed gives the signal it always gave), but only those whose
    # amplitude is not 0 are built or even drawn one by one: 0.1 * decay^k underflows to 0 after ~1500 orders
    # of a decay of 0.6 (surely once decay^k < e^-760), where a slow shaft has millions below Nyquist and
    # harmonics=10**9 means "all".
    decay = machine.harmonic_decay
    built = below if decay == 1 else min(below, 3 + math.ceil(-760 / (math.log(decay) if decay else -math.inf)))
    amplitudes = healthy_1x * decay ** np.arange(built)
    amplitudes[machine.harmonics:] = 0
    extras = (healthy_1x * machine.imbalance, healthy_1x * machine.misalignment,
              0.4 * healthy_1x * machine.misalignment)
    for index, extra in enumerate(extras[:built]):
        amplitudes[index] += extra
    phases = rng.uniform(0, 2 * np.pi, built)
    rng.bit_generator.advance(below - built)  # the draws of the orders left out, as if made
    tones = [(order, amplitude, phase) for order, (amplitude, phase) in enumerate(zip(amplitudes, phases), start=1)
             if amplitude]

    gear = None
    if machine.gear_teeth and (machine.gear_teeth + machine.sidebands) * top_speed < nyquist:
        # Levels m^j only fall: past the first that underflows to 0 (j ~ 810 for m = 0.4) no sideband is
        # built, and their phases are skipped over as if drawn, so that a seed gives the signal it always gave
        # and a million sidebands of a slow shaft cost no more than the ones heard.
        sideband_phases = []
        while len(sideband_phases) < machine.sidebands and machine.gear_modulation ** (len(sideband_phases) + 1):
            sideband_phases.append(rng.uniform(0, 2 * np.pi))
        rng.bit_generator.advance(machine.sidebands - len(sideband_phases))
        gear = sideband_phases, rng.uniform(0, 2 * np.pi)

    out = np.zeros(n_samples)
    _add_tones(out, machine, shaft_phase, load, tones, gear)
    impacts = None if machine.fault is None else _impacts(machine, rng, shaft_phase, load, sample_rate)
    del shaft_phase, load  # neither the ringing nor the noise needs them: freed before their arrays are made
    if impacts is not None:
        resonance = min(machine.resonance_hz, RESONANCE_LIMIT * sample_rate)  # above it: clipped, not refused
        out += _ring(*impacts, _resonance(sample_rate, resonance, machine.resonance_damping, n_samples), n_samples)

    noise = rng.standard_normal(n_samples)
    noise *= machine.noise
    out += noise
    del noise  # before the mix makes its arrays
    if background is not None:
        out = mix(out, background, background_snr_db, rng)
    with np.errstate(over="ignore"):  # checked below, with a message
        out = out.astype(np.float32)
    if not np.isfinite(out).all():  # levels beyond float32's range (a fault_level of 1e39, say)
        raise ValueError(f"synthetic signal: samples beyond float32's range (largest {np.abs(out).max()}): "
                         f"lower the machine's levels")
    return out


def _samples(values, what: str) -> np.ndarray:
    """`values` as float64 samples, refused by name where numpy would cast complex ones to their real part with
    only a warning, or fail in words of its own on a name (a bundled recording's) or a ragged list."""
    try:
        array = np.asarray(values)
    except ValueError:
        raise ValueError(f"{what} must be real-valued samples, got a ragged {type(values).__name__}") from None
    if array.dtype.kind not in "biuf":
        got = (f"the text {values!r}: load the recording first (echo.data.sample(name) for a bundled one)"
               if isinstance(values, str) else f"dtype {array.dtype}")
        raise ValueError(f"{what} must be real-valued samples, got {got}")
    return np.asarray(array, dtype=np.float64)


def mix(signal, noise, snr_db: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """`signal` plus `noise` scaled so that signal power / noise power = `snr_db`. A shorter noise is tiled,
    a longer one is cut at a random offset (drawn from `rng`, or 0 without one)."""
    # beyond +-200 dB one of the two is below float rounding of the other, and 10 ** (snr / 10) overflows
    _check("mix", "snr_db", snr_db, -MAX_SNR_DB, MAX_SNR_DB)
    if rng is not None and not isinstance(rng, np.random.Generator):
        raise ValueError(f"mix.rng must be a numpy Generator or None, got {rng!r}")
    signal = _samples(signal, "the signal to mix a background into")
    noise = _samples(noise, "background noise")
    if noise.ndim != 1 or noise.size == 0 or not np.any(noise):
        raise ValueError(f"background noise must be a non-silent 1-D waveform, got shape {noise.shape}")
    if signal.ndim != 1:
        raise ValueError(f"the signal to mix a background into must be 1-D, got shape {signal.shape}")
    # one NaN or Inf sets the power that scales the noise, and every mixed sample would be NaN
    for what, samples in (("background noise", noise), ("the signal to mix a background into", signal)):
        if not np.isfinite(samples).all():
            raise ValueError(f"{what} has {np.count_nonzero(~np.isfinite(samples))} NaN or infinite samples")
    if not np.any(signal):  # no power to set the background's level by
        raise ValueError("the signal to mix a background into is silent (e.g. a machine whose every component "
                         "lies above the Nyquist frequency, with no noise)")
    if len(noise) < len(signal):
        noise = np.tile(noise, math.ceil(len(signal) / len(noise)))
    offset = 0 if rng is None else int(rng.integers(0, len(noise) - len(signal) + 1))
    noise = noise[offset: offset + len(signal)]
    if not np.any(noise):  # a quiet stretch of a recording: no gain lifts it to the asked level
        raise ValueError(f"the background's samples {offset} to {offset + len(signal)} are silent: no level of "
                         f"them gives an SNR of {snr_db} dB (use a longer signal or a background without silences)")
    # Both are scaled by a power of two near their peak (exactly: the mix is the same to the bit), since squares
    # of samples past 1e154 overflow and those of samples under 1e-162 underflow to 0 (the mix came back NaN).
    exponents = [math.frexp(max(samples.max(), -samples.min()))[1] for samples in (signal, noise)]
    gain = math.sqrt(_scaled_power(signal, exponents[0]) / _scaled_power(noise, exponents[1]) / 10 ** (snr_db / 10))
    mixed = np.ldexp(noise, -exponents[1])  # one array of the signal's length, worked on in place
    mixed *= gain
    np.ldexp(mixed, exponents[0], out=mixed)
    mixed += signal
    return mixed


def _scaled_power(samples: np.ndarray, exponent: int) -> float:
    """The mean square of `samples` * 2^-exponent, squared in place: one array the size of `samples`, not two."""
    scaled = np.ldexp(samples, -exponent)
    return np.mean(np.square(scaled, out=scaled))


# A few common deep-groove bearings (balls, ball and pitch diameter in mm)
BEARINGS = {
    "6205": Bearing(9, 7.94, 39.04),
    "6203": Bearing(8, 6.75, 28.5),
    "6307": Bearing(8, 13.49, 57.5),
    "6008": Bearing(12, 7.14, 54.0),
}


def random_machine(seed: int, fault: str | None = None) -> Machine:
    """A plausible machine drawn at random (speed, harmonics, gear, bearing, resonance, drifts, noise), with
    the given bearing fault: the population the demo and pretraining augmentation draw from."""
    _check("random_machine", "seed", seed, 0, integer=True, any_size=True)
    rng = np.random.default_rng(seed)
    machine = Machine(
        shaft_hz=float(rng.uniform(10, 60)),
        harmonics=int(rng.integers(3, 10)),
        harmonic_decay=float(rng.uniform(0.3, 0.8)),
        imbalance=float(rng.exponential(0.2)),
        misalignment=float(rng.exponential(0.2)),
        gear_teeth=int(rng.choice([0, 0, 17, 23, 31, 41])),
        gear_level=float(rng.uniform(0.02, 0.1)),
        gear_modulation=float(rng.uniform(0.1, 0.6)),
        bearing=BEARINGS[str(rng.choice(list(BEARINGS)))],
        fault_level=float(rng.uniform(0.3, 1.0)),
        resonance_hz=float(rng.uniform(1500, 6000)),
        resonance_damping=float(rng.uniform(0.02, 0.1)),
        speed_variation=float(rng.uniform(0, 0.03)),
        load=float(rng.uniform(0.5, 1.5)),
        load_variation=float(rng.uniform(0, 0.2)),
        noise=float(rng.uniform(0.005, 0.05)),
    )
    return replace(machine, fault=fault)
