import numpy as np
import pytest
import torch

import echo.fast as fast
from echo import inputs
from conftest import random_model, rel_err


@pytest.fixture(scope="module")
def model():
    return random_model("tiny")


@pytest.mark.parametrize(
    "signal,rate,message",
    [
        (torch.zeros(0), 16000, "signal is empty"),
        (torch.randn(300), 16000, r"signal of 300 samples is shorter than one 25 ms window at 16000 Hz \(400 samples\)"),
        (torch.randn(2, 3, 16000), 16000, r"1-D \(samples\) or 2-D \(channels, samples\), got shape \(2, 3, 16000\)"),
        (torch.tensor([0.0] * 500 + [float("nan")]), 16000, "1 NaN or Inf sample\\(s\\), the first at index 500$"),
        (torch.tensor([float("inf")] * 600), 16000, "600 NaN or Inf"),
        (torch.zeros(2, 800).index_put_((torch.tensor([1, 1]), torch.tensor([7, 9])), torch.tensor(float("nan"))),
         16000, "2 NaN or Inf sample\\(s\\), the first at channel 1, index 7$"),
        (torch.ones(16000, dtype=torch.uint8), 16000, "unsupported dtype torch.uint8"),
        (np.ones(16000, dtype=np.complex64), 16000, "unsupported dtype complex64"),
        ([0.0] * 16000, 16000, "torch.Tensor or numpy array, got list"),
        (torch.randn(16000), 99, "99 Hz is outside 100 to 10000000 Hz"),
        (torch.randn(16000), 10**30, "outside 100 to 10000000 Hz"),
        (np.full(16000, 1e300), 16000, r"16000 sample\(s\) beyond float32's range .*, the first at index 0$"),
        (torch.randn(16000), 16000.5, "integer number of Hz, got 16000.5"),
        (torch.randn(16000), "16000", "integer number of Hz, got '16000'"),
        (torch.randn(16000, 2), 16000, r"pass \(channels, samples\)"),
        (np.array(0.5), 16000, r"1-D \(samples\) or 2-D \(channels, samples\), got shape \(\)"),  # not 1 sample
        (torch.randn(16000), 10**400, "outside 100 to 10000000 Hz"),  # an int no float holds: not an OverflowError
    ],
)
def test_bad_input_is_a_clear_value_error(model, signal, rate, message):
    with pytest.raises(ValueError, match=message):
        model.encode(signal, rate)


def test_int16_pcm_is_scaled(model):
    pcm = (torch.randn(8000) * 3000).to(torch.int16)
    u_int, _ = model.encode(pcm, 8000)
    u_float, _ = model.encode(pcm.float() / 32768, 8000)
    assert torch.equal(u_int, u_float)


def test_numpy_and_float64_accepted(model):
    x = np.random.randn(12000)
    u_np, _ = model.encode(x, 12000)
    u_t, _ = model.encode(torch.from_numpy(x).float(), np.int64(12000))
    assert rel_err(u_np, u_t) < 1e-5  # float64 loses its DC before it is rounded to float32
    u_long, _ = model.encode(x.astype(np.longdouble), torch.tensor(12000))  # float128 where numpy has it
    u_0d, _ = model.encode(x, np.array(12000))
    assert torch.equal(u_long, u_np) and torch.equal(u_0d, u_np)


def test_a_float64_signal_on_a_large_offset_keeps_its_variation(model):
    """A pressure in Pa (1e5 + 1e-2 sin) was cast to float32 before its DC was taken off, and the offset's rounding
    (2^-7 at 1e5) replaced the variation on it: the embedding was that of a quantised signal."""
    variation = 1e-2 * np.random.randn(2, inputs.SUM_BLOCK + 1001)  # over two of the blocks it is centred in
    expected = model.encode(variation, 8000)[0]
    for encoded in (model.encode(1e5 + variation, 8000)[0], fast.encode(model, [1e5 + variation], 8000)[0]):
        assert rel_err(encoded, expected) < 1e-5
    apart = np.concatenate([np.full(400, 3e38), np.full(400, -3e38)])  # less its mean still within float32
    assert torch.isfinite(model.encode(apart, 16000)[0]).all()


