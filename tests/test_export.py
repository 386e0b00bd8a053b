"""Export of the smallest variant of every family: ``torch.export.export`` (inference) and ONNX through
the dynamo exporter, run by ONNX Runtime and compared with PyTorch (fp32, CPU)."""
import pytest
import timm
import torch

SMALL = ["mz_poolformer_s12", "mz_poolformerv2_s12", "mz_convformer_s18", "mz_caformer_s18", "mz_mambaout_femto",
         "mz_identityformer_s12", "mz_randformer_s12", "mz_riformer_s12", "mz_transnext_micro", "mz_affnet_et",
         "mz_vim2_t"]
# 224 px for every family; odd sizes where padding or size-dependent tables matter: ConvFormer at 100 px
# (maps of 25/13/7/4), TransNeXt at 100 px (position tables and pooled keys built for 25x25 .. 4x4 maps,
# not the construction-size buffers)
ONNX_CASES = [(n, 224) for n in SMALL] + [("mz_convformer_s18", 100), ("mz_transnext_micro", 100)]
# graphs on which the exporter's own ONNX optimizer (optimize=True, its default) spends minutes: ViM2's
# log-step scans (5.7k nodes, 488 s of 530 s at 224 px on 2 CPU cores; 40 s without it) and TransNeXt;
# the export itself, the model's graph and its numbers do not depend on it (README: ONNX export)
UNOPTIMIZED = {"mz_vim2_t", "mz_transnext_micro"}


def _model(name):
    return timm.create_model(name, num_classes=10).eval()


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_torch_export(name):
    model = _model(name)
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,size", ONNX_CASES)
def test_onnx_export_matches_pytorch(name, size, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = _model(name)
    x = torch.randn(1, 3, size, size)
    path = tmp_path / f"{name}_{size}.onnx"
    torch.onnx.export(model, (x,), dynamo=True, optimize=name not in UNOPTIMIZED).save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=0, atol=1e-4)
