"""The compiled ops of echo._C (csrc/) against their references, on fresh random inputs of every rate family.
Skipped, with the reason, where the extension is not built; `make install` builds it, so CI runs them."""
import pytest
import torch

from conftest import RATE_FAMILIES, rel_err
from test_attention import per_sequence_float64
from echo import extension
from echo.ops import attention as attention_ops
from echo.ops import stft as stft_ops
from echo.packed import Packing
from echo.plan import make_plan

requires_cpu_op = pytest.mark.skipif(
    extension.why_unavailable("ragged_spectrogram", "cpu") is not None,
    reason=f"compiled front end unavailable: {extension.why_unavailable('ragged_spectrogram', 'cpu')}",
)


def random_batch(rates: list[int], max_seconds: float = 1.5, dc: float = 0.2):
    """Signals of random lengths (from one window to max_seconds) with a random DC offset, back to back."""
    lengths = [int(sr * 0.025) + int(torch.randint(0, int(sr * max_seconds), ())) for sr in rates]
    waves = torch.cat([torch.randn(n) * 0.3 + dc * torch.randn(()) for n in lengths])
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return waves, offsets, make_plan(lengths, rates)


def check_against_reference(out: torch.Tensor, waves, offsets, plan):
    """The op computes in double like the reference and rounds once to float32. Where a bin's true magnitude is
    ~0, two float64 FFTs still differ by ~1e-13, which the log at its 1e-9 floor turns into ~1e-5; a float32
    FFT's noise there made errors of ~1 (test below), so every bin is checked, not only the norm."""
    truth = stft_ops.ragged_spectrogram_reference(waves.double(), offsets, plan)
    assert out.shape == truth.shape and out.dtype == torch.float32
    assert torch.all(out.cpu()[truth == 0] == 0)  # inserted band rows: zeros, not leftover memory
    assert rel_err(out.cpu(), truth) < 1e-6
    assert (out.cpu().double() - truth).abs().max() < 1e-4


@requires_cpu_op
@pytest.mark.parametrize("rate", RATE_FAMILIES + [100, 1000])
def test_ragged_spectrogram_cpu_matches_reference(rate):
    waves, offsets, plan = random_batch([rate] * 3)
    check_against_reference(stft_ops.ragged_spectrogram_csrc(waves, offsets, plan), waves, offsets, plan)


@requires_cpu_op
def test_ragged_spectrogram_cpu_mixed_rates_long_signal_and_threads():
    """All families in one call, in random order, with a signal of several frame chunks, on 1 and 2 threads."""
    rates = [RATE_FAMILIES[i] for i in torch.randperm(len(RATE_FAMILIES))] + [16000]
    waves, offsets, plan = random_batch(rates)
    long_wave = torch.randn(16000 * 3) + 0.5
    waves = torch.cat([waves, long_wave])
    offsets = torch.cat([offsets, offsets[-1:] + long_wave.numel()])
    plan = make_plan(plan.lengths + [long_wave.numel()], rates + [16000])
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            check_against_reference(stft_ops.ragged_spectrogram_csrc(waves, offsets, plan), waves, offsets, plan)
    finally:
        torch.set_num_threads(threads)


