"""The Med-DisSeg network (models/): parameter counts, shapes, fused/plain parity,
mixed precision, checkpoint loading, weight transfer, input errors.

Everything that runs a forward pass uses the ResNet-18 encoder at 32×32 – 64×64; the
ResNet-50 checks are construction-only.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import disseg_kernels
from models import (
    FUSED_OPS,
    DispersiveConfig,
    MedDisSegStage1,
    MedDisSegStage2,
    ResNetEncoder,
    SegOutput,
    build_model,
    load_torchvision_resnet,
    transfer_stage1_to_stage2,
)

STAGES = {1: MedDisSegStage1, 2: MedDisSegStage2}
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def seg_loss(out: SegOutput, target: torch.Tensor) -> torch.Tensor:
    """A loss touching every output (with-logits BCE on every mask + the dispersive term)."""
    loss = F.binary_cross_entropy_with_logits(out.mask, target)
    for aux in (out.fg, out.bg, out.uncertainty):
        if aux is not None:
            loss = loss + F.binary_cross_entropy_with_logits(aux, target)
    if out.disp_loss is not None:
        loss = loss + 0.2 * out.disp_loss
    return loss


# ---------------------------------------------------------------- parameter counts


def test_param_counts_stage1_resnet50():
    """Stage I at ResNet-50 has exactly the spec's 8,673,884 parameters (encoder 8,543,296,
    head 130,588): protects the architecture against drift (spec/model.md)."""
    m = MedDisSegStage1("resnet50", fused=False)
    assert n_params(m.encoder) == 8_543_296
    assert n_params(m.head) == 130_588
    assert n_params(m) == 8_673_884


STAGE2_TABLE = {
    "encoder": 8_543_296,
    "dconv1": 837_218,
    "dconv2": 1_549_922,
    "dconv3": 2_500_194,
    "dconv4": 4_400_738,
    "decouple": 15_979_008,
    "aux_head": 3_875_523,
    "cdfa4": 707_464,
    "cdfa3": 854_920,
    "cdfa2": 854_920,
    "cdfa1": 854_920,
    "decoder_small": 349_517,
    "decoder_middle": 349_517,
    "decoder_large": 349_517,
    "output_block": 598_721,
}
GUIDE_TABLE = {"s4": 147_712, "s3": 295_424, "s2": 443_136, "s1": 590_848}


@pytest.mark.parametrize("fused", [False, True])
def test_param_counts_stage2_resnet50(fused):
    """Stage II at ResNet-50: every module of the spec's table and the total 45,559,635;
    the same in fused and plain mode (one state dict)."""
    m = MedDisSegStage2("resnet50", fused=fused)
    for name, count in STAGE2_TABLE.items():
        assert n_params(getattr(m, name)) == count, name
    for guides in (m.guide_fg, m.guide_bg):
        assert {k: n_params(v) for k, v in guides.items()} == GUIDE_TABLE
    assert n_params(m) == 45_559_635


def test_fused_and_plain_share_state_dict_keys():
    """fused=True and fused=False build the same parameter and buffer names and shapes."""
    a = MedDisSegStage2("resnet18", fused=True).state_dict()
    b = MedDisSegStage2("resnet18", fused=False).state_dict()
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


@pytest.mark.parametrize(
    "name,channels,count",
    [("resnet18", (64, 64, 128, 256), 2_782_784), ("resnet34", (64, 64, 128, 256), 8_170_304),
     ("resnet50", (64, 256, 512, 1024), 8_543_296)],
)
def test_encoder_options(name, channels, count):
    """Each encoder option has torchvision's channel counts and parameters (stem + layer1..3)
    and no layer4 / fc."""
    enc = ResNetEncoder(name)
    assert enc.channels == channels
    assert n_params(enc) == count
    assert not any(k.startswith(("layer4", "fc")) for k in enc.state_dict())


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (1, 3, 48, 32), (3, 3, 32, 48)])
def test_output_shapes_and_training_step(stage, shape):
    """Every mask is (B, 1, H, W) for H ≠ W and batches of 1..3; Stage I has no auxiliary
    masks; disp_loss is a 0-d float tensor, 0 for a single sample (a last batch of one
    trains); the backward pass gives finite gradients."""
    model = STAGES[stage]("resnet18")
    out = model(torch.randn(shape))
    assert isinstance(out, SegOutput)
    b, _, h, w = shape
    masks = [out.mask] + ([out.fg, out.bg, out.uncertainty] if stage == 2 else [])
    for m in masks:
        assert m.shape == (b, 1, h, w)
        assert torch.isfinite(m).all()
    if stage == 1:
        assert out.fg is None and out.bg is None and out.uncertainty is None
    assert out.disp_loss.dim() == 0 and torch.isfinite(out.disp_loss)
    if b == 1:
        assert out.disp_loss.item() == 0.0
    seg_loss(out, torch.rand(b, 1, h, w)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_encoder_feature_strides():
    """f1..f4 at strides 2, 4, 8, 16."""
    f = ResNetEncoder("resnet18")(torch.randn(1, 3, 64, 32))
    assert [t.shape[-2:] for t in f] == [(32, 16), (16, 8), (8, 4), (4, 2)]


# ---------------------------------------------------------------- fused vs plain


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / (b.double().norm() + 1e-300)).item()


@pytest.mark.parametrize("stage", [1, 2])
def test_fused_matches_plain(stage):
    """With the same weights, fused=True and fused=False give the same outputs and the same
    gradients for every parameter, in training mode, within float32 rounding.

    "Within float32 rounding" is measured, as flash-attention does: the plain model run
    in float64 is the truth; per tensor (Frobenius), the fused float32 error must be at
    most twice the plain float32 error (+1e-5). A plain elementwise comparison would be
    flaky: train-mode BatchNorm amplifies rounding in gradients near zero (some plain
    float32 gradients are 1e-3 off the float64 truth).

    The plain error is the largest of four: at x, and at three inputs x·(1 + 1e-7·n)
    (truth recomputed at each). Some gradients sit near a max-pool or ReLU tie that
    float32 and float64 break differently: in Stage II, dconv2's channel-attention fc1
    has a plain error of 6e-5 at x and 8e-4 to 1e-3 at three of four such inputs, and
    the encoder's conv1, downstream of it, 2.7e-5 and 8e-5; one sample of the plain
    error measures luck, not float32 rounding."""
    plain = STAGES[stage]("resnet18", fused=False)
    fused = STAGES[stage]("resnet18", fused=True)
    fused.load_state_dict(plain.state_dict())
    truth = copy.deepcopy(plain).double()
    x = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    g = torch.Generator().manual_seed(1)
    x_near = [x * (1 + 1e-7 * torch.randn(x.shape, generator=g)) for _ in range(3)]

    def run(model, xx, dtype):
        model.zero_grad(set_to_none=True)
        out = model(xx.to(dtype))
        seg_loss(out, target.to(dtype)).backward()
        return out, _grads(model)

    (out_t, grad_t), (out_p, grad_p), (out_f, grad_f) = (
        run(truth, x, torch.float64), run(plain, x, torch.float32), run(fused, x, torch.float32))
    near = [(run(truth, xn, torch.float64)[1], run(plain, xn, torch.float32)[1]) for xn in x_near]
    for name, t, p, f in zip(SegOutput._fields, out_t, out_p, out_f):
        if t is None:
            assert p is None and f is None, name
            continue
        assert _rel(f, t) <= 2 * _rel(p, t) + 1e-5, (name, _rel(f, t), _rel(p, t))
        torch.testing.assert_close(f, p, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    assert grad_t.keys() == grad_p.keys() == grad_f.keys()
    for name, t in grad_t.items():
        err_f = _rel(grad_f[name], t)
        err_p = max([_rel(grad_p[name], t)] + [_rel(gp[name], gt[name]) for gt, gp in near])
        assert err_f <= 2 * err_p + 1e-5, (name, err_f, err_p)


@pytest.mark.parametrize("dtype,bias", [(torch.float32, 95.0), (torch.float16, 12.0)])
def test_plain_model_gradient_finite_past_telus_overflow(dtype, bias):
    """A head pre-activation past e^x's overflow (89 in float32, 11 in float16): the fused
    and the plain model both give finite gradients. The plain path used TeLU's eager
    formula, whose autograd gives inf·0 = NaN there: 6 parameters got NaN gradients
    (found by an audit, 2026-11-28)."""
    for fused in (True, False):
        torch.manual_seed(0)
        model = MedDisSegStage1("resnet18", fused=fused)
        with torch.no_grad():
            model.head.convs[0].bn.bias[0] = bias  # one channel's BN shift: its TeLU input is ~bias
        model = model.to(dtype)
        out = model(torch.randn(2, 3, 32, 32, dtype=dtype))
        out.mask.float().mean().backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        assert out.mask.isfinite().all() and not bad, (fused, bad)


def test_stage1_conv_first_is_the_literal_order():
    """Stage I's head runs its 1×1 convs before the upsampling (conv_first=True): the same
    function as the literal order (upsample, then conv) — outputs and gradients within
    float32 rounding (against the literal order in float64, as above)."""
    literal = MedDisSegStage1("resnet18", fused=False, conv_first=False)
    first = MedDisSegStage1("resnet18", fused=False, conv_first=True)
    first.load_state_dict(literal.state_dict())
    truth = copy.deepcopy(literal).double()
    x = torch.randn(2, 3, 32, 32)
    target = (torch.rand(2, 1, 32, 32) > 0.5).float()
    outs, grads = [], []
    for model, dtype in ((truth, torch.float64), (literal, torch.float32), (first, torch.float32)):
        out = model(x.to(dtype))
        seg_loss(out, target.to(dtype)).backward()
        outs.append(out.mask)
        grads.append(_grads(model))
    assert _rel(outs[2], outs[0]) <= 2 * _rel(outs[1], outs[0]) + 1e-5
    for name, t in grads[0].items():
        err_f, err_p = _rel(grads[2][name], t), _rel(grads[1][name], t)
        assert err_f <= 2 * err_p + 1e-5, (name, err_f, err_p)


def test_fused_ops_documented():
    """models.FUSED_OPS names every disseg_kernels family the model routes, and only
    callables that exist in disseg_kernels."""
    assert set(FUSED_OPS) == {"telu", "gates", "multiscale", "window_attention", "dispersive"}
    for uses in FUSED_OPS.values():
        for use in uses:
            name = use.split(":")[0].removeprefix("disseg_kernels.")
            assert hasattr(disseg_kernels, name), use


# ---------------------------------------------------------------- layouts and precision


@pytest.mark.parametrize("stage", [1, 2])
def test_channels_last(stage):
    """A channels_last model on a channels_last input gives the contiguous result."""
    model = STAGES[stage]("resnet18")
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    for name, a, b in zip(SegOutput._fields, ref, out):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    seg_loss(out, torch.rand(2, 1, 32, 32)).backward()


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_autocast_cpu(stage):
    """bf16 autocast on the CPU: forward and backward run and every output and gradient is
    finite (the authors' sigmoid heads + binary_cross_entropy cannot run under autocast)."""
    model = STAGES[stage]("resnet18")
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = seg_loss(out, torch.rand(2, 1, 32, 32))
    assert all(t is None or torch.isfinite(t).all() for t in out)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@requires_cuda
@pytest.mark.parametrize("stage", [1, 2])
def test_cuda_fused_matches_plain_and_amp(stage, _no_tf32):
    """On a GPU (Triton / CUDA kernels): fused and plain agree in float32 (outputs and
    gradients, same criterion as on the CPU: twice plain's error against float64), and
    fp16 / bf16 autocast forward+backward of the fused model is finite. The float32
    comparison runs without TF32: with it (cuDNN's default) the convolutions' 10-bit
    products set both models' error (plain's reached 2.9% on one weight's gradient on the
    H200), and the factor 2 then compares two draws of that noise, not the fused ops."""
    plain = STAGES[stage]("resnet18", fused=False).cuda()
    fused = STAGES[stage]("resnet18", fused=True).cuda()
    fused.load_state_dict(plain.state_dict())
    truth = copy.deepcopy(plain).double()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    target = (torch.rand(2, 1, 64, 64, device="cuda") > 0.5).float()
    grads = []
    for model, dtype in ((truth, torch.float64), (plain, torch.float32), (fused, torch.float32)):
        seg_loss(model(x.to(dtype)), target.to(dtype)).backward()
        grads.append(_grads(model))
    for name, t in grads[0].items():
        err_f, err_p = _rel(grads[2][name], t), _rel(grads[1][name], t)
        assert err_f <= 2 * err_p + 1e-5, (name, err_f, err_p)
    for dtype in (torch.float16, torch.bfloat16):
        fused.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            out = fused(x)
            loss = seg_loss(out, target)
        assert all(t is None or torch.isfinite(t).all() for t in out), dtype
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None), dtype