def test_a_float64_signal_whose_centring_would_leave_float32_is_encoded_as_it_is(model):
    """Samples near float32's limits whose mean is far from 0 leave float32's range once centred in float64: the
    signal is then rounded to float32 as it is (the front end takes its DC off), never encoded as Inf (NaN out)."""
    count = int(torch.randint(500, 800, ()))
    lopsided = np.concatenate([np.full(count, 3e38), np.full(200, -3e38)]) * (1 + 1e-3 * np.random.rand(count + 200))
    assert np.abs(lopsided - lopsided.mean()).max() > np.finfo(np.float32).max  # centred, it would overflow
    expected = model.encode(lopsided.astype(np.float32), 16000)[0]
    assert torch.isfinite(expected).all()
    assert rel_err(model.encode(lopsided, 16000)[0], expected) < 1e-5


def test_float64_channels_on_different_offsets_each_keep_their_variation(model):
    """Each channel of a float64 signal loses its own offset before the float32 rounding: one mean over all
    channels (here 3.5e4) left each one on an offset whose rounding (2^-8) swamps a variation of 1e-2."""
    variation = 1e-2 * np.random.randn(2, 9000)
    expected = model.encode(variation, 8000)[0]
    offsets = np.array([[1e5], [-3e4]])
    for encoded in (model.encode(offsets + variation, 8000)[0], fast.encode(model, [offsets + variation], 8000)[0]):
        assert rel_err(encoded, expected) < 1e-5


def test_decimal_rates_and_budgets_are_their_numbers(model):
    """boto3 (DynamoDB) and SQL NUMERIC columns give numbers as Decimal: a rate of Decimal('16000') was refused as
    "sample rate must be an integer number of Hz, got Decimal('16000')", which it is."""
    from decimal import Decimal

    signals = [torch.randn(int(torch.randint(8000, 12000, ()))) for _ in range(2)]
    assert torch.equal(model.encode(signals[0], Decimal("8000"))[0], model.encode(signals[0], 8000)[0])
    out = fast.encode(model, signals, [Decimal("8000"), Decimal("8.000E+3")], max_tokens=Decimal("4096"))
    assert all(torch.equal(u, e) for u, e in zip(out, fast.encode(model, signals, 8000)))
    for rate in ("8000.5", "NaN", "sNaN", "Infinity"):
        with pytest.raises(ValueError, match=f"integer number of Hz, got Decimal\\('{rate}'\\)"):
            model.encode(signals[0], Decimal(rate))


SCALE_ADVICE = r"only int16 and int32 are read as PCM: convert other integers to float in \[-1, 1\) by their full scale"


@pytest.mark.parametrize("signal, advice", [
    (np.full(8000, 128, dtype=np.uint8), SCALE_ADVICE),
    (torch.zeros(8000, dtype=torch.int8), SCALE_ADVICE),
    (torch.zeros(8000, dtype=torch.int64), SCALE_ADVICE),
    (np.zeros(8000, dtype=bool), r"pass float or int16/int32 PCM$"),
    (torch.zeros(8000, dtype=torch.complex64), r"pass float or int16/int32 PCM$"),
])
def test_other_integer_dtypes_are_refused_with_how_to_scale_them(model, signal, advice):
    """The refusal said "pass float or int16/int32 PCM", inviting x.astype(np.int16): 8-bit WAV samples were then
    read 256 times too quiet, without a word."""
    with pytest.raises(ValueError, match=f"^signal has unsupported dtype .*; {advice}"):
        model.encode(signal, 8000)
    with pytest.raises(ValueError, match=f"^chunk at sample 0 has unsupported dtype .*; {advice}"):
        fast.StreamEncoder(model, 8000).push(signal)


@pytest.mark.parametrize(
    "signal,named",
    [
        (np.float32(0.5), r"the number (np\.float32\()?0\.5\)?, not an array of samples \(a list of numbers given as "
                          r"fast\.encode's signals is one signal per number\): pass the samples as one array"),
        ("clip.wav", r"str 'clip\.wav': read an audio file first \(echo\.eval\.datasets\.read_audio"),
        ([0.0] * 500, r"list; np\.asarray makes one of its samples"),
    ],
)
def test_what_is_not_an_array_is_named_with_the_likely_mistake(model, signal, named):
    """A list of numbers as fast.encode's signals (a list(array), a .tolist()) was read as one signal per number,
    each refused as "got float32", which reads as a complaint about the dtype; a path was "got str"."""
    with pytest.raises(ValueError, match=f"^signal must be a torch.Tensor or numpy array, got {named}"):
        model.encode(signal, 16000)
    with pytest.raises(ValueError, match=f"^signal 0: signal must be a torch.Tensor or numpy array, got {named}"):
        fast.encode(model, [signal], 16000)
    with pytest.raises(ValueError, match="^signal 0: .* one signal per number"):
        fast.encode(model, list(np.zeros(500, np.float32)), 16000)


