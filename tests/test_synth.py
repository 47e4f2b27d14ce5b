"""The synthetic machines' physics, checked with spectra computed here (scipy), against literature values."""
import re
import tracemalloc
from dataclasses import fields, replace
from fractions import Fraction

import numpy as np
import pytest
from scipy.signal import butter, correlate, find_peaks, hilbert, sosfiltfilt

import echo.data
from echo.data import synth

# Case Western Reserve bearing data centre, SKF 6205-2RS: defect frequencies as multiples of the shaft rate
SKF_6205 = {"outer": 3.5848, "inner": 5.4152, "ball": 2.3567, "cage": 0.39828}


def amplitude_spectrum(x, rate):
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)))) / (len(x) / 4)  # a sine of amplitude a reads ~a
    return np.fft.rfftfreq(len(x), 1 / rate), spectrum


def peak_near(freqs, spectrum, hz, width=2.0):
    band = np.abs(freqs - hz) <= width
    return spectrum[band].max()


def envelope_spectrum(x, rate, low, high):
    band = sosfiltfilt(butter(4, [low, high], btype="band", fs=rate, output="sos"), x)
    envelope = np.abs(hilbert(band))
    return amplitude_spectrum(envelope - envelope.mean(), rate)


def count_numpy_calls(monkeypatch, function: str) -> list:
    """A list that grows by one at each call of numpy's `function` from synth."""
    calls = []

    class CountingNumpy:
        def __getattr__(self, name):
            if name != function:
                return getattr(np, name)
            return lambda *args, **kwargs: calls.append(1) or getattr(np, name)(*args, **kwargs)

    monkeypatch.setattr(synth, "np", CountingNumpy())
    return calls


def count_uniform_draws(monkeypatch, limit: int | None = None) -> list:
    """A list that grows by one at each `uniform` draw of the generators synth makes (the phases), failing past
    `limit` draws."""
    draws = []
    default_rng = np.random.default_rng

    class Counting:
        def __init__(self, seed):
            self.rng = default_rng(seed)

        def __getattr__(self, name):
            return getattr(self.rng, name)

        def uniform(self, *args, **kwargs):
            draws.append(1)
            assert limit is None or len(draws) < limit, "a phase drawn per order"
            return self.rng.uniform(*args, **kwargs)

    monkeypatch.setattr(np.random, "default_rng", Counting)
    return draws


def test_defect_frequencies_match_the_published_6205_values():
    shaft = float(np.random.uniform(5, 60))
    got = synth.Bearing().defect_frequencies(shaft)
    for part, ratio in SKF_6205.items():
        assert got[part] == pytest.approx(ratio * shaft, rel=2e-4), part


