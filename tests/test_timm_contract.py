"""timm's model contract on the smallest variant of every family, so it cannot regress.

The checks follow the cases of ``tests/test_models.py`` in huggingface/pytorch-image-models (timm
1.0.31), written for these models at small sizes: forward/backward, default cfg shapes and the
classifier API (``test_model_default_cfgs``), TorchScript (``test_model_forward_torchscript``, here
also compared with eager), FX forward/backward through torchvision's feature extractor with timm's
no-trace lists (``test_model_forward_fx`` / ``test_model_backward_fx``) and the factory's
``device=``/``dtype=``. timm's own file runs unmodified against these models with
``pytest -p metazoo <timm>/tests/test_models.py -k mz_...`` (see README, "Using the models").
"""
import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

SMALL = ["mz_poolformer_s12", "mz_poolformerv2_s12", "mz_convformer_s18", "mz_caformer_s18", "mz_mambaout_femto",
         "mz_identityformer_s12", "mz_randformer_s12", "mz_riformer_s12", "mz_transnext_micro", "mz_affnet_et",
         "mz_vim2_t"]
SIZE = 64


def _pair(name, **kwargs):
    """(model, a second instance with the same weights) in eval mode."""
    model = timm.create_model(name, **kwargs).eval()
    with timm.set_scriptable(True):
        twin = timm.create_model(name, **kwargs).eval()
    twin.load_state_dict(model.state_dict())
    return model, twin


def _fx(model):
    """timm's FX model: traced with its leaf modules/functions, returning the last node."""
    kw = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
              param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kw)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]],
                                    eval_return_nodes=[eval_nodes[-1]], tracer_kwargs=kw)


@pytest.mark.parametrize("name", SMALL)
def test_torchscript_matches_eager(name):
    model, twin = _pair(name)
    scripted = torch.jit.script(twin)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALL)
def test_fx_forward_and_backward(name):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = model(x)
    fx = _fx(model)
    with torch.no_grad():
        torch.testing.assert_close(next(iter(fx(x).values())), want, rtol=1e-4, atol=1e-5)
    fx.train()
    next(iter(fx(x).values())).mean().backward()
    missing = [n for n, p in fx.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"


@pytest.mark.parametrize("name", SMALL)
def test_default_cfg_shapes_and_classifier_api(name):
    """On the meta device, at the cfg's input size: unpooled features match ``pool_size`` and
    ``num_features``; pre-logits, ``reset_classifier(0)`` and ``num_classes=0`` agree; no pooling
    keeps the map; a new classifier keeps the model's device, dtype and mode; unknown kwargs raise."""
    model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    cfg = model.pretrained_cfg
    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    fmt = getattr(model, "output_fmt", "NCHW")
    hw = tuple(feats.shape[1:3]) if fmt == "NHWC" else tuple(feats.shape[2:])
    assert hw == tuple(cfg["pool_size"])
    assert feats.shape[-1 if fmt == "NHWC" else 1] == model.num_features
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model(x).shape == pre.shape
    model.reset_classifier(0, "")
    assert model(x).ndim == 4
    assert timm.create_model(name, device="meta", num_classes=0)(x).shape == pre.shape
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    model.to(torch.float64)
    model.reset_classifier(3)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.get_classifier().parameters())
    assert not any(m.training for m in model.modules())
    with pytest.raises(TypeError):
        timm.create_model(name, device="meta", not_a_model_arg=1)