def test_rates_in_16_bit_floats_are_refused_not_rounded(model):
    """A batch cast .to(torch.bfloat16), rates and all, gave 44100 Hz as 44032.0 and 48000 as 48128.0: whole
    numbers, so they were encoded at the wrong rate without a word."""
    x = torch.randn(48000)
    with pytest.raises(ValueError, match=r"^signal 0: sample rate given as a torch.bfloat16 \(48128.0\), which holds "
                                         r"most rates only rounded .*; pass it as an int$"):
        fast.encode(model, [x, x], torch.tensor([48000, 44100]).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"^sample rate given as a float16 \(44096.0\)"):
        model.encode(x, np.float16(44100))
    with pytest.raises(ValueError, match=r"^sample rate given as a torch.float16"):
        fast.StreamEncoder(model, torch.tensor(16000.0, dtype=torch.float16))
    assert inputs.check_sample_rate(torch.tensor(44100.0)) == inputs.check_sample_rate(np.float32(44100)) == 44100


def test_meta_tensors_are_refused(model):
    with pytest.raises(ValueError, match="signal is a meta tensor"):
        model.encode(torch.empty(16000, device="meta"), 16000)


def test_more_channels_than_samples_is_said(model):
    """A (samples, channels) array long enough per "channel" for one window was encoded as thousands of
    channels of a few samples each, without a word; it may also be a brief sensor array: a warning."""
    with pytest.warns(UserWarning, match=r"shape \(60, 3\) is read as 60 channels of 3 samples; if it is "
                                         r"\(samples, channels\), pass its transpose"):
        utterance, _ = model.encode(torch.randn(60, 3), 100)
    assert utterance.shape == (60 * model.config.dim,)
    with pytest.warns(UserWarning, match=r"signal 1: signal of shape \(500, 401\)"):
        fast.encode(model, [torch.randn(4000), torch.randn(500, 401)], 16000)


def test_channels_first_with_fewer_channels_than_samples_is_accepted(model):
    channels, samples = int(torch.randint(2, 40, ())), int(torch.randint(41, 80, ()))
    signal = torch.randn(channels, samples)
    utterance, _ = model.encode(signal, 100)
    assert torch.equal(utterance[: model.config.dim], model.encode(signal[0], 100)[0])
    assert utterance.shape == (channels * model.config.dim,)