@pytest.mark.parametrize("fused", [True, False])
def test_torch_compile_stage1(fused):
    """torch.compile(model, fullgraph=True) traces the fused model and the disseg_kernels
    ops without a graph break (fake tensors and autograd of the custom ops; aot_eager: no
    C++ code generation, to stay fast) and gives the eager outputs; backward runs. The
    plain model too (its reference dispersive loss has static shapes). Stage II and
    inductor: benchmarks/bench_models.py --compile."""
    model = MedDisSegStage1("resnet18", fused=fused)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    for name, a, b in zip(SegOutput._fields, ref, out):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    seg_loss(out, torch.rand(2, 1, 32, 32)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------- dispersive loss


def test_dispersive_sample_and_pixel():
    """disp_loss is dispersive_loss of the configured feature: rows = samples (N = B,
    D = C·H·W) or pixels (N = B·H·W, D = C); unweighted; None when disabled."""
    x = torch.randn(3, 3, 32, 32)
    for feature, granularity in (("f4", "sample"), ("f3", "pixel")):
        cfg = DispersiveConfig(feature=feature, granularity=granularity, tau=0.7, weight=5.0)
        model = MedDisSegStage1("resnet18", dispersive=cfg).eval()
        with torch.no_grad():
            out = model(x)
            f = model.encoder(x)[int(feature[1]) - 1]
        z = f.reshape(3, -1) if granularity == "sample" else f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
        want = disseg_kernels.dispersive_loss(z, tau=0.7, backend="reference")
        torch.testing.assert_close(out.disp_loss, want, rtol=1e-5, atol=1e-5)
    off = MedDisSegStage2("resnet18", dispersive=DispersiveConfig(enabled=False))
    with torch.no_grad():
        assert off(torch.randn(2, 3, 32, 32)).disp_loss is None


def test_dispersive_config_errors():
    """Bad options fail at construction, naming the option."""
    with pytest.raises(ValueError, match="feature"):
        DispersiveConfig(feature="f5")
    with pytest.raises(ValueError, match="granularity"):
        DispersiveConfig(granularity="token")
    with pytest.raises(ValueError, match="variant"):
        DispersiveConfig(variant="nope")
    with pytest.raises(ValueError, match="tau"):
        DispersiveConfig(tau=0.0)
    with pytest.raises(ValueError, match="weight"):
        DispersiveConfig(weight=-1.0)
    with pytest.raises(ValueError, match="backend"):
        MedDisSegStage1("resnet18", fused=False, dispersive=DispersiveConfig(backend="cpu"))


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("stage", [1, 2])
def test_input_dtype_must_match_the_parameters_outside_autocast(stage):
    """float64 or bf16 x into a float32 model: a TypeError naming both dtypes (it was
    PyTorch's "expected scalar type Double but found Float" from deep in the encoder). Under
    autocast bf16 x runs, and a float64 model takes float64 x."""
    model = STAGES[stage]("resnet18").eval()
    for dtype in (torch.float64, torch.bfloat16):
        with pytest.raises(TypeError, match=f"x has dtype {dtype} but the model's parameters are torch.float32"):
            model(torch.randn(1, 3, 32, 32, dtype=dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).mask.float()).all()
    with torch.no_grad():
        assert model.double()(torch.randn(1, 3, 32, 32, dtype=torch.float64)).mask.dtype == torch.float64


def test_constructor_and_transfer_argument_types():
    with pytest.raises(TypeError, match="conv_first must be a bool, got 'no'"):
        MedDisSegStage1("resnet18", conv_first="no")
    s1 = MedDisSegStage1("resnet18")
    with pytest.raises(TypeError, match="stage2 must be the Stage II module .* got OrderedDict"):
        transfer_stage1_to_stage2(s1, MedDisSegStage2("resnet18").state_dict())


@pytest.mark.parametrize("shape", [(2, 3, 30, 32), (2, 3, 32, 40), (2, 1, 32, 32), (3, 32, 32), (2, 3, 8, 8)])
def test_bad_shapes(shape):
    """H or W not a multiple of 16, wrong channel count or rank: ValueError naming the shape."""
    model = MedDisSegStage1("resnet18")
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        model(torch.randn(shape))


def test_single_value_batchnorm_error():
    """A 1×3×16×16 batch in training mode leaves BatchNorm one value per channel: a clear
    error; in eval mode it runs."""
    model = MedDisSegStage2("resnet18")
    with pytest.raises(ValueError, match="BatchNorm"):
        model(torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 16, 16)).mask.shape == (1, 1, 16, 16)


