"""Libraries that consume timm encoders: segmentation_models_pytorch's ``tu-<name>`` encoders."""
import pytest
import timm
import torch

smp = pytest.importorskip("segmentation_models_pytorch")


@pytest.mark.parametrize("arch, name", [("Unet", "mz_caformer_s18"), ("FPN", "mz_mambaout_femto")])
def test_smp_decoder_on_mz_encoder(arch, name):
    """The decoder runs on our encoder, the mask has the input size, and the encoder's weights are
    those of the timm model of the same name (same keys and tensors under a fixed seed)."""
    torch.manual_seed(0)
    net = getattr(smp, arch)(encoder_name=f"tu-{name}", encoder_weights=None, classes=3).eval()
    torch.manual_seed(0)
    ref = timm.create_model(name, features_only=True, out_indices=(0, 1, 2, 3))
    enc = net.encoder.model.state_dict()
    assert set(enc) == set(ref.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(enc[k], v, rtol=0, atol=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert net(x).shape == (1, 3, 64, 64)
        nhwc = getattr(ref, "output_fmt", "NCHW") == "NHWC"  # MambaOut; smp hands decoders NCHW
        for got, want in zip(net.encoder(x)[-4:], ref.eval()(x)):
            torch.testing.assert_close(got, want.permute(0, 3, 1, 2) if nhwc else want)