@requires_cpu_op
def test_silent_stretches_with_a_dc_offset_stay_exact():
    """Real recordings hold digital silence, which DC removal turns into a constant frame: every bin but the
    first two is ~0 in float64, and float32 FFT rounding put noise above the log's 1e-9 floor there: errors of
    ~1 in those bins, 0.35 relative over these signals, and up to 5e-4 in the bundled samples' embeddings.
    Long signals with a large DC, cut by silent stretches."""
    waves, offsets, plan = random_batch(RATE_FAMILIES, max_seconds=20, dc=3.0)
    bounds = offsets.tolist()
    for i in range(len(plan.lengths)):
        length = bounds[i + 1] - bounds[i]
        waves[bounds[i] + length // 4 : bounds[i] + length // 2] = 0.0
    check_against_reference(stft_ops.ragged_spectrogram_csrc(waves, offsets, plan), waves, offsets, plan)


@requires_cpu_op
def test_forcing_the_compiled_front_end(monkeypatch):
    waves, offsets, plan = random_batch([12000, 48000])
    assert "csrc" in stft_ops.available_backends(torch.device("cpu"))
    monkeypatch.setenv("ECHO_BACKEND_STFT", "csrc")
    check_against_reference(stft_ops.ragged_spectrogram(waves, offsets, plan), waves, offsets, plan)


@requires_cpu_op
def test_signals_that_disagree_with_the_plan_are_refused():
    waves, offsets, plan = random_batch([16000, 8000])
    short = offsets.clone()
    short[1:] -= 7  # signal 0 is 7 samples shorter than the plan says
    with pytest.raises(ValueError, match=f"signal lengths \\[{plan.lengths[0] - 7}, {plan.lengths[1]}\\]"):
        stft_ops.ragged_spectrogram_csrc(waves, short, plan)
    with pytest.raises(ValueError, match="float32"):
        stft_ops.ragged_spectrogram_csrc(waves.double(), offsets, plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.skipif(
    extension.why_unavailable("ragged_spectrogram", "cuda") is not None,
    reason=f"compiled CUDA front end unavailable: {extension.why_unavailable('ragged_spectrogram', 'cuda')}",
)
def test_ragged_spectrogram_cuda_matches_reference():
    waves, offsets, plan = random_batch(RATE_FAMILIES * 2 + [48000] * 3, max_seconds=25)  # a multi-segment one
    out = stft_ops.ragged_spectrogram_csrc(waves.cuda(), offsets, plan)
    assert out.is_cuda
    check_against_reference(out, waves, offsets, plan)
    # given means (spans of longer signals, fast.encode): each signal loses that DC, not its own
    means = torch.randn(len(plan.lengths), dtype=torch.float64)
    out = stft_ops.ragged_spectrogram_csrc(waves.cuda(), offsets, plan, means)
    truth = stft_ops.ragged_spectrogram_reference(waves.double(), offsets, plan, means)
    assert rel_err(out.cpu(), truth) < 1e-6


@requires_cpu_op
def test_a_build_without_means_is_not_asked_for_them(monkeypatch):
    """A build from sources before `means` would fail on the argument: the front end goes to torch instead,
    and a forced csrc says to rebuild."""
    from echo.ops import backend as backends

    waves, offsets, plan = random_batch([16000, 8000])
    means = torch.randn(2, dtype=torch.float64)
    monkeypatch.setattr(stft_ops, "_compiled_op_takes_means", lambda: False)
    monkeypatch.setattr(stft_ops, "ragged_spectrogram_csrc", lambda *args: pytest.fail("the compiled op was called"))
    out = stft_ops.ragged_spectrogram(waves, offsets, plan, means=means)
    assert rel_err(out, stft_ops.ragged_spectrogram_reference(waves.double(), offsets, plan, means)) < 1e-6
    with pytest.raises(backends.BackendError, match="takes no means; rebuild it"):
        stft_ops.ragged_spectrogram(waves, offsets, plan, backend="csrc", means=means)


requires_norm_op = pytest.mark.skipif(
    extension.why_unavailable("residual_layer_norm", "cpu") is not None,
    reason=f"compiled norm unavailable: {extension.why_unavailable('residual_layer_norm', 'cpu')}",
)


@requires_norm_op
@pytest.mark.parametrize("residual_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,dim", [(1, 192), (37, 384), (4099, 384), (65, 100)])
def test_residual_layer_norm_matches_float64_and_its_bf16_copy_is_the_cast(residual_dtype, tokens, dim):
    x = torch.randn(tokens, dim) * 3 + torch.randn(dim)
    residual = torch.randn(tokens, dim).to(residual_dtype)
    weight, bias = torch.randn(dim), torch.randn(dim)
    out, low = torch.ops.echo.residual_layer_norm(x, residual, weight, bias, 1e-5, True)
    truth = torch.nn.functional.layer_norm(x.double() + residual.double(), (dim,), weight.double(), bias.double(), 1e-5)
    assert out.dtype == torch.float32 and low.dtype == torch.bfloat16
    assert rel_err(out, truth) < 1e-6
    assert torch.equal(low, out.to(torch.bfloat16))  # round to nearest even, as torch casts
    alone, none = torch.ops.echo.residual_layer_norm(x, residual, weight, bias, 1e-5, False)  # float32 inference
    assert rel_err(alone, truth) < 1e-6 and none.numel() == 0


@requires_norm_op
def test_residual_layer_norm_rejects_bad_inputs():
    x = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="residual must be"):
        torch.ops.echo.residual_layer_norm(x, torch.randn(8, 15), torch.ones(16), torch.zeros(16), 1e-5, True)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.echo.residual_layer_norm(x.double(), x, torch.ones(16), torch.zeros(16), 1e-5, True)


requires_attention_op = pytest.mark.skipif(
    extension.why_unavailable("short_attention", "cpu") is not None,
    reason=f"compiled attention unavailable: {extension.why_unavailable('short_attention', 'cpu')}",
)


@requires_attention_op
@pytest.mark.parametrize("heads", [3, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spread", [2.0, 6.0])
def test_short_attention_matches_float64(heads, dtype, spread):
    """Every length 1..128 once (each tail of the kernel's groups of 4 keys and 4 queries, each of its widths,
    the two query chunks past 64 tokens) plus random ones, in random order; at spread 6 many weights fall below
    e^-87, which the kernel makes 0."""
    extra = torch.randint(1, attention_ops.SHORT_TOKENS + 1, (int(torch.randint(1, 50, ())),))
    lengths = torch.cat([torch.arange(1, attention_ops.SHORT_TOKENS + 1), extra])
    packing = Packing.from_lengths(lengths[torch.randperm(len(lengths))])
    qkv = (torch.randn(packing.total_tokens, 3 * 64 * heads) * spread).to(dtype)
    truth = per_sequence_float64(qkv, packing.cu_seqlens, heads)  # of the same (bf16-rounded) inputs
    out = torch.ops.echo.short_attention(qkv, packing.cu_seqlens, heads)
    assert out.dtype == dtype and out.shape == truth.shape
    sdpa = attention_ops.grouped_attention(qkv, packing.groups, heads)
    if dtype == torch.float32:  # scores of ~100 (spread 6) carry fp32 rounding of ~1e-5: no worse than SDPA's
        assert rel_err(out, truth) < 1e-6 or rel_err(out, truth) <= 1.2 * rel_err(sdpa, truth)
        assert rel_err(out, truth) < 1e-5
    else:  # only the output's rounding to bf16 remains: no worse than SDPA's
        assert rel_err(out, truth) <= 1.2 * rel_err(sdpa, truth) + 1e-4


@requires_attention_op
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_short_attention_splits_a_padded_pass_among_threads(threads):
    """A long signal's pass: sequences of 97-126 tokens, then many one-token padding sequences. The items are
    split among the threads by work, not by count; every row must still be computed once."""
    lengths = torch.cat([torch.randint(97, 127, (int(torch.randint(3, 9, ())),)),
                         torch.ones(int(torch.randint(20, 60, ())), dtype=torch.long)])
    packing = Packing.from_lengths(lengths)
    qkv = torch.randn(packing.total_tokens, 3 * 64 * 2)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.echo.short_attention(qkv, packing.cu_seqlens, 2)
    finally:
        torch.set_num_threads(before)
    assert rel_err(out, per_sequence_float64(qkv, packing.cu_seqlens, 2)) < 1e-6


@requires_attention_op
def test_short_attention_rejects_what_it_cannot_run():
    qkv = torch.randn(140, 3 * 64)
    with pytest.raises(RuntimeError, match="1 to 128 tokens"):
        torch.ops.echo.short_attention(qkv, torch.tensor([0, 7, 140]), 1)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.echo.short_attention(torch.randn(140, 3 * 32), torch.tensor([0, 40, 140]), 1)
    with pytest.raises(RuntimeError, match="cu_seqlens must run"):
        torch.ops.echo.short_attention(qkv, torch.tensor([0, 40, 139]), 1)


@requires_attention_op
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_attention_compiled_then_grouped_equals_float64(sort, dtype, monkeypatch):
    """Lengths from 1 to 126 (ECHO's range) and a few over TILE_TOKENS, sorted as a plan orders them (short
    ones lead) or not (then the leading short run goes to the kernels and everything else to SDPA); the
    compiled backend is the default. In bf16 with AMX, both kernels run when sorted."""
    edges = torch.tensor([1, attention_ops.TILE_FROM - 1, attention_ops.TILE_FROM, 130])
    lengths = torch.cat([torch.randint(1, 127, (int(torch.randint(5, 60, ())),)), edges])
    packing = Packing.from_lengths(lengths.sort().values if sort else lengths)
    qkv = torch.randn(packing.total_tokens, 3 * 64 * 2).to(dtype)
    assert attention_ops.available_backends(torch.device("cpu"))[0] == "csrc"
    calls, kernels = [], {name: getattr(torch.ops.echo, name) for name in ("short_attention", "tile_attention")}
    for name, kernel in kernels.items():
        monkeypatch.setattr(torch.ops.echo, name,
                            lambda *args, name=name, kernel=kernel: calls.append(name) or kernel(*args))
    out = attention_ops.packed_attention(qkv, packing, 2)
    truth = per_sequence_float64(qkv, packing.cu_seqlens, 2)
    if dtype == torch.float32:
        assert rel_err(out, truth) < 1e-6
    else:
        sdpa = attention_ops.grouped_attention(qkv, packing.groups, 2)
        assert rel_err(out, truth) <= 1.2 * rel_err(sdpa, truth) + 1e-4
    if sort:
        tiles = dtype == torch.bfloat16 and attention_ops.tiles_usable()
        assert calls == (["short_attention", "tile_attention"] if tiles else ["short_attention"])


requires_tiles = pytest.mark.skipif(
    not attention_ops.tiles_usable(),  # which also asks whether echo._C has the op
    reason="the AMX tile attention kernel does not run here (echo._C without it, or no AMX)",
)


@requires_tiles
@pytest.mark.parametrize("heads", [3, 6])
@pytest.mark.parametrize("spread", [2.0, 6.0])
def test_tile_attention_matches_float64(heads, spread):
    """Every length 1..128 once (each tail of the 16-row blocks and 32-key steps) plus random ones, in random
    order; at spread 6 many weights fall below e^-87, which the kernel makes 0."""
    extra = torch.randint(1, attention_ops.TILE_TOKENS + 1, (int(torch.randint(1, 30, ())),))
    lengths = torch.cat([torch.arange(1, attention_ops.TILE_TOKENS + 1), extra])
    packing = Packing.from_lengths(lengths[torch.randperm(len(lengths))])
    qkv = (torch.randn(packing.total_tokens, 3 * 64 * heads) * spread).to(torch.bfloat16)
    truth = per_sequence_float64(qkv, packing.cu_seqlens, heads)
    out = torch.ops.echo.tile_attention(qkv, packing.cu_seqlens, heads)
    assert out.dtype == torch.bfloat16 and out.shape == truth.shape
    sdpa = attention_ops.grouped_attention(qkv, packing.groups, heads)
    assert rel_err(out, truth) <= 1.2 * rel_err(sdpa, truth) + 1e-4  # numerators rounded to bf16, as SDPA's


@requires_tiles
def test_tile_attention_rejects_what_it_cannot_run():
    qkv = torch.randn(200, 3 * 64).bfloat16()
    with pytest.raises(RuntimeError, match="1 to 128 tokens"):
        torch.ops.echo.tile_attention(qkv, torch.tensor([0, 129, 200]), 1)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.echo.tile_attention(qkv.float(), torch.tensor([0, 100, 200]), 1)
    with pytest.raises(RuntimeError, match="cu_seqlens must run"):
        torch.ops.echo.tile_attention(qkv, torch.tensor([0, 100, 199]), 1)


@requires_attention_op
def test_packed_attention_with_autograd_takes_the_differentiable_path():
    packing = Packing.from_lengths(torch.tensor([3, 9, 30]))
    qkv = torch.randn(packing.total_tokens, 3 * 64, requires_grad=True)
    attention_ops.packed_attention(qkv, packing, 1).square().sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all() and qkv.grad.abs().sum() > 0


def build_module() -> dict:
    """csrc/build.py's globals (it is not part of the package: setup.py loads it from the source tree)."""
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parent.parent / "csrc" / "build.py"))


@requires_norm_op
def test_the_built_extension_raises_where_it_refuses_its_input():
    import echo._C

    assert build_module()["error_problem"](echo._C.__file__) is None


def test_a_library_that_crashes_or_will_not_load_is_reported_with_the_fix(tmp_path):
    build = build_module()
    missing = build["error_problem"](str(tmp_path / "absent.so"))
    assert missing is not None and "failed" in missing and "set CXX and CC" in missing
    build["error_problem"].__globals__["ERROR_PROBE"] = "import os; os.abort()"
    crashed = build["error_problem"](str(tmp_path / "absent.so"))
    assert crashed is not None and "crashed the process" in crashed and "exit -6" in crashed


@pytest.mark.parametrize("cxx,found", [("/nonexistent/c++", False), ("{python} -O2", True)])
def test_setup_finds_a_compiler_given_with_a_launcher_or_flags(cxx, found):
    """CXX="ccache g++" (or a compiler with flags) is what torch's build runs; setup.py looked the whole string
    up as one program, said "no C++ compiler found" and built nothing. `--version` builds nothing either way."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "CXX": cxx.format(python=sys.executable), "ECHO_BUILD_EXT": "1"}
    result = subprocess.run([sys.executable, "setup.py", "--version"], cwd=root, env=env, capture_output=True,
                            text=True, check=True)
    assert ("no C++ compiler found" not in result.stdout) == found, result.stdout


def test_a_failed_build_removes_the_earlier_one(tmp_path):
    """setuptools copies only a whole build: a rebuild whose compile failed kept the earlier echo/_C*.so in the
    package and in the build folder (which an install copies), so echo went on running ops older than csrc/
    while the build said it fell back to torch. A compiler that fails at once (CXX=false) builds nothing."""
    import os
    import shutil
    import subprocess
    import sys
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(root / name, tmp_path / name)
    shutil.copytree(root / "csrc", tmp_path / "csrc")
    library = "_C" + sysconfig.get_config_var("EXT_SUFFIX")
    in_place, in_build_folder = tmp_path / "echo" / library, tmp_path / "built" / "echo" / library
    for earlier in (in_place, in_build_folder):
        earlier.parent.mkdir(parents=True)
        earlier.write_bytes(b"an earlier build")
    (tmp_path / "echo" / "__init__.py").write_text('__version__ = "0"\n')  # pyproject.toml reads the version here
    env = {**os.environ, "CXX": "false", "ECHO_BUILD_EXT": "1"}
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "--build-lib", "built",
                             "--build-temp", "temp"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True, timeout=120)
    assert "the compiled extension failed to build" in result.stdout, result.stdout + result.stderr
    assert "removed the earlier build" in result.stdout
    assert not in_place.exists() and not in_build_folder.exists()


@requires_cpu_op
def test_forcing_the_compiled_front_end_on_float64_samples_names_the_dtype():
    """The compiled op reads float32 samples: forced on float64 ones it said stft had no 'csrc' backend at all."""
    from echo.ops.backend import BackendError

    waves, offsets, plan = random_batch([16000])
    with pytest.raises(BackendError, match=r"^backend='csrc': the compiled stft reads float32 samples, got "
                                           r"torch.float64$"):
        stft_ops.ragged_spectrogram(waves.double(), offsets, plan, backend="csrc")


@requires_norm_op
def test_a_cpu_only_compiled_op_on_cuda_is_not_blamed_on_the_build():
    """The compiled norm has a CPU kernel only: on CUDA it was reported as "built without CUDA (needs nvcc)",
    which no rebuild would change. Only the front end has a CUDA kernel (csrc/cuda/)."""
    assert extension.why_unavailable("residual_layer_norm", "cuda") == \
        "echo._C has no cuda kernel for residual_layer_norm"
    if not extension.has_op("ragged_spectrogram", "cuda"):
        assert "built without CUDA" in extension.why_unavailable("ragged_spectrogram", "cuda")


def spectrogram_call(rates: list[int], seconds: float = 0.5):
    """The raw op's arguments for signals of `rates`, built from a plan as ragged_spectrogram_csrc does, and the
    float64 reference of them; `waves` is a view into a larger buffer, so what lies just outside it is memory."""
    from echo import geometry

    lengths = [int(sr * seconds) for sr in rates]
    plan = make_plan(lengths, rates)
    buffer = torch.randn(sum(lengths) + 2000)
    waves = buffer[1000 : 1000 + sum(lengths)]
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor(lengths), 0)
    table = torch.tensor([[geometry.n_fft(sr), geometry.hop(sr), t, nb]
                          for sr, t, nb in zip(plan.sample_rates, plan.frames, plan.bands)], dtype=torch.int64)
    constants = (geometry.LOG_EPS, geometry.LOG_MEAN, geometry.LOG_STD)
    return waves, offsets, plan.spec_offsets.clone(), table, constants, \
        stft_ops.ragged_spectrogram_reference(waves.double(), offsets, plan)


@requires_cpu_op
def test_ragged_spectrogram_reads_a_non_contiguous_geometry_table():
    """The op checked the geometry through a pointer into `signal_geometry.contiguous()`, a temporary freed at
    once when the table is not contiguous: it read freed memory (garbage n_fft and hop, "inconsistent
    geometry n_fft=94848658381609") where it should take the table as it is."""
    waves, offsets, spec_offsets, table, constants, truth = spectrogram_call([16000, 8000, 44100])
    strided = table.T.contiguous().T
    assert not strided.is_contiguous()
    out = torch.ops.echo.ragged_spectrogram(waves, offsets, spec_offsets, strided, *constants)
    assert rel_err(out, truth) < 1e-6


@requires_cpu_op
def test_ragged_spectrogram_refuses_offsets_outside_its_buffers():
    """Offsets that run backwards or before the samples read outside `waves` (a signal of 10^8 samples in a
    buffer of 24000 was a segfault), and spec_offsets that do not start at 0 wrote before the output (a
    negative start) or left its head unwritten (garbage): each must be refused."""
    waves, offsets, spec_offsets, table, constants, _ = spectrogram_call([16000, 16000])
    op = torch.ops.echo.ragged_spectrogram
    backwards = offsets.clone()
    backwards[1] = offsets[2] + 500  # signal 0 runs 500 samples past the end of waves, signal 1 backwards
    geometry = table.clone()
    geometry[0, 2] = (int(backwards[1]) - 400) // 160 + 1
    geometry[1, 2] = 0
    spec = torch.cat([spec_offsets[:1], (geometry[:, 2] * geometry[:, 3] * 32).cumsum(0)])
    with pytest.raises(RuntimeError, match="wave_offsets must"):
        op(waves, backwards, spec, geometry, *constants)
    before = offsets - 100  # signal 0 starts 100 samples before waves
    with pytest.raises(RuntimeError, match="wave_offsets must"):
        op(waves, before, spec_offsets, table, *constants)
    with pytest.raises(RuntimeError, match="spec_offsets must"):
        op(waves, offsets, spec_offsets + 5, table, *constants)


@requires_cpu_op
def test_ragged_spectrogram_refuses_more_bands_than_the_bins_fill():
    """8 bands of 32 rows for the 201 bins of n_fft 400 (7 bands): the zero rows inserted before the last
    band's bins ran over rows 224 to 278, past the signal's 256-row image (into the next signal's image, or
    past the output: heap corruption), and rows 201..223 were never written."""
    waves, offsets, spec_offsets, table, constants, _ = spectrogram_call([16000, 16000])
    geometry = table.clone()
    geometry[0, 3] = 8
    spec = torch.cat([spec_offsets[:1], (geometry[:, 2] * geometry[:, 3] * 32).cumsum(0)])
    with pytest.raises(RuntimeError, match="inconsistent geometry"):
        torch.ops.echo.ragged_spectrogram(waves, offsets, spec, geometry, *constants)


@requires_attention_op
def test_short_attention_refuses_a_head_count_that_overflows_the_width_check():
    """heads = 2^58 + 1 made 3 * heads * 64 wrap around to 192, the width of qkv: the check passed and the
    kernel read heads 2^58 rows away (a segfault) instead of refusing."""
    qkv = torch.randn(8, 3 * 64)
    with pytest.raises(RuntimeError, match="qkv must be"):
        torch.ops.echo.short_attention(qkv, torch.tensor([0, 3, 8]), 2**58 + 1)


@requires_attention_op
@pytest.mark.parametrize("offsets", [torch.tensor([0.0, 3.7, 8.0]), torch.tensor([False, True])])
def test_short_attention_refuses_offsets_that_are_not_integers(offsets):
    """float cu_seqlens were truncated (3.7 -> 3) and taken; bool ones read as 0, 1."""
    with pytest.raises(RuntimeError, match="cu_seqlens must be"):
        torch.ops.echo.short_attention(torch.randn(int(offsets[-1]), 3 * 64), offsets, 1)


@requires_attention_op
@pytest.mark.parametrize("offset_dtype", [torch.int32, torch.int64])
def test_short_attention_edges_views_empty_and_nan(offset_dtype):
    """Lengths 1 and 128 (the kernel's limit; 129 is refused), int32 or int64 offsets, qkv at a non-zero
    storage offset, no sequences at all, and a NaN in one key: every output row of that (sequence, head) is
    NaN, as in the float64 softmax, and no other row."""
    lengths = torch.tensor([1, 128, 5, 1, 64, 65])
    packing = Packing.from_lengths(lengths)
    offsets = packing.cu_seqlens.to(offset_dtype)
    rows = packing.total_tokens
    qkv = torch.randn(rows + 3, 3 * 64 * 2)[3:]
    assert qkv.storage_offset() > 0
    out = torch.ops.echo.short_attention(qkv, offsets, 2)
    assert rel_err(out, per_sequence_float64(qkv, packing.cu_seqlens, 2)) < 1e-5
    with pytest.raises(RuntimeError, match="1 to 128 tokens"):
        torch.ops.echo.short_attention(torch.randn(129, 3 * 64), torch.tensor([0, 129], dtype=offset_dtype), 1)
    empty = torch.ops.echo.short_attention(torch.randn(0, 3 * 64 * 2), torch.zeros(1, dtype=offset_dtype), 2)
    assert empty.shape == (0, 128)
    poisoned = qkv.clone()
    poisoned[1 + 40, 128 + 7] = float("nan")  # a key channel of head 0 in sequence 1 (rows 1..128)
    out = torch.ops.echo.short_attention(poisoned, offsets, 2)
    nan = out.isnan()
    assert nan[1:129, :64].all() and not nan[1:129, 64:].any()
    assert not nan[:1].any() and not nan[129:].any()


@requires_tiles
def test_tile_attention_propagates_a_nan_key_to_its_sequence_and_head_only():
    """A NaN score fell out of the softmax: the exponential's mask (x >= -87, ordered) was false for NaN, so the
    key got weight 0 and its queries finite outputs where the float64 softmax gives NaN (found by reading the code,
    on a CPU without AMX). Every row of that (sequence, head) must be NaN, and no other."""
    packing = Packing.from_lengths(torch.tensor([20, 126, 40]))
    qkv = torch.randn(packing.total_tokens, 3 * 64 * 2).bfloat16()
    qkv[20 + 77, 128 + 5] = float("nan")  # key 77 of sequence 1, head 0
    nan = torch.ops.echo.tile_attention(qkv, packing.cu_seqlens, 2).isnan()
    assert nan[20:146, :64].all() and not nan[20:146, 64:].any()
    assert not nan[:20].any() and not nan[146:].any()
