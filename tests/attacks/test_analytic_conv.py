"""Pure math of the convolutional inversion (gitool.attacks.analytic_conv), float64."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_weight

from gitool.attacks.analytic_conv import (
    ConvLayerData,
    SolveOptions,
    add_forward_normal,
    add_lower_block,
    cholesky_lower,
    forward_frobenius_squared,
    gradient_gram,
    gradient_matrix,
    invert_conv_layer,
    lower_block_matrix,
    tap_pixel_index,
)
from gitool.attacks.analytic_fc import activation_derivative, activation_inverse
from gitool.attacks.errors import AttackError

F64 = torch.float64
ACT = {"relu": torch.relu, "leakyrelu": lambda z: F.leaky_relu(z, 0.2), "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def make_layer(channels=3, size=8, filters=8, kernel=3, stride=1, padding=1, activation="leakyrelu", batch=1,
               seed=0):
    """A conv layer with a known input X, its output A and the true deltas and gradient."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, channels, size, size, dtype=F64, generator=generator)
    weight = torch.rand(filters, channels, kernel, kernel, dtype=F64, generator=generator) - 0.5
    bias = torch.rand(filters, dtype=F64, generator=generator) - 0.5
    output = ACT[activation](F.conv2d(images, weight, bias, stride, padding))
    upstream = torch.randn(output.shape, dtype=F64, generator=generator)
    deltas = upstream * activation_derivative(activation, output, 0.2)
    layer = ConvLayerData(weight=weight, bias=bias, weight_grad=conv2d_weight(images, weight.shape, deltas, stride,
                                                                            padding),
                          stride=(stride, stride), padding=(padding, padding), activation=activation,
                          leaky_slope=0.2, input_shape=(channels, size, size))
    return layer, images, deltas, output


def forward_operator(weight, shape, stride, padding):
    """M (F L) x (C H W) of conv(X, K) for one sample, column by column (unit images)."""
    pixels = shape[0] * shape[1] * shape[2]
    basis = torch.eye(pixels, dtype=F64).reshape(pixels, *shape)
    return F.conv2d(basis, weight, None, stride, padding).reshape(pixels, -1).T


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_gradient_matrix_and_forward_normal_are_the_convolution(stride, padding):
    layer, images, deltas, _ = make_layer(size=9, kernel=5, stride=stride, padding=padding)
    index = tap_pixel_index(9, 9, (5, 5), (stride, stride), (padding, padding))
    matrix = gradient_matrix(deltas, index, 81)  # one matrix, every channel
    per_channel = images[0].reshape(3, 81).T
    expected = layer.weight_grad.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(matrix @ per_channel, expected, atol=1e-13)
    gram = gradient_gram(matrix, (5, 5), (stride, stride), (padding, padding), 9, 9)
    assert (gram - matrix.T @ matrix).abs().max() < 1e-14 * float(gram.abs().max())
    forward = forward_operator(layer.weight, (3, 9, 9), stride, padding)
    assert forward_frobenius_squared(layer.weight, index) == pytest.approx(float((forward ** 2).sum()), rel=1e-13)
    generator = torch.Generator().manual_seed(1)
    out = deltas.shape[1:]
    for rows in (torch.full(out, 0.7, dtype=F64), torch.rand(out, dtype=F64, generator=generator) * (
            torch.rand(out, generator=generator) > 0.3)):  # uniform rows; weighted rows with gaps (ReLU)
        normal = torch.zeros(243, 243, dtype=F64)
        add_forward_normal(normal, layer.weight, rows, (stride, stride), (padding, padding), (3, 9, 9))
        weighted = forward * rows.reshape(-1, 1)
        assert (normal - weighted.T @ weighted).abs().max() < 1e-13
        lower = torch.zeros(243, 243, dtype=F64)
        add_forward_normal(lower, layer.weight, rows, (stride, stride), (padding, padding), (3, 9, 9), lower=True)
        assert torch.equal(lower.tril(), normal.tril())


