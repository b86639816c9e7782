"""facedis.model: sizes, shapes, gradients, conv/linear equivalence, meta device, bf16."""
import copy

import pytest
import torch

from facedis.model import (
    DisentanglingVAE,
    Encoding,
    IdentityDiscriminator,
    PointwiseMLP,
    VAEOutput,
    count_parameters,
)

V, B = 40, 3


def small_vae(**kw):
    return DisentanglingVAE(V, 4, 3, width=0.25, **kw)


def small_disc(**kw):
    return IdentityDiscriminator(width=0.25, **kw)


@pytest.mark.parametrize(
    "num_vertices,d,expected",
    [(5023, 4, 7_916_106), (4547, 64, 7_458_834), (5996, 40, 9_582_504)],
)
def test_vae_parameter_count_matches_spec(num_vertices, d, expected):
    with torch.device("meta"):
        vae = DisentanglingVAE(num_vertices, d, d)
    assert count_parameters(vae) == expected
    assert count_parameters(vae.encoder) == 151_680
    assert count_parameters(vae.id_decoder) == count_parameters(vae.exp_decoder)


def test_discriminator_parameter_count_matches_spec():
    # docs/method.md#parameter-counts: the BN configuration (pretraining default), 1,611,686 + 7,946 buffers
    with torch.device("meta"):
        d = IdentityDiscriminator(use_bn=True)
        d_nobn = IdentityDiscriminator(use_bn=False)
    assert count_parameters(d) == 1_611_686
    assert sum(b.numel() for b in d.buffers()) == 7_946
    assert count_parameters(d.tnet) == 810_212
    assert count_parameters(d.features) == 143_296
    assert count_parameters(d.head) == 658_178
    assert count_parameters(d_nobn) == 1_611_686 - 2 * (2432 + 1536)  # no BN parameters at all
    assert not any(isinstance(m, (torch.nn.BatchNorm1d, torch.nn.Dropout)) for m in d_nobn.modules())


def test_width_multiplier_slims_network():
    assert count_parameters(small_vae()) < count_parameters(DisentanglingVAE(V, 4, 3))


def test_explicit_encoder_channels_and_inference_reads_them_back():
    from facedis.inference import infer_model_args

    m = DisentanglingVAE(V, 4, 3, width=0.125, encoder_channels=[64, 64, 64, 128, 96], decoder_hidden=16)
    widths = [getattr(m.encoder, f"conv{i}").weight.shape[0] for i in range(1, 6)]
    assert widths == [64, 64, 64, 128, 96] and m.fc_id_mu.in_features == 96
    args = infer_model_args(m.state_dict())
    assert args["encoder_channels"] == widths
    m2 = DisentanglingVAE(**args)
    m2.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="5 positive widths"):
        DisentanglingVAE(V, 4, 3, encoder_channels=[64, 64, 128])


def test_vae_shapes_and_recon_is_sum():
    torch.manual_seed(0)
    vae = small_vae()
    x = torch.randn(B, V, 3)
    out = vae(x)
    assert isinstance(out, VAEOutput)
    for t in (out.recon, out.id_offset, out.exp_offset):
        assert t.shape == (B, V, 3)
    assert out.mu_id.shape == out.logvar_id.shape == out.z_id.shape == (B, 4)
    assert out.mu_exp.shape == out.z_exp.shape == (B, 3)
    torch.testing.assert_close(out.recon, out.id_offset + out.exp_offset)
    enc = vae(x, mode="encode")
    assert isinstance(enc, Encoding)
    vae.eval()
    m = vae(x, mode="mean")
    torch.testing.assert_close(m.z_id, m.mu_id)
    torch.testing.assert_close(m.recon, m.id_offset + m.exp_offset)
    with pytest.raises(ValueError, match="valid choices"):
        vae(x, mode="bogus")


def test_vae_samples_in_eval_mode_like_reference():
    vae = small_vae().eval()
    x = torch.randn(B, V, 3)
    assert not torch.equal(vae(x).z_id, vae(x).z_id)
    assert torch.equal(vae(x, mode="mean").recon, vae(x, mode="mean").recon)


@pytest.mark.parametrize("pointwise", ["conv", "linear"])
def test_vae_every_parameter_gets_gradient(pointwise):
    torch.manual_seed(0)
    vae = small_vae(pointwise=pointwise)
    out = vae(torch.randn(B, V, 3))
    loss = out.recon.square().mean() + out.logvar_id.sum() + out.logvar_exp.sum()
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert torch.isfinite(out.recon).all()


@pytest.mark.parametrize("use_bn", [True, False])
@pytest.mark.parametrize("pointwise", ["conv", "linear"])
def test_discriminator_shapes_and_gradients(use_bn, pointwise):
    torch.manual_seed(0)
    d = small_disc(use_bn=use_bn, pointwise=pointwise)
    for n in (V, 17):  # any vertex count
        logits = d(torch.randn(B, n, 6))
        assert logits.shape == (B, 2)
    logits.sum().backward()
    for name, p in d.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_discriminator_dropout_only_with_bn():
    assert any(isinstance(m, torch.nn.Dropout) for m in small_disc(use_bn=True).modules())
    assert not any(isinstance(m, torch.nn.Dropout) for m in small_disc(use_bn=False).modules())


def _grads(module):
    return {k: p.grad.clone() for k, p in module.named_parameters()}