@pytest.mark.parametrize("rate", [8000, 16000, 44100, 50000])
def test_any_rate_exact_length_and_determinism(rate):
    n = int(np.random.randint(rate // 10, rate // 2)) | 1  # odd, random length
    machine = synth.random_machine(int(np.random.randint(1 << 30)), fault="inner")
    seed = int(np.random.randint(1 << 30))
    x = synth.machine_signal(machine, rate, n, seed=seed)
    assert x.shape == (n,) and x.dtype == np.float32 and np.isfinite(x).all() and x.std() > 0
    assert np.array_equal(x, synth.machine_signal(machine, rate, n, seed=seed))
    assert not np.array_equal(x, synth.machine_signal(machine, rate, n, seed=seed + 1))


@pytest.mark.parametrize("fault", ["outer", "inner", "ball"])
@pytest.mark.parametrize("rate", [16000, 44100])
def test_envelope_spectrum_peaks_at_the_defect_frequency(fault, rate):
    shaft = float(np.random.uniform(20, 40))
    machine = synth.Machine(shaft_hz=shaft, fault=fault, resonance_hz=3000, noise=0.02)
    x = synth.machine_signal(machine, rate, 4 * rate, seed=int(np.random.randint(1 << 30)))
    freqs, spectrum = envelope_spectrum(x, rate, 2000, 4000)
    search = (freqs > 5) & (freqs < 400)
    strongest = freqs[search][np.argmax(spectrum[search])]
    expected = SKF_6205[fault] * shaft
    if fault != "ball":
        # the strongest envelope line is the defect rate (resolution 0.25 Hz, plus the 1 % slip)
        assert strongest == pytest.approx(expected, abs=0.5), (strongest, expected)
        return
    # A ball defect, carried through the load zone by the cage, puts nearly equal lines at BSF and 2 BSF (one
    # strike per BSF period here: a real ball strikes both races and leans to 2 BSF); in ~3 % of draws 2 BSF is
    # the taller. The strongest line is one of the
    # two, and the BSF line itself reaches 80 % of it (over 120 draws it never fell below 93 %).
    assert min(abs(strongest - expected), abs(strongest - 2 * expected)) <= 1.0, (strongest, expected)
    at_defect = spectrum[np.abs(freqs - expected) <= 0.5].max()
    assert at_defect >= 0.8 * spectrum[search].max(), (at_defect, spectrum[search].max())


def test_inner_race_is_modulated_by_the_shaft_and_outer_race_is_not():
    shaft, rate = 25.0, 16000
    lines = {}
    for fault in ("inner", "outer"):
        machine = synth.Machine(shaft_hz=shaft, fault=fault, noise=0.0, slip=0.0)
        freqs, spectrum = envelope_spectrum(synth.machine_signal(machine, rate, 8 * rate, seed=3), rate, 2000, 4000)
        carrier = SKF_6205[fault] * shaft
        lines[fault] = peak_near(freqs, spectrum, carrier + shaft, 0.3) / peak_near(freqs, spectrum, carrier, 0.3)
    assert lines["inner"] > 0.2  # sidebands at BPFI +- fr
    assert lines["outer"] < 0.05


def test_imbalance_raises_1x_and_misalignment_raises_2x():
    rate, shaft = 8000, 30.0
    seconds = 4

    def harmonics(**faults):
        x = synth.machine_signal(synth.Machine(shaft_hz=shaft, noise=0.001, **faults), rate, seconds * rate, seed=7)
        freqs, spectrum = amplitude_spectrum(x, rate)
        return peak_near(freqs, spectrum, shaft, 1), peak_near(freqs, spectrum, 2 * shaft, 1)

    healthy_1x, healthy_2x = harmonics()
    assert healthy_1x == pytest.approx(0.1, rel=0.05) and healthy_2x == pytest.approx(0.06, rel=0.05)
    ones = [harmonics(imbalance=level)[0] for level in (0.5, 1.0, 2.0)]
    assert ones[0] == pytest.approx(0.15, rel=0.05) and ones[2] == pytest.approx(0.3, rel=0.05)
    assert harmonics(imbalance=2.0)[1] == pytest.approx(healthy_2x, rel=0.05)
    twos = [harmonics(misalignment=level)[1] for level in (0.5, 1.0)]
    assert healthy_2x < twos[0] < twos[1] and twos[1] == pytest.approx(0.16, rel=0.05)
    assert harmonics(misalignment=1.0)[0] == pytest.approx(healthy_1x, rel=0.05)


def test_gear_mesh_with_shaft_sidebands():
    rate, shaft, teeth = 16000, 20.0, 31
    machine = synth.Machine(shaft_hz=shaft, harmonics=1, gear_teeth=teeth, gear_level=0.1, gear_modulation=0.4,
                            noise=0.0)
    freqs, spectrum = amplitude_spectrum(synth.machine_signal(machine, rate, 4 * rate, seed=1), rate)
    mesh = teeth * shaft
    assert peak_near(freqs, spectrum, mesh) == pytest.approx(0.1, rel=0.05)
    for j in (1, 2):
        for side in (-1, 1):
            assert peak_near(freqs, spectrum, mesh + side * j * shaft) == pytest.approx(0.1 * 0.4**j / 2, rel=0.1)


def test_speed_variation_smears_the_shaft_line():
    rate = 8000

    def concentration(variation):
        machine = synth.Machine(shaft_hz=30.0, harmonics=1, speed_variation=variation, noise=0.0)
        freqs, spectrum = amplitude_spectrum(synth.machine_signal(machine, rate, 20 * rate, seed=2), rate)
        energy = spectrum**2
        return energy[np.abs(freqs - 30) < 0.2].sum() / energy.sum()

    assert concentration(0.0) > 0.95 and concentration(0.05) < 0.6


def test_harmonics_above_nyquist_are_left_out():
    x = synth.machine_signal(synth.Machine(shaft_hz=900.0, harmonics=8, noise=0.0), 4000, 4000, seed=0)
    freqs, spectrum = amplitude_spectrum(x, 4000)
    kept = (np.abs(freqs - 900) < 3) | (np.abs(freqs - 1800) < 3)  # 1x and 2x lie below Nyquist (2000 Hz)
    assert peak_near(freqs, spectrum, 1800, 2) > 0.05
    assert spectrum[~kept].max() < 1e-3  # 3x..8x left out, so none aliases (3x would fold to 1300 Hz)


def test_recorded_noise_is_mixed_at_the_requested_snr():
    signal = np.random.randn(5000)
    noise = np.random.randn(1234)  # shorter: tiled
    snr = float(np.random.uniform(-5, 20))
    mixed = synth.mix(signal, noise, snr, np.random.default_rng(0))
    added = mixed - signal
    assert 10 * np.log10(np.mean(signal**2) / np.mean(added**2)) == pytest.approx(snr, abs=1e-9)
    machine = synth.Machine()
    clean = synth.machine_signal(machine, 8000, 8000, seed=4)
    noisy = synth.machine_signal(machine, 8000, 8000, seed=4, background=noise, background_snr_db=snr)
    assert noisy.shape == clean.shape and not np.allclose(noisy, clean)
    default = synth.machine_signal(machine, 8000, 8000, seed=4, background=noise)
    assert np.array_equal(default, synth.machine_signal(machine, 8000, 8000, seed=4, background=noise,
                                                        background_snr_db=10.0))


def test_a_silent_stretch_of_the_background_is_refused_by_name():
    """It was divided by, and the mixed signal came back all NaN (the demo's clips of 0.1 s met one)."""
    background = np.concatenate([np.zeros(300), np.random.randn(700)])
    with pytest.raises(ValueError, match="the background's samples 0 to 250 are silent"):
        synth.mix(np.random.randn(250), background, 10.0)
    mixed = synth.mix(np.random.randn(250), background[::-1].copy(), 10.0)  # its sound first: mixed as asked
    assert np.isfinite(mixed).all()


def test_a_bundled_recording_is_mixed_in_as_sample_returns_it():
    """echo.data.sample's (waveform, rate) pair is taken as it is, at the signal's rate."""
    background = echo.data.sample("voice_prompt")
    rate, snr = background[1], 12.0
    clean = synth.machine_signal(synth.Machine(), rate, 2 * rate, seed=5).astype(np.float64)
    noisy = synth.machine_signal(synth.Machine(), rate, 2 * rate, seed=5, background=background,
                                 background_snr_db=snr)
    added = noisy - clean
    assert 10 * np.log10(np.mean(clean**2) / np.mean(added**2)) == pytest.approx(snr, abs=0.01)
    recording = background[0].astype(np.float64)
    energy = np.cumsum(np.r_[0, recording**2])
    window_norms = np.sqrt(energy[len(added):] - energy[: len(energy) - len(added)])
    similarity = correlate(recording, added, mode="valid", method="fft") / np.linalg.norm(added) / window_norms
    assert similarity.max() > 0.999  # the recording itself, cut at some offset


def test_harmonics_beyond_nyquist_cost_nothing():
    """A count meaning "all of them" builds only the orders below Nyquist (1x and 2x here)."""
    x = synth.machine_signal(synth.Machine(shaft_hz=900.0, harmonics=10**12, harmonic_decay=0.5, noise=0.0),
                             4000, 4000, seed=0)
    freqs, spectrum = amplitude_spectrum(x, 4000)
    assert peak_near(freqs, spectrum, 900) == pytest.approx(0.1, rel=0.02)
    assert peak_near(freqs, spectrum, 1800) == pytest.approx(0.05, rel=0.02)
    kept = (np.abs(freqs - 900) < 3) | (np.abs(freqs - 1800) < 3)
    assert spectrum[~kept].max() < 1e-3


def test_a_slow_shaft_builds_only_the_orders_its_decay_leaves_above_zero(monkeypatch):
    """At 2 Hz and 48 kHz, 12000 orders lie below Nyquist, but 0.6^k underflows to 0 by k ~ 1460: each order
    was still built (a sine over every sample, 12 s for one second of signal at 1 Hz)."""
    sines = count_numpy_calls(monkeypatch, "sin")
    machine = synth.Machine(shaft_hz=2.0, harmonics=10**5, harmonic_decay=0.6, noise=0.0, speed_variation=0.0)
    x = synth.machine_signal(machine, 48000, 48000, seed=3)
    assert len(sines) < 1600
    freqs, spectrum = amplitude_spectrum(x, 48000)
    for order in (1, 2, 3):  # the orders it builds are as they were
        expected = 0.1 * 0.6 ** (order - 1)
        assert peak_near(freqs, spectrum, 2.0 * order, width=0.5) == pytest.approx(expected, rel=0.05)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown bearing fault 'cage'"):
        synth.Machine(fault="cage")
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        synth.machine_signal(synth.Machine(), 8000, 0)
    with pytest.raises(ValueError, match="sample rate 50 Hz is outside 100 to"):
        synth.machine_signal(synth.Machine(), 50, 100)
    with pytest.raises(ValueError, match="non-silent 1-D"):
        synth.mix(np.ones(10), np.zeros(10), 0.0)


NAN = float("nan")


@pytest.mark.parametrize("make, message", [
    (lambda: synth.Bearing(balls=0), "Bearing.balls must be an integer >= 1, got 0"),
    (lambda: synth.Bearing(balls=8.5), "Bearing.balls must be an integer >= 1, got 8.5"),
    (lambda: synth.Bearing(ball_diameter=0), "Bearing.ball_diameter must be a finite number > 0, got 0"),
    (lambda: synth.Bearing(ball_diameter=50), "Bearing.ball_diameter must be smaller than pitch_diameter 39.04, got 50"),
    (lambda: synth.Bearing(pitch_diameter=NAN), "Bearing.pitch_diameter must be a finite number > 0, got nan"),
    (lambda: synth.Bearing(contact_angle=90), "Bearing.contact_angle must be a finite number in [0, 90), got 90"),
    (lambda: synth.Bearing(contact_angle=-5), "Bearing.contact_angle must be a finite number in [0, 90), got -5"),
    (lambda: synth.Bearing().defect_frequencies(NAN),
     "Bearing.defect_frequencies.shaft_hz must be a finite number > 0, got nan"),
    (lambda: synth.Bearing().defect_frequencies(-30),
     "Bearing.defect_frequencies.shaft_hz must be a finite number > 0, got -30"),
    (lambda: synth.Machine(shaft_hz=NAN), "Machine.shaft_hz must be a finite number > 0, got nan"),
    (lambda: synth.Machine(shaft_hz=0), "Machine.shaft_hz must be a finite number > 0, got 0"),
    (lambda: synth.Machine(harmonics=0), "Machine.harmonics must be an integer >= 1, got 0"),
    (lambda: synth.Machine(harmonics=True), "Machine.harmonics must be an integer >= 1, got True"),
    (lambda: synth.Machine(harmonic_decay=1.5), "Machine.harmonic_decay must be a finite number in [0, 1], got 1.5"),
    (lambda: synth.Machine(imbalance=-0.1), "Machine.imbalance must be a finite number >= 0, got -0.1"),
    (lambda: synth.Machine(misalignment=float("inf")), "Machine.misalignment must be a finite number >= 0, got inf"),
    (lambda: synth.Machine(gear_level=-1), "Machine.gear_level must be a finite number >= 0, got -1"),
    (lambda: synth.Machine(fault_level=NAN), "Machine.fault_level must be a finite number >= 0, got nan"),
    (lambda: synth.Machine(load=-1), "Machine.load must be a finite number >= 0, got -1"),
    (lambda: synth.Machine(noise=-0.01), "Machine.noise must be a finite number >= 0, got -0.01"),
    (lambda: synth.Machine(sidebands=-1), "Machine.sidebands must be an integer >= 0, got -1"),
    (lambda: synth.Machine(gear_teeth=-17), "Machine.gear_teeth must be an integer >= 0, got -17"),
    (lambda: synth.Machine(gear_teeth=3), "Machine.gear_teeth must be 0 (no gear) or more than sidebands 3, got 3"),
    (lambda: synth.Machine(gear_modulation=2), "Machine.gear_modulation must be a finite number in [0, 1], got 2"),
    (lambda: synth.Machine(resonance_hz=0), "Machine.resonance_hz must be a finite number > 0, got 0"),
    (lambda: synth.Machine(resonance_hz=NAN), "Machine.resonance_hz must be a finite number > 0, got nan"),
    (lambda: synth.Machine(resonance_damping=0), "Machine.resonance_damping must be a finite number in (0, 1), got 0"),
    (lambda: synth.Machine(resonance_damping=1.5), "Machine.resonance_damping must be a finite number in (0, 1), got 1.5"),
    (lambda: synth.Machine(slip=-0.1), "Machine.slip must be a finite number in [0, 1), got -0.1"),
    (lambda: synth.Machine(speed_variation=1), "Machine.speed_variation must be a finite number in [0, 1), got 1"),
    (lambda: synth.Machine(load_variation=NAN), "Machine.load_variation must be a finite number in [0, 1), got nan"),
    (lambda: synth.Machine(bearing="6205"), "Machine.bearing must be a Bearing, got '6205'"),
    (lambda: synth.machine_signal(synth.Machine(shaft_hz=900.0, fault="inner"), 8000, 800),
     "the inner defect rate reaches 4873.7 Hz, at or above the Nyquist frequency 4000 Hz of sample rate 8000"),
    (lambda: synth.mix(np.ones(10), np.ones(10), NAN), "mix.snr_db must be a finite number in [-200.0, 200.0], got nan"),
    (lambda: synth.mix(np.ones(10), np.ones(10), 4000), "mix.snr_db must be a finite number in [-200.0, 200.0], got 4000"),
    (lambda: synth.mix(np.zeros(10), np.ones(10), 10), "lies above the Nyquist frequency, with no noise)"),
    (lambda: synth.mix(np.ones(10), np.array([0.1, NAN, float("inf")]), 10),
     "background noise has 2 NaN or infinite samples"),
    (lambda: synth.mix(np.array([0.1, NAN]), np.ones(10), 10),
     "the signal to mix a background into has 1 NaN or infinite samples"),
    (lambda: synth.mix(np.ones((2, 10)), np.ones(10), 10),
     "the signal to mix a background into must be 1-D, got shape (2, 10)"),
    (lambda: synth.mix(np.float64(1.0), np.ones(10), 10),
     "the signal to mix a background into must be 1-D, got shape ()"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=np.array([0.1, NAN])),
     "background noise has 1 NaN or infinite samples"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=(np.ones(100), 16000)),
     "synthetic signal: the background is recorded at 16000 Hz, not at the signal's 8000 Hz: resample it first"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=np.ones(100), background_snr_db=NAN),
     "machine_signal.background_snr_db must be a finite number in [-200.0, 200.0], got nan"),
    # without a background it was ignored: a clean clip where a noisy one was asked for
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background_snr_db=0.0),
     "machine_signal.background_snr_db 0.0 is given without a background: it sets the level of background= "
     "(a recorded noise); the machine's own white noise is Machine.noise"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=(np.ones((2, 100)), 8000)),
     "background noise must be a non-silent 1-D waveform, got shape (2, 100)"),
    (lambda: synth.machine_signal(synth.Machine(fault="outer", fault_level=1e39), 16000, 4000),
     "samples beyond float32's range (largest inf): lower the machine's levels"),
    # None would give another signal at each call: no seed reproduces it
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, seed=None),
     "machine_signal.seed must be an integer >= 0, got None"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, seed=-1),
     "machine_signal.seed must be an integer >= 0, got -1"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, seed=2.5),
     "machine_signal.seed must be an integer >= 0, got 2.5"),
    (lambda: synth.random_machine(-3), "random_machine.seed must be an integer >= 0, got -3"),
    (lambda: synth.random_machine(None), "random_machine.seed must be an integer >= 0, got None"),
    # past float's range: OverflowError, from float arithmetic after the check or from math.isfinite in it; the
    # repr of an int past 4300 digits is itself refused (ValueError, naming no field)
    (lambda: synth.Bearing(balls=10**400),
     "Bearing.balls must be an integer >= 1, got 1.000e+400 (past float's range)"),
    (lambda: synth.Bearing().defect_frequencies(-(10**400)),
     "Bearing.defect_frequencies.shaft_hz must be a finite number > 0, got -1.000e+400 (past float's range)"),
    (lambda: synth.Machine(load=Fraction(10**401, 3)),
     "Machine.load must be a finite number >= 0, got 3.333e+400 (past float's range)"),
    (lambda: synth.Machine(gear_teeth=10**308, sidebands=9 * 10**307),
     "Machine.gear_teeth + sidebands must be an integer >= 0, got 1.900e+308 (past float's range)"),
    (lambda: synth.mix(np.ones(10), np.ones(10), 10**400),
     "mix.snr_db must be a finite number in [-200.0, 200.0], got 1.000e+400 (past float's range)"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, seed=-(10**5000)),
     "machine_signal.seed must be an integer >= 0, got -1.000e+5000 (past float's range)"),
    # numpy's own words ("could not convert string to float: 'circular_saw'"), a complex background cast to its
    # real part with only a warning, a rate given as text compared as unequal to the same number
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background="circular_saw"),
     "background noise must be real-valued samples, got the text 'circular_saw': "
     "load the recording first (echo.data.sample(name) for a bundled one)"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=np.ones(100) * 1j),
     "background noise must be real-valued samples, got dtype complex128"),
    (lambda: synth.mix(np.ones(10), [np.ones(3), 0.5], 10),
     "background noise must be real-valued samples, got a ragged list"),
    (lambda: synth.mix([None, 1.0], np.ones(10), 10),
     "the signal to mix a background into must be real-valued samples, got dtype object"),
    (lambda: synth.machine_signal(synth.Machine(), 8000, 800, background=(np.ones(100), "8000")),
     "synthetic signal: the background's sample rate must be an integer number of Hz, got '8000'"),
    (lambda: synth.machine_signal(None, 8000, 800), "synthetic signal: machine must be a Machine, got None"),
    (lambda: synth.mix(np.ones(10), np.ones(10), 10, rng=3), "mix.rng must be a numpy Generator or None, got 3"),
])
def test_bad_parameters_are_named_with_their_value(make, message):
    with pytest.raises(ValueError) as caught:
        make()
    assert str(caught.value).endswith(message)