def test_lower_block_assembly_fills_exactly_the_lower_triangle_the_factorisation_reads():
    generator = torch.Generator().manual_seed(2)
    rows = torch.randn(120, 100, dtype=F64, generator=generator)
    dense = rows.T @ rows
    matrix = lower_block_matrix(100, F64, "cpu", block=16)
    for start in range(0, 100, 16):  # never written and never read: make that visible
        matrix[start:start + 16, start + 16:] = float("nan")
    for top, left, height, width in [(0, 0, 37, 37), (37, 0, 63, 37), (37, 37, 63, 63)]:  # blocks not aligned to 16
        add_lower_block(matrix, dense[top:top + height, left:left + width], top, left, block=16)
    assert torch.equal(matrix.tril(), dense.tril())
    assert int(torch.isnan(matrix).sum()) == sum(16 * max(0, 100 - start - 16) for start in range(0, 100, 16))
    lower, info = cholesky_lower(matrix, block=16)
    assert info == 0 and (lower.tril() - torch.linalg.cholesky(dense)).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_blocked_cholesky_matches_lapack_and_reports_the_failing_minor(dtype):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(150, 100, dtype=F64, generator=generator)
    normal = (rows.T @ rows).to(dtype)
    lower, info = cholesky_lower(normal.clone(), block=16)  # 7 blocks: the blocked path
    assert info == 0
    reference = torch.linalg.cholesky(normal)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-4
    assert (lower.tril() - reference).abs().max() < tolerance * float(reference.abs().max())
    indefinite = normal.clone()
    indefinite[70, 70] = -1.0
    expected = int(torch.linalg.cholesky_ex(indefinite)[1])
    assert cholesky_lower(indefinite.clone(), block=16)[1] == expected == 71


def least_squares_reference(layer, deltas, output, weights):
    """The combined least-squares problem written out densely and solved by QR (lstsq):
    gradient rows kron(I_C, D) per sample, forward rows scaled as solve_conv_dense scales them."""
    batch = deltas.shape[0]
    channels, height, width = layer.input_shape
    pixels = height * width
    index = tap_pixel_index(height, width, tuple(layer.weight.shape[2:]), layer.stride, layer.padding)
    matrix = gradient_matrix(deltas, index, pixels)
    unknowns = batch * channels * pixels
    gradient_rows = torch.zeros(channels * matrix.shape[0], unknowns, dtype=F64)
    for channel in range(channels):
        for sample in range(batch):
            gradient_rows[channel::channels, (sample * channels + channel) * pixels:(sample * channels + channel + 1)
                          * pixels] = matrix[:, sample * pixels:(sample + 1) * pixels]
    rhs_grad = layer.weight_grad.permute(0, 2, 3, 1).reshape(-1)
    forward = forward_operator(layer.weight, layer.input_shape, layer.stride, layer.padding)
    scale = (float((matrix ** 2).sum()) * channels / (float((forward ** 2).sum()) * batch)) ** 0.5
    targets = activation_inverse(layer.activation, output, layer.leaky_slope)[0] - layer.bias.view(1, -1, 1, 1)
    blocks = [gradient_rows]
    values = [rhs_grad]
    for sample in range(batch):
        rows = (weights[sample].reshape(-1, 1) * scale)
        block = torch.zeros(forward.shape[0], unknowns, dtype=F64)
        block[:, sample * channels * pixels:(sample + 1) * channels * pixels] = forward * rows
        blocks.append(block)
        values.append(targets[sample].reshape(-1) * rows[:, 0])
    system, rhs = torch.cat(blocks), torch.cat(values)
    return torch.linalg.lstsq(system, rhs.unsqueeze(1), driver="gelsy").solution.reshape(batch, channels, height,
                                                                                         width)


@pytest.mark.parametrize("batch", [1, 2])
def test_mixed_precision_combined_solve_is_the_float64_least_squares_answer(batch):
    # 3 x 20 x 20 (x B) unknowns >= 1024: float32 blocked Cholesky, float64 refinement.
    layer, images, deltas, output = make_layer(channels=3, size=20 if batch == 1 else 14, filters=12, kernel=5,
                                               stride=2, padding=2, batch=batch, seed=4)
    recovered, diag = invert_conv_layer(layer, deltas, output, SolveOptions(), "conv 1")
    assert diag["constraints"] == "both" and diag["rank"] == diag["unknowns"] >= 1024 and diag["factor"] == "float32"
    assert 1 < diag["condition"] < 1e3
    assert (recovered - images).abs().max() < 1e-11
    reference = least_squares_reference(layer, deltas, output, torch.ones_like(output))
    assert (recovered - reference).abs().max() < 1e-11
    # Rounded to float32 (what real clients send): no longer consistent; the answer is still the
    # float64 least-squares solution of the rounded numbers, and its residual is float32 round-off.
    rounded = ConvLayerData(**{**layer.__dict__, "weight": layer.weight.float().double(),
                               "weight_grad": layer.weight_grad.float().double()})
    deltas32, output32 = deltas.float().double(), output.float().double()
    recovered, diag = invert_conv_layer(rounded, deltas32, output32, SolveOptions(), "conv 1")
    reference = least_squares_reference(rounded, deltas32, output32, torch.ones_like(output))
    assert (recovered - reference).abs().max() < 1e-11 * float(reference.abs().max())
    assert diag["gradient_residual"] < 1e3 * torch.finfo(torch.float32).eps
    assert (recovered - images).abs().max() < 1e-4