def test_unknown_options():
    with pytest.raises(ValueError, match="encoder"):
        MedDisSegStage1("resnet101")
    with pytest.raises(ValueError, match="stage"):
        build_model(3)
    assert isinstance(build_model(1, encoder="resnet18"), MedDisSegStage1)
    assert isinstance(build_model(2, encoder="resnet18", fused=False), MedDisSegStage2)


# ---------------------------------------------------------------- checkpoints


def _torchvision_resnet50_state(tmp_path, drop_batches_tracked=False):
    """A torchvision-format resnet50 state dict: our encoder's keys plus fake layer4 / fc."""
    src = ResNetEncoder("resnet50")
    with torch.no_grad():
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    state = {k: v.clone() for k, v in src.state_dict().items()}
    if drop_batches_tracked:  # torchvision's older checkpoints have no num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1)
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    path = tmp_path / "resnet50.pth"
    torch.save(state, path)
    return src, path


@pytest.mark.parametrize("drop", [False, True])
def test_load_torchvision_resnet50(tmp_path, drop):
    """A torchvision ResNet-50 state dict from a local file loads into the encoder of a
    Stage II model: every encoder tensor equal; layer4 / fc reported unused."""
    src, path = _torchvision_resnet50_state(tmp_path, drop)
    model = MedDisSegStage2("resnet50", fused=False)
    report = load_torchvision_resnet(model, path)
    assert report.unused == ["fc.bias", "fc.weight", "layer4.0.conv1.weight"]
    n_bn = sum(k.endswith("num_batches_tracked") for k in src.state_dict())
    assert len(report.loaded) == len(src.state_dict()) - (n_bn if drop else 0)
    for k, v in src.state_dict().items():
        if not (drop and k.endswith("num_batches_tracked")):
            assert torch.equal(model.encoder.state_dict()[k], v), k