def test_edge_parameters_still_make_a_signal():
    # a resonance above Nyquist is clipped to 0.4 of the rate; the thinnest gear keeps its sidebands above 0 Hz
    for machine in (synth.Machine(fault="outer", resonance_hz=1e6), synth.Machine(gear_teeth=4, sidebands=3),
                    synth.Machine(fault="ball", bearing=synth.Bearing(contact_angle=89.9), slip=0.0, noise=0.0)):
        x = synth.machine_signal(machine, 8000, 800)
        assert np.isfinite(x).all() and x.std() > 0
    # a slow, barely damped mode rings for ~1100 s; only the clip's length of it is built
    assert len(synth._resonance(8000, 10.0, 1e-4, 800)) == 800
    assert len(synth._resonance(8000, 3000.0, 0.05, 8000)) == int(np.log(1000) / (0.05 * 2 * np.pi * 3000) * 8000)


def textbook_defect_frequencies(balls, ball_diameter, pitch_diameter, contact_angle, shaft):
    """The textbook formulas (e.g. Randall and Antoni 2011, Rolling element bearing diagnostics), written out
    here rather than taken from the module."""
    ratio = ball_diameter / pitch_diameter * np.cos(np.radians(contact_angle))
    return {"cage": shaft / 2 * (1 - ratio), "outer": balls * shaft / 2 * (1 - ratio),
            "inner": balls * shaft / 2 * (1 + ratio),
            "ball": pitch_diameter / (2 * ball_diameter) * shaft * (1 - ratio**2)}