@pytest.mark.parametrize("stride,padding,filters", [(1, 0, 6), (1, 2, 4), (2, 0, 20), (2, 2, 20)])
def test_gradient_constraints_alone_recover_the_input_exactly(stride, padding, filters):
    layer, images, deltas, output = make_layer(size=9, kernel=5, filters=filters, stride=stride, padding=padding,
                                               activation="relu")
    recovered, diag = invert_conv_layer(layer, deltas, output, SolveOptions(constraints="gradient"), "conv 1")
    assert (recovered - images).abs().max() < 1e-10
    assert diag["constraints"] == "gradient" and diag["rank"] == 81 and diag["gradient_residual"] < 1e-13


def test_few_filters_add_the_forward_rows_and_stay_exact():
    # 3 filters x 9 taps = 27 gradient rows per channel < 64 pixels: weight rows are needed.
    layer, images, deltas, output = make_layer(filters=3, kernel=3, stride=1, padding=1)
    recovered, diag = invert_conv_layer(layer, deltas, output, SolveOptions(), "conv 1")
    assert diag["constraints"] == "both" and diag["rank"] == 3 * 64
    assert (recovered - images).abs().max() < 1e-10


def test_rank_deficient_layer_names_itself_and_the_counts():
    # ReLU with 1 filter, stride 2: 9 gradient rows per channel and ~8 active outputs for 192 unknowns.
    layer, _, deltas, output = make_layer(filters=1, kernel=3, stride=2, padding=1, activation="relu")
    with pytest.raises(AttackError, match=r"conv 7: cannot recover its input \(192 unknowns; 27 gradient equations, "
                                          r"\d+ weight equations"):
        invert_conv_layer(layer, deltas, output, SolveOptions(), "conv 7")


def test_a_large_system_short_of_rank_is_refused_with_its_numerical_rank():
    # 1200 unknowns (float32 factor tried first, then float64): filters 6-11 dead in both row
    # sets, so the counts pass but the rows are short of rank; no answer may come out.
    layer, images, deltas, output = make_layer(channels=3, size=20, filters=12, kernel=5, stride=2, padding=2)
    layer.weight[6:] = 0
    deltas[:, 6:] = 0
    layer.weight_grad = conv2d_weight(images, layer.weight.shape, deltas, 2, 2)
    output = F.leaky_relu(F.conv2d(images, layer.weight, layer.bias, 2, 2), 0.2)
    with pytest.raises(AttackError, match=r"conv 1: cannot recover its input \(1200 unknowns; .*numerical rank (\d+)"
                       ) as refused:
        invert_conv_layer(layer, deltas, output, SolveOptions(), "conv 1")
    rank = int(refused.value.args[0].split("numerical rank ")[1].split(",")[0])
    assert 900 <= rank <= 6 * 100 + 3 * 6 * 25  # at most the 1050 rows the six live filters leave


def test_pixels_the_stride_never_reads_are_reported():
    # 8 pixels, kernel 5, stride 2, no padding: outputs read rows 0..6 only; row and column 7 are lost.
    layer, _, deltas, output = make_layer(size=8, filters=40, kernel=5, stride=2, padding=0)
    with pytest.raises(AttackError, match="15 of 64 pixels are never read"):
        invert_conv_layer(layer, deltas, output, SolveOptions(), "conv 2")


def test_a_batch_separates_when_the_stacked_system_has_full_rank():
    layer, images, deltas, output = make_layer(batch=2, filters=20, kernel=3, stride=1, padding=1)
    recovered, diag = invert_conv_layer(layer, deltas, output, SolveOptions(constraints="gradient"), "conv 1")
    assert diag["rank"] == 2 * 64
    assert (recovered - images).abs().max() < 1e-10


def test_iterative_solver_agrees_with_dense():
    layer, images, deltas, output = make_layer(channels=3, size=16, filters=6, kernel=5, stride=1, padding=2)
    dense, dense_diag = invert_conv_layer(layer, deltas, output, SolveOptions(solver="dense"), "conv 1")
    iterative, diag = invert_conv_layer(layer, deltas, output, SolveOptions(solver="iterative"), "conv 1")
    assert dense_diag["constraints"] == diag["constraints"] == "both"
    assert diag["converged"]
    assert (iterative - dense).abs().max() < 1e-8
    assert (dense - images).abs().max() < 1e-10