def test_as_many_channels_as_samples_is_read_without_a_warning():
    """Only more channels than samples says the array may be (samples, channels): a square one is as likely channels
    first, and a warning on every such signal would be noise."""
    import warnings

    model, size = random_model("tiny", depth=1), int(torch.randint(2, 12, ()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        utterance, _ = model.encode(torch.randn(size, size), 100)
    assert utterance.shape == (size * model.config.dim,)


def test_big_endian_and_read_only_arrays_are_read_as_they_are(model):
    """Big-endian arrays were refused with torch's message; read-only ones raised torch's "not writable"
    warning (once per process: the only test here that passes a read-only array)."""
    import warnings

    from echo import inputs

    native = np.random.randn(8000)
    expected = model.encode(native, 8000)[0]
    for dtype in (">f8", ">f4", ">i2", ">i4"):
        swapped = native.astype(dtype) if dtype[1] == "f" else (native * 1000).astype(dtype)
        assert torch.equal(model.encode(swapped, 8000)[0], model.encode(swapped.astype(dtype[1:]), 8000)[0])
    read_only = native.copy()
    read_only.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(model.encode(read_only, 8000)[0], expected)
        assert torch.equal(inputs.as_tensor(read_only), torch.from_numpy(native))


@pytest.mark.parametrize(
    "make,layout",
    [
        (lambda x: x.to_sparse(), "torch.sparse_coo"),
        (lambda x: x.to_mkldnn(), "torch._mkldnn"),
        (lambda x: torch.nested.nested_tensor([x, x[:-1]], layout=torch.jagged), "nested"),
    ],
)
def test_sparse_mkldnn_and_nested_tensors_are_refused_by_name(model, make, layout):
    """They failed deep in torch ("Could not run 'aten::mean.dim' with arguments from the 'SparseCPU' backend",
    "ge: relation is indeterminate" for a nested one), differently in each path."""
    signal = make(torch.randn(8000))
    with pytest.raises(ValueError, match=f"^signal is a {layout} tensor"):
        model.encode(signal, 8000)
    with pytest.raises(ValueError, match=f"^signal 1: signal is a {layout} tensor"):
        fast.encode(model, [torch.randn(8000), signal], 8000)
    with pytest.raises(ValueError, match=f"^chunk at sample 0 is a {layout} tensor"):
        fast.StreamEncoder(model, 8000).push(signal)


def test_masked_arrays_with_masked_samples_are_refused(model):
    """np.ma arrays were read through their data: masked samples (dropouts, gaps) were encoded as whatever
    values lay under the mask, without a word."""
    samples = np.random.randn(8000)
    gaps = np.zeros(8000, dtype=bool)
    gaps[np.random.choice(8000, 17, replace=False)] = True
    masked = np.ma.masked_array(samples, mask=gaps)
    with pytest.raises(ValueError, match=r"^signal has 17 masked sample\(s\); fill them"):
        model.encode(masked, 8000)
    with pytest.raises(ValueError, match=r"^signal 0: signal has 17 masked sample\(s\)"):
        fast.encode(model, [masked], 8000)
    with pytest.raises(ValueError, match=r"^chunk at sample 0 has 17 masked sample\(s\)"):
        fast.StreamEncoder(model, 8000).push(masked)
    unmasked = np.ma.masked_array(samples, mask=np.zeros(8000, dtype=bool))  # nothing hidden: its samples
    assert torch.equal(model.encode(unmasked, 8000)[0], model.encode(samples, 8000)[0])


def test_the_channels_warning_points_at_the_callers_line(model):
    """It pointed into torch's no_grad wrapper (model.encode) or echo/fast.py (fast.encode): a filter on the
    caller's module missed it, and the line shown was not the caller's."""
    flipped = torch.randn(60, 3)
    for encode in (lambda: model.encode(flipped, 100), lambda: fast.encode(model, [flipped], 100)):
        with pytest.warns(UserWarning, match="read as 60 channels") as record:
            encode()
        assert [warning.filename for warning in record] == [__file__]


def test_the_meta_device_is_refused_up_front():
    """echo.load(path, device="meta") gave a model of shapes without weights, whose encode failed deep in torch
    ("Cannot copy out of meta tensor")."""
    with pytest.raises(ValueError, match="device meta holds no data"):
        inputs.checked_device("meta")


def test_the_finiteness_check_widens_a_long_signal_a_block_at_a_time():
    """sum(dtype=float64) widened every sample at once: a float64 copy twice the signal's size (+221 MB for 10
    minutes at 48 kHz), the largest allocation of a long signal's encode. The sum stays float64's."""
    from test_frontend import largest_temporary

    samples = torch.randn(int(torch.randint(3 * 2**20, 4 * 2**20, ()))) + 1.0
    checked, temporary = largest_temporary(lambda: inputs.as_float32(samples))
    assert checked is samples and temporary <= 2**20
    assert float(inputs.float64_sum(samples)) == pytest.approx(float(samples.double().sum()), rel=1e-12)
    samples[int(torch.randint(0, len(samples), ()))] = float("nan")
    with pytest.raises(ValueError, match="contains 1 NaN"):
        inputs.as_float32(samples)


def test_int32_pcm_is_scaled_by_2_to_the_31(model):
    """int32 PCM is read as soundfile and WAV read it: x / 2147483648, full scale -2**31 at -1."""
    pcm = np.random.randint(-2**31, 2**31, 8000, dtype=np.int64).astype(np.int32)
    pcm[:2] = (-2**31, 2**31 - 1)
    scaled = inputs.as_float32(inputs.as_tensor(pcm))
    expected = pcm.astype(np.float64) / 2**31
    assert scaled.dtype == torch.float32 and scaled[0].item() == -1.0
    assert np.allclose(scaled.numpy(), expected, rtol=1e-7, atol=0)
    u_int, _ = model.encode(torch.from_numpy(pcm), 8000)
    u_float, _ = model.encode(torch.from_numpy(expected.astype(np.float32)), 8000)
    assert torch.allclose(u_int, u_float, rtol=1e-5, atol=1e-6)