def random_bearing():
    pitch = float(np.random.uniform(25, 80))
    return synth.Bearing(int(np.random.randint(6, 16)), float(np.random.uniform(0.1, 0.3)) * pitch, pitch,
                         float(np.random.uniform(0, 40)))


def test_defect_frequencies_follow_the_textbook_formulas_for_any_geometry():
    bearing, shaft = random_bearing(), float(np.random.uniform(5, 60))
    got = bearing.defect_frequencies(shaft)
    expected = textbook_defect_frequencies(bearing.balls, bearing.ball_diameter, bearing.pitch_diameter,
                                           bearing.contact_angle, shaft)
    assert got == pytest.approx(expected, rel=1e-12)
    # the identities that tie them: each ball passes a point of the outer race at the cage rate, and the two
    # races see n balls per shaft turn between them
    assert got["outer"] == pytest.approx(bearing.balls * got["cage"], rel=1e-12)
    assert got["outer"] + got["inner"] == pytest.approx(bearing.balls * shaft, rel=1e-12)


@pytest.mark.parametrize("fault", ["outer", "inner", "ball"])
def test_impacts_come_at_the_textbook_rate_for_any_geometry(fault):
    """An angular-contact bearing of random geometry, at the pump's 8 kHz: the envelope line within 15 % of the
    textbook rate (its sidebands lie a shaft or cage period away) lies on it."""
    rate, shaft, bearing = 8000, float(np.random.uniform(15, 25)), random_bearing()
    expected = textbook_defect_frequencies(bearing.balls, bearing.ball_diameter, bearing.pitch_diameter,
                                           bearing.contact_angle, shaft)[fault]
    machine = synth.Machine(shaft_hz=shaft, fault=fault, bearing=bearing, resonance_hz=3000, noise=0.01)
    x = synth.machine_signal(machine, rate, 4 * rate, seed=int(np.random.randint(1 << 30)))
    freqs, spectrum = envelope_spectrum(x, rate, 2100, 3900)
    near = np.abs(freqs - expected) < 0.15 * expected
    assert freqs[near][np.argmax(spectrum[near])] == pytest.approx(expected, abs=0.5), (bearing, shaft)