def test_load_torchvision_resnet_errors(tmp_path):
    """A checkpoint of another depth, or a missing file, fails with a clear message."""
    _, path = _torchvision_resnet50_state(tmp_path)
    with pytest.raises((KeyError, ValueError), match="resnet18"):
        load_torchvision_resnet(ResNetEncoder("resnet18"), path)  # shapes differ
    state = torch.load(path, weights_only=True)
    del state["layer3.5.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(KeyError, match="layer3.5.conv1.weight"):
        load_torchvision_resnet(ResNetEncoder("resnet50"), path)
    # A ResNet-34 file into a ResNet-18: every ResNet-18 key is there with its shape, but the
    # extra blocks (layer1.2, layer2.2-3, layer3.2-5) show it is another network. It loaded,
    # "84 unused keys" (found by a user-acceptance pass, 2026-11-28).
    r34 = tmp_path / "resnet34.pth"
    torch.save(ResNetEncoder("resnet34").state_dict(), r34)
    with pytest.raises(ValueError, match=r"layer1\.2\..*deeper ResNet"):
        load_torchvision_resnet(ResNetEncoder("resnet18"), r34)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_torchvision_resnet(ResNetEncoder("resnet50"), tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth' cannot be read as a torch checkpoint"):
        load_torchvision_resnet(ResNetEncoder("resnet18"), garbage)


def test_transfer_stage1_to_stage2():
    """Stage I's encoder (parameters and BN buffers) is copied into Stage II; the report
    lists the keys copied, Stage II's keys left, Stage I's head keys unused."""
    s1 = MedDisSegStage1("resnet18")
    s1(torch.randn(2, 3, 32, 32))  # move the BN running statistics
    s2 = MedDisSegStage2("resnet18")
    for source in (s1, s1.state_dict()):
        report = transfer_stage1_to_stage2(source, s2)
        enc_keys = [k for k in s2.state_dict() if k.startswith("encoder.")]
        assert report.copied == enc_keys
        assert set(report.left) == set(s2.state_dict()) - set(enc_keys)
        assert report.unused and all(k.startswith("head.") for k in report.unused)
        for k in enc_keys:
            assert torch.equal(s2.state_dict()[k], s1.state_dict()[k]), k
    for other in ("resnet34", "resnet50"):
        with pytest.raises(ValueError, match="encoder"):
            transfer_stage1_to_stage2(s1, MedDisSegStage2(other, fused=False))


def test_transfer_through_wrappers_and_refuses_a_stage2_source():
    """torch.compile'd models and DDP-style 'module.' state dicts transfer like plain ones
    (they were refused with "stage1 has no 'encoder.*' keys"); a Stage II model given as
    stage1 is refused (it was accepted, every key "unused"). Found by an audit, 2026-11-28."""
    s1 = MedDisSegStage1("resnet18")
    s1(torch.randn(2, 3, 32, 32))
    enc = {k: v for k, v in s1.state_dict().items() if k.startswith("encoder.")}
    for source, target in ((torch.compile(s1), MedDisSegStage2("resnet18")),
                           ({"module." + k: v for k, v in s1.state_dict().items()}, MedDisSegStage2("resnet18")),
                           (s1, torch.compile(MedDisSegStage2("resnet18")))):
        report = transfer_stage1_to_stage2(source, target)
        assert report.copied == list(enc) and all(k.startswith("head.") for k in report.unused)
        got = getattr(target, "_orig_mod", target).state_dict()
        assert all(torch.equal(got[k], v) for k, v in enc.items())
    with pytest.raises(ValueError, match="not a Stage I model"):
        transfer_stage1_to_stage2(MedDisSegStage2("resnet18"), MedDisSegStage2("resnet18"))