def test_conv_and_linear_paths_are_the_same_function():
    torch.manual_seed(0)
    conv = small_vae(pointwise="conv")
    lin = small_vae(pointwise="linear")
    assert {k: v.shape for k, v in conv.state_dict().items()} == {
        k: v.shape for k, v in lin.state_dict().items()
    }
    lin.load_state_dict(conv.state_dict())
    x = torch.randn(B, V, 3)
    a, b = conv(x, mode="mean"), lin(x, mode="mean")
    torch.testing.assert_close(a.recon, b.recon, rtol=1e-5, atol=1e-6)
    (a.recon.square().mean() + a.logvar_id.sum() + a.logvar_exp.sum()).backward()
    (b.recon.square().mean() + b.logvar_id.sum() + b.logvar_exp.sum()).backward()
    ga, gb = _grads(conv), _grads(lin)
    for k in ga:  # atol: conv biases before BN have a true gradient of 0 (round-off only)
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=2e-5, msg=k)
    # BN running statistics agree (same (batch, points) statistics)
    for k, v in conv.state_dict().items():
        torch.testing.assert_close(v, lin.state_dict()[k], rtol=1e-5, atol=1e-6, msg=k)


def test_conv_path_pools_like_the_reference_maxpool():
    """The conv path's max over the points is the reference's ``MaxPool1d(V)``, backward included:
    exactly tied points (a duplicated vertex) send the whole gradient to one of them."""
    torch.manual_seed(0)
    mlp = PointwiseMLP([3, 8, 16], use_bn=False, pointwise="conv")
    x = torch.randn(B, V, 3)
    x[:, 2] *= 5  # the arg-max of most channels ...
    x[:, 7] = x[:, 2]  # ... exactly tied with another point
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    h = xb.transpose(1, 2)
    for conv in (mlp.conv1, mlp.conv2):
        h = torch.relu(conv(h))
    out, ref = mlp(xa), torch.nn.MaxPool1d(V)(h).squeeze(2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    params = list(mlp.parameters())
    ga = torch.autograd.grad(out, [xa, *params], g)
    gb = torch.autograd.grad(ref, [xb, *params], g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_discriminator_conv_linear_same_and_switchable():
    torch.manual_seed(0)
    d = small_disc(use_bn=True).eval()
    x = torch.randn(B, V, 6)
    ref = d(x)
    d.set_pointwise("linear")
    torch.testing.assert_close(d(x), ref, rtol=1e-5, atol=1e-6)


def test_load_pretrained_bn_into_plain_discriminator():
    pre = small_disc(use_bn=True)
    plain = small_disc(use_bn=False)
    dropped = plain.load_pretrained(pre.state_dict())
    assert dropped and all(".bn" in k for k in dropped)
    torch.testing.assert_close(plain.head.fc1.weight, pre.head.fc1.weight)
    with pytest.raises(KeyError):
        small_disc(use_bn=True).load_pretrained(plain.state_dict())  # missing BN entries


def test_models_run_on_meta_device():
    with torch.device("meta"):
        vae = DisentanglingVAE(5023, 4, 4)
        d = IdentityDiscriminator(use_bn=True)
        out = vae(torch.empty(2, 5023, 3))
        logits = d(torch.empty(2, 5023, 6))
    assert out.recon.shape == (2, 5023, 3) and out.recon.device.type == "meta"
    assert logits.shape == (2, 2)


@pytest.mark.parametrize("pointwise", ["conv", "linear"])
def test_bf16_autocast_cpu(pointwise):
    torch.manual_seed(0)
    vae, d = small_vae(pointwise=pointwise), small_disc(use_bn=True, pointwise=pointwise)
    x = torch.randn(B, V, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(x)
        logits = d(torch.cat([x, x + out.id_offset], -1))
    assert torch.isfinite(out.recon.float()).all() and torch.isfinite(logits.float()).all()
    (out.recon.float().square().mean() + logits.float().sum()).backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_no_vertex_count_in_encoder_or_discriminator():
    vae = small_vae()
    vae.train()
    # the encoder and the discriminator accept any vertex count; only the decoders know V
    assert vae.encoder(torch.randn(2, 13, 3)).shape[0] == 2
    assert copy.deepcopy(small_disc())(torch.randn(2, 7, 6)).shape == (2, 2)


def test_zero_decoder_init_predicts_the_mean_face():
    from facedis.model import DisentanglingVAE

    torch.manual_seed(0)
    vae = DisentanglingVAE(50, 4, 3, width=0.125, decoder_hidden=16, decoder_init="zero")
    out = vae(torch.randn(3, 50, 3))
    assert torch.count_nonzero(out.recon) == 0
    out.recon.sum().backward()  # gradients still reach the (zero) output layer
    assert vae.id_decoder.fc2.weight.grad is not None
    with pytest.raises(ValueError, match="decoder init"):
        DisentanglingVAE(50, 4, 3, decoder_init="xavier")


def test_offset_encoder_input_uses_the_reference_face():
    from facedis.model import DisentanglingVAE

    torch.manual_seed(0)
    vae = DisentanglingVAE(40, 4, 3, width=0.125, decoder_hidden=16, encoder_input="absolute+offset").eval()
    assert vae.encoder.conv1.weight.shape[1] == 6
    x = torch.randn(2, 40, 3)
    ref = torch.randn(40, 3)
    vae.set_input_reference(ref, 5.0)
    feats = vae.encoder_features(x)
    assert torch.allclose(feats[..., 3:], (x - ref) * 5.0)
    sd = vae.state_dict()
    assert "input_reference" in sd and float(sd["input_offset_scale"]) == 5.0
    other = DisentanglingVAE(40, 4, 3, width=0.125, decoder_hidden=16, encoder_input="absolute+offset").eval()
    other.load_state_dict(sd)
    assert torch.allclose(other.encode(x).mu_id, vae.encode(x).mu_id)