def test_a_ball_fault_is_modulated_by_the_cage():
    """The ball is carried through the load zone at the cage rate: lines at FTF and BSF +- FTF, none of which
    the unmodulated outer race has."""
    shaft, rate = 25.0, 16000
    rates = textbook_defect_frequencies(9, 7.94, 39.04, 0.0, shaft)
    relative = {}
    for fault in ("ball", "outer"):
        machine = synth.Machine(shaft_hz=shaft, fault=fault, noise=0.0, slip=0.0)
        freqs, spectrum = envelope_spectrum(synth.machine_signal(machine, rate, 8 * rate, seed=3), rate, 2000, 4000)
        carrier = peak_near(freqs, spectrum, rates[fault], 0.3)
        relative[fault] = [peak_near(freqs, spectrum, hz, 0.3) / carrier
                           for hz in (rates["cage"], rates[fault] - rates["cage"], rates[fault] + rates["cage"])]
    assert min(relative["ball"]) > 0.2 and max(relative["outer"]) < 0.01, relative


def test_speed_variation_integrates_the_phase():
    """The phase is the integral of the drifting speed, not speed(t) * t (whose frequency, speed + t * speed',
    runs off by Hz per second): the 1x line's instantaneous frequency stays within the variation, and the
    outer race's impacts follow the shaft, 1 / (BPFO / fr) of a turn apart however fast it turns."""
    rate, shaft, variation = 8000, 20.0, 0.3
    machine = synth.Machine(shaft_hz=shaft, harmonics=1, imbalance=10.0, speed_variation=variation, fault="outer",
                            slip=0.0, resonance_damping=0.1, noise=0.0)
    x = synth.machine_signal(machine, rate, 10 * rate, seed=int(np.random.randint(1 << 30))).astype(np.float64)
    turns = np.unwrap(np.angle(hilbert(sosfiltfilt(butter(4, 100, fs=rate, output="sos"), x)))) / (2 * np.pi)
    middle = slice(rate, -rate)  # the ends of a Hilbert transform ring
    speed = np.diff(turns)[middle] * rate
    assert speed.min() > shaft * (1 - variation) - 0.5 and speed.max() < shaft * (1 + variation) + 0.5
    assert speed.max() - speed.min() > 0.2 * shaft * variation  # it does drift
    rings = np.abs(hilbert(sosfiltfilt(butter(4, 1000, btype="high", fs=rate, output="sos"), x)))
    impacts, _ = find_peaks(rings[middle], height=0.1 * rings.max(), distance=rate // 200)
    per_turn = textbook_defect_frequencies(9, 7.94, 39.04, 0.0, 1.0)["outer"]
    error = np.abs(np.diff(turns[middle][impacts]) * per_turn - 1)  # one in some 600 meets a clipped ring
    assert np.percentile(error, 99) < 0.03, np.sort(error)[-10:]


def test_nothing_folds_into_the_band_at_low_rates():
    """At 1 kHz a mesh at 23 x 29.5 = 678.5 Hz (sidebands to 767 Hz) is left out rather than folded to
    1000 - 678.5 = 321.5 Hz, and a 2.7 kHz resonance rings at 0.4 x 1000 = 400 Hz, not folded to 300 Hz."""
    rate = 1000
    gear = synth.Machine(harmonics=1, gear_teeth=23, gear_level=0.1, noise=0.0)
    freqs, spectrum = amplitude_spectrum(synth.machine_signal(gear, rate, 4 * rate, seed=1), rate)
    assert spectrum[freqs > 40].max() < 1e-3  # only the 1x line at 29.5 Hz
    assert peak_near(freqs, spectrum, 29.5, 1) == pytest.approx(0.1, rel=0.05)
    faulty = synth.Machine(harmonics=1, fault="outer", resonance_hz=2700, noise=0.0)
    x = synth.machine_signal(faulty, rate, 4 * rate, seed=1)
    assert np.array_equal(x, synth.machine_signal(replace(faulty, resonance_hz=400), rate, 4 * rate, seed=1))
    freqs, spectrum = amplitude_spectrum(x, rate)
    energy = spectrum**2 * (freqs > 40)
    assert np.sum(freqs * energy) / np.sum(energy) == pytest.approx(400, abs=30)


def test_the_seed_alone_sets_the_signal():
    """Neither numpy's global state nor the calls made before (at other rates, other seeds) changes a clip."""
    machine = synth.random_machine(11, fault="ball")
    np.random.seed(1)
    first = synth.machine_signal(machine, 16000, 8000, seed=5)
    np.random.seed(2)
    np.random.random(17)
    for rate in (8000, 44100):
        synth.machine_signal(machine, rate, 4000, seed=6)
    assert np.array_equal(first, synth.machine_signal(machine, 16000, 8000, seed=5))
    assert not np.allclose(first, synth.machine_signal(machine, 16000, 8000, seed=6))
    huge = 2**1100  # numpy takes any non-negative integer as a seed, beyond float's range too
    assert np.array_equal(synth.machine_signal(machine, 16000, 800, seed=huge),
                          synth.machine_signal(machine, 16000, 800, seed=huge))
    assert synth.random_machine(huge) == synth.random_machine(huge)
    with pytest.raises(ValueError, match=r"machine_signal.seed must be an integer >= 0, got Generator\(PCG64\)"):
        synth.machine_signal(machine, 16000, 800, seed=np.random.default_rng(0))  # another signal at each use


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_shortest_clips(n):
    machine = synth.Machine(fault="inner", gear_teeth=23, speed_variation=0.1, load_variation=0.1)
    x = synth.machine_signal(machine, 8000, n, seed=0)
    assert x.shape == (n,) and np.isfinite(x).all()


def test_misalignment_adds_its_2x_and_3x_whatever_the_harmonic_count():
    """Misalignment's extra 2x (and 3x at 40 % of it) are lines of their own: with harmonics=1 or 2 they were
    left out, and the misaligned machine sounded healthy."""
    rate, shaft = 8000, 30.0
    for harmonics, expected in ((1, (0.1, 0.1, 0.04)), (2, (0.1, 0.06 + 0.1, 0.04))):
        machine = synth.Machine(shaft_hz=shaft, harmonics=harmonics, misalignment=1.0, noise=0.0)
        freqs, spectrum = amplitude_spectrum(synth.machine_signal(machine, rate, 2 * rate, seed=7), rate)
        for order, amplitude in enumerate(expected, start=1):
            assert peak_near(freqs, spectrum, order * shaft) == pytest.approx(amplitude, rel=0.05), (harmonics, order)
        assert peak_near(freqs, spectrum, 4 * shaft) < 1e-3  # no healthy 4x for a count of 1 or 2


def test_a_very_slow_shaft_draws_no_phase_one_by_one_for_orders_it_does_not_build(monkeypatch):
    """At 0.05 Hz and 8 kHz, 80 000 orders lie below Nyquist, and each drew its phase in a call of its own (and
    held an amplitude), though 0.6^k is 0 past ~1460 orders: a minute for a 0.0001 Hz shaft, 8 GB at 1e-9 Hz."""
    count_uniform_draws(monkeypatch, limit=100)  # fails at once, not after a minute or 8 GB
    for shaft in (0.05, 1e-9):
        machine = synth.Machine(shaft_hz=shaft, harmonics=10**9, imbalance=1.0, noise=0.0)
        x = synth.machine_signal(machine, 8000, 8000, seed=3)
        assert np.isfinite(x).all() and 0 < np.abs(x).max() < 0.5  # 0.2 at 1x, 0.1 x 0.6^(k-1) above


@pytest.mark.parametrize("signal_scale, noise_scale", [(1e200, 1.0), (1.0, 1e-200), (1e-170, 1e-170),
                                                       (1e-300, 1e300), (1e300, 1e-300)])
def test_mix_keeps_the_snr_at_any_scale(signal_scale, noise_scale):
    """Powers were means of squares: samples past 1e154 overflowed and under 1e-162 underflowed to a power of
    0, and the whole mix came back NaN."""
    signal, noise = np.random.randn(500) * signal_scale, np.random.randn(300) * noise_scale
    snr = float(np.random.uniform(-10, 20))
    mixed = synth.mix(signal, noise, snr, np.random.default_rng(1))
    assert np.isfinite(mixed).all()

    def rms(x):
        return np.abs(x).max() * np.sqrt(np.mean((x / np.abs(x).max()) ** 2))

    assert 20 * np.log10(rms(signal) / rms(mixed - signal)) == pytest.approx(snr, abs=1e-6)


def test_gear_sidebands_whose_level_is_0_are_neither_built_nor_drawn_one_by_one(monkeypatch):
    """0.4^j underflows to 0 past j ~ 810, yet each of a million sidebands (a shaft slow enough to hold them
    under Nyquist) was built over every sample and drew its phase in a call of its own: 30 s for 1000 samples.
    Their draws are still made (a seed gives the signal it always gave), skipped over at once."""
    cosines, draws = count_numpy_calls(monkeypatch, "cos"), count_uniform_draws(monkeypatch)
    audible = sum(1 for j in range(1, 2000) if 0.4**j)
    machine = synth.Machine(shaft_hz=1e-4, harmonics=1, gear_teeth=10**6 + 1, sidebands=10**6, noise=0.0)
    x = synth.machine_signal(machine, 8000, 1000, seed=0)
    assert np.isfinite(x).all() and np.abs(x).max() > 0
    assert len(cosines) == audible and len(draws) < audible + 10


def largest_prime_factor(n: int) -> int:
    factor, largest = 2, 1
    while factor * factor <= n:
        while n % factor == 0:
            n, largest = n // factor, factor
        factor += 1
    return max(largest, n)


def test_the_resonance_is_convolved_at_a_fast_fft_size(monkeypatch):
    """The FFT ran at the clip's length plus the ring's, whatever its prime factors: at 4.8 million samples
    (100 s at 48 kHz) numpy's FFT of such a length took 1.5 s where one of a 5-smooth length a little longer
    takes 0.1 s, three of them a call. The convolution is the same."""
    sizes = []
    rfft = np.fft.rfft
    monkeypatch.setattr(np.fft, "rfft", lambda x, n=None, **kwargs: sizes.append(n) or rfft(x, n, **kwargs))
    n = 100_003  # a prime: with the ring's length added, a size of a large prime factor
    synth.machine_signal(synth.Machine(fault="outer"), 8000, n, seed=int(np.random.randint(1 << 30)))
    assert sizes and all(largest_prime_factor(size) <= 5 for size in sizes), sizes
    monkeypatch.undo()
    positions = np.random.randint(0, 1009, 60)  # some repeat: their amplitudes add up
    amplitudes, kernel = np.random.randn(60), np.random.randn(211)
    train = np.zeros(1009)
    np.add.at(train, positions, amplitudes)
    assert np.allclose(synth._ring(positions, amplitudes, kernel, 1009), np.convolve(train, kernel)[:1009], atol=1e-12)


@pytest.mark.parametrize("machine, background", [
    (synth.Machine(gear_teeth=23, speed_variation=0.02, load_variation=0.1), None),
    (synth.Machine(fault="inner", gear_teeth=23, speed_variation=0.02, load_variation=0.1), None),
    (synth.Machine(fault="outer"), np.random.default_rng(0).standard_normal(48000)),
])
def test_the_peak_memory_is_a_few_arrays_of_the_clip(machine, background):
    """Every stage made float64 temporaries of the whole clip (drift, phases, each harmonic's sine, the impact
    train, four FFT arrays, the mix's scaled copies): 56 to 112 bytes a sample at the peak, 19 GB for an hour at
    48 kHz. Now three float64 arrays of the clip's length at a time (phase, load and sum; or sum and two spectra;
    or signal, tiled background and one scaled copy), plus blocks of 64 Ki samples."""
    rate, n = 48000, 48000 * 16
    synth.machine_signal(machine, rate, 1000, background=background)  # one-time allocations (FFT plans) first
    tracemalloc.start()
    try:
        x = synth.machine_signal(machine, rate, n, seed=1, background=background)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert x.shape == (n,) and np.isfinite(x).all()
    assert peak / n < 30, f"{peak / n:.1f} bytes a sample"


def test_the_block_size_changes_no_sample(monkeypatch):
    """The per-sample stages run a block at a time: cut anywhere (a one-block run is the whole-array arithmetic of
    old), the samples a seed gives are the same to the bit, the demo's and the model card's numbers with them."""
    machine = synth.Machine(fault="ball", gear_teeth=31, speed_variation=0.03, load_variation=0.2)
    n = 4001
    monkeypatch.setattr(synth, "BLOCK", n)
    whole = synth.machine_signal(machine, 16000, n, seed=4)
    for block in (1, 997):
        monkeypatch.setattr(synth, "BLOCK", block)
        assert np.array_equal(synth.machine_signal(machine, 16000, n, seed=4), whole), block


@pytest.mark.parametrize("cls", [synth.Bearing, synth.Machine])
def test_every_field_is_described_in_its_class_docstring(cls):
    """help(synth.Machine) said only that amplitudes are relative to a 1x of 0.1: what fault_level, load or
    gear_level mean, and in what unit, lay in source comments (where there were any)."""
    missing = [field.name for field in fields(cls) if not re.search(rf"\b{field.name}\b", cls.__doc__)]
    assert not missing, missing


@pytest.mark.parametrize("cls", [synth.Bearing, synth.Machine])
def test_every_field_refuses_a_number_past_floats_range_by_name(cls):
    """10**400 passed the integer fields' checks (10**400 <= inf holds) and met float arithmetic later, and
    math.isfinite overflowed in the others' checks: OverflowError, naming no field."""
    for field in fields(cls):
        if field.name in ("bearing", "fault"):
            continue
        with pytest.raises(ValueError, match=rf"^{cls.__name__}\.{field.name} must be .*, got 1\.000e\+400 "
                                             r"\(past float's range\)$"):
            cls(**{field.name: 10**400})


# Tests added by a mutation audit of the generator's physics: each one failed on a one-line edit that the tests
# above let through.


def test_load_scales_the_gear_mesh_and_the_bearing_impacts_not_the_shaft_harmonics():
    """The module says load scales the gear mesh and the bearing impacts: a mesh of gear_level x load, impacts
    (rung above 1 kHz here) whose level follows the load, and a 1x line that does not move."""
    rate, shaft, teeth = 16000, 20.0, 23
    load = float(np.random.uniform(1.5, 3.0))
    seed = int(np.random.randint(1 << 30))
    gear = synth.Machine(shaft_hz=shaft, harmonics=1, gear_teeth=teeth, gear_level=0.1, gear_modulation=0.0,
                         noise=0.0)
    for level in (1.0, load):
        x = synth.machine_signal(replace(gear, load=level), rate, 4 * rate, seed)
        freqs, spectrum = amplitude_spectrum(x, rate)
        assert peak_near(freqs, spectrum, teeth * shaft) == pytest.approx(0.1 * level, rel=0.03), level
        assert peak_near(freqs, spectrum, shaft) == pytest.approx(0.1, rel=0.03), level
    faulty = synth.Machine(shaft_hz=shaft, harmonics=1, fault="outer", resonance_hz=3000, noise=0.0)
    high = butter(4, 1000, btype="high", fs=rate, output="sos")
    rms = [np.sqrt(np.mean(sosfiltfilt(high, synth.machine_signal(replace(faulty, load=level), rate, 2 * rate, seed)
                                       .astype(np.float64)) ** 2)) for level in (1.0, load)]
    assert rms[1] / rms[0] == pytest.approx(load, rel=0.02), (rms, load)


def test_load_variation_drifts_the_load_by_its_own_amount():
    """load_variation, not speed_variation, sets how far the load drifts: the envelope of a mesh tone (no shaft
    modulation, no speed drift) swings by +-load_variation around gear_level x load, reaching its full variation
    within the clip, and stays flat without it."""
    rate, shaft, teeth, variation = 8000, 20.0, 31, float(np.random.uniform(0.2, 0.4))
    machine = synth.Machine(shaft_hz=shaft, harmonics=1, imbalance=0.0, gear_teeth=teeth, gear_level=0.1,
                            gear_modulation=0.0, noise=0.0)
    band = butter(4, [teeth * shaft - 100, teeth * shaft + 100], btype="band", fs=rate, output="sos")
    middle = slice(rate, -rate)  # the ends of a filtered, Hilbert-transformed clip ring
    seed = int(np.random.randint(1 << 30))
    for load_variation in (0.0, variation):
        x = synth.machine_signal(replace(machine, load_variation=load_variation), rate, 20 * rate, seed)
        envelope = np.abs(hilbert(sosfiltfilt(band, x.astype(np.float64))))[middle] / 0.1
        deviation = np.abs(envelope - 1).max()
        if load_variation == 0:
            assert deviation < 0.01, deviation
        else:  # the drift's peak may fall in the trimmed ends: most of it lies inside
            assert 0.7 * variation < deviation < variation + 0.01, (deviation, variation)


def test_a_gear_whose_top_sideband_reaches_nyquist_is_left_out_whole():
    """The mesh itself lies below Nyquist but its upper sidebands do not: the whole gear is left out, rather
    than its top sidebands folded back under Nyquist."""
    rate, shaft = 1000, np.random.randint(60, 100) / 4  # 15 to 25 Hz, on a bin of the 4 s spectrum
    teeth = int(np.ceil(500 / shaft)) - 1  # the mesh under 500 Hz, mesh + 3 shaft rates above
    assert teeth * shaft < 500 <= (teeth + 3) * shaft and teeth > 3
    machine = synth.Machine(shaft_hz=shaft, harmonics=1, gear_teeth=teeth, gear_level=0.1, noise=0.0)
    freqs, spectrum = amplitude_spectrum(synth.machine_signal(machine, rate, 4 * rate, seed=1), rate)
    assert spectrum[freqs > 2 * shaft].max() < 1e-3  # only the 1x line
    assert peak_near(freqs, spectrum, shaft, 1) == pytest.approx(0.1, rel=0.05)


def test_a_defect_rate_that_reaches_nyquist_only_at_the_top_speed_is_refused():
    """At its nominal speed the outer race's impacts come at 99.9 % of Nyquist; a speed drift of 50 % carries
    them past it within a clip of a minute, where the impact train would alias."""
    rate = 1000
    ratio = textbook_defect_frequencies(9, 7.94, 39.04, 0.0, 1.0)["outer"]
    machine = synth.Machine(shaft_hz=0.999 * 500 / ratio, harmonics=1, fault="outer", noise=0.0)
    synth.machine_signal(machine, rate, 60 * rate, seed=0)  # steady: below Nyquist, made
    with pytest.raises(ValueError, match="the outer defect rate reaches .* Hz, at or above the Nyquist"):
        synth.machine_signal(replace(machine, speed_variation=0.5), rate, 60 * rate,
                             seed=int(np.random.randint(1 << 30)))


def test_different_seeds_draw_different_machines():
    seeds = [int(np.random.randint(1 << 30)), int(np.random.randint(1 << 30))]
    assert seeds[0] != seeds[1]
    first, second = (synth.random_machine(int(seed)) for seed in seeds)
    assert first == synth.random_machine(int(seeds[0])) and first != second
    assert first.shaft_hz != second.shaft_hz  # drawn from 10 to 60 Hz: equal only if drawn alike


def test_impacts_slip_by_the_given_fraction_of_the_defect_period():
    """Impacts slip by `slip` of a defect period (not of a shaft turn, 3.6 times as long for a 6205's outer race):
    the intervals between impacts, each the difference of two independent slips, vary by sqrt(2) x slip x period."""
    rate, shaft, slip = 16000, 20.0, float(np.random.uniform(0.03, 0.06))
    machine = synth.Machine(shaft_hz=shaft, harmonics=1, fault="outer", slip=slip, resonance_hz=3000,
                            resonance_damping=0.1, noise=0.0)
    x = synth.machine_signal(machine, rate, 10 * rate, seed=int(np.random.randint(1 << 30))).astype(np.float64)
    rings = np.abs(hilbert(sosfiltfilt(butter(4, 1000, btype="high", fs=rate, output="sos"), x)))
    period = rate / textbook_defect_frequencies(9, 7.94, 39.04, 0.0, shaft)["outer"]
    impacts, _ = find_peaks(rings, height=0.3 * rings.max(), distance=int(0.5 * period))
    intervals = np.diff(impacts)
    assert len(intervals) > 600 and np.median(intervals) == pytest.approx(period, rel=0.02)
    assert np.std(intervals) / (np.sqrt(2) * period) == pytest.approx(slip, rel=0.25), (np.std(intervals), period)


def test_a_longer_background_is_cut_where_the_seed_says():
    """A background longer than the clip is cut at an offset drawn from the clip's seed: two seeds hear
    different stretches of it, one seed always the same."""
    rate, n = 8000, 4000
    background = np.random.default_rng(int(np.random.randint(1 << 30))).standard_normal(40 * n)
    machine = synth.Machine()

    def offset(seed):
        clean = synth.machine_signal(machine, rate, n, seed=seed).astype(np.float64)
        added = synth.machine_signal(machine, rate, n, seed=seed, background=background,
                                     background_snr_db=0.0) - clean
        return int(np.argmax(correlate(background, added, mode="valid", method="fft")))

    seeds = [int(np.random.randint(1 << 30)) for _ in range(3)]
    offsets = [offset(seed) for seed in seeds]
    assert offset(seeds[0]) == offsets[0]
    assert len(set(offsets)) == 3, offsets  # all equal (e.g. all 0) when the seed's generator is not used