def test_noise_gives_a_least_squares_answer_whose_error_grows_with_the_noise():
    layer, images, deltas, output = make_layer(filters=24, kernel=3, stride=1, padding=1, activation="leakyrelu")
    clean = layer.weight_grad.clone()
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(clean.shape, dtype=F64, generator=generator)
    errors = []
    for level in (0.0, 1e-6, 1e-4, 1e-2):
        layer.weight_grad = clean + level * float(clean.std()) * noise
        recovered, _ = invert_conv_layer(layer, deltas, output, SolveOptions(constraints="gradient"), "conv 1")
        errors.append(float((recovered - images).norm() / images.norm()))
    assert errors[0] < 1e-12
    assert errors == sorted(errors)
    # Least squares: the error is proportional to the noise (a factor 100 per step here).
    assert 30 < errors[2] / errors[1] < 300 and 30 < errors[3] / errors[2] < 300


def test_iterative_gradient_only_answer_is_checked_against_the_forward_rows():
    # 12 filters x 9 taps = 108 >= 100 pixels by the counts, but ReLU zeros leave D short of
    # rank: CGLS converges to a wrong minimum-norm answer, which the forward rows expose.
    layer, images, deltas, output = make_layer(size=10, filters=12, kernel=3, stride=1, padding=1,
                                               activation="leakyrelu", seed=3)
    deltas[:, 6:] = 0  # six dead filters: 54 rows for 100 pixels, the counts cannot see this
    layer.weight_grad = conv2d_weight(images, layer.weight.shape, deltas, 1, 1)
    recovered, diag = invert_conv_layer(layer, deltas, output, SolveOptions(solver="iterative"), "conv 1")
    assert diag["attempts"][0]["constraints"] == "gradient"
    assert diag["constraints"] == "both"
    assert (recovered - images).abs().max() < 1e-8


def test_mixed_precision_normal_solve_matches_float64_and_declines_ill_conditioned_systems():
    from gitool.attacks.analytic_conv import _solve_mixed

    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(1500, 1100, dtype=F64, generator=generator)
    truth = torch.randn(1100, 1, dtype=F64, generator=generator)
    normal, rhs = rows.T @ rows, rows.T @ (rows @ truth)
    solution, condition = _solve_mixed(normal.float(), rhs, lambda u: rhs - normal @ u, lambda u: normal @ u)
    assert 5 < condition < 20  # cond(A) of a 1500 x 1100 Gaussian matrix: about 10
    assert float((solution - truth).abs().max()) < 1e-13
    # cond(A) = 1e6: float32 cannot carry the factor; the float64 path must be used instead.
    u, _, v = torch.linalg.svd(rows, full_matrices=False)
    scaled = u @ torch.diag(torch.logspace(0, -6, 1100, dtype=F64)) @ v
    normal = scaled.T @ scaled
    assert _solve_mixed(normal.float(), normal @ truth, lambda x: normal @ truth - normal @ x,
                        lambda x: normal @ x) is None


def test_saturated_tanh_outputs_do_not_amplify_the_round_off_of_their_forward_rows():
    # Weights scaled by 6 saturate many outputs (1 - A^2 down to ~1e-9). A relative error of
    # 1e-7 in A (float32 round-off) is 1e-7 / (1 - A^2) in atanh(A): rows weighted by 1 - A^2
    # keep the error of X at 2.4e-5 (unweighted rows: 0.15; CGLS on the weighted rows, not
    # converged in 3000 iterations: 0.043).
    layer, images, _, _ = make_layer(filters=3, kernel=3, stride=1, padding=1, activation="tanh")
    layer.weight = layer.weight * 6
    output = torch.tanh(F.conv2d(images, layer.weight, layer.bias, 1, 1))
    generator = torch.Generator().manual_seed(3)
    upstream = torch.randn(output.shape, dtype=F64, generator=generator)
    deltas = upstream * (1 - output * output)
    layer.weight_grad = conv2d_weight(images, layer.weight.shape, deltas, 1, 1)
    assert float((1 - output * output).min()) < 1e-6
    noisy = (output * (1 + 1e-7 * torch.randn(output.shape, dtype=F64, generator=generator))).clamp(-1, 1)
    recovered, diag = invert_conv_layer(layer, deltas, noisy, SolveOptions(solver="dense"), "conv 1")
    assert diag["constraints"] == "both"
    assert float((recovered - images).abs().max()) < 1e-4
