import numpy as np
import pytest
import torch
from torch import nn

from scorers.head import head_scores, layers_from_state_dict


def _numpy_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_laion_aesthetic_shape_matches_torch():
    # improved-aesthetic-predictor's MLP (768 → 1024 → 128 → 64 → 16 → 1, dropouts, no activations), random weights.
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64),
                        nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()
    layers = layers_from_state_dict(_numpy_state(mlp))
    assert [w.shape for w, _ in layers] == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    x = torch.nn.functional.normalize(torch.randn(40, 768), dim=1)
    with torch.no_grad():
        expected = mlp(x)[:, 0].numpy()
    np.testing.assert_allclose(head_scores(x.numpy(), layers), expected, rtol=1e-4, atol=1e-5)


def test_linear_head_and_relu_sigmoid_classifier_match_torch():
    torch.manual_seed(1)
    linear = nn.Linear(512, 1)
    x = torch.nn.functional.normalize(torch.randn(30, 512), dim=1)
    np.testing.assert_allclose(head_scores(x.numpy(), layers_from_state_dict(_numpy_state(linear))),
                               linear(x)[:, 0].detach().numpy(), rtol=1e-4, atol=1e-5)
    nsfw = nn.Sequential(nn.Linear(512, 64), nn.ReLU(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 1))
    got = head_scores(x.numpy(), layers_from_state_dict(_numpy_state(nsfw)), activation="relu", output="sigmoid")
    np.testing.assert_allclose(got, torch.sigmoid(nsfw(x))[:, 0].detach().numpy(), rtol=1e-4, atol=1e-6)
    two = nn.Linear(512, 3)
    got = head_scores(x.numpy(), layers_from_state_dict(_numpy_state(two)), output="softmax", column=2)
    np.testing.assert_allclose(got, torch.softmax(two(x), 1)[:, 2].detach().numpy(), rtol=1e-4, atol=1e-6)


def test_refuses_heads_that_are_not_linear_stacks_or_do_not_fit():
    bn = nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="not"):
        layers_from_state_dict(_numpy_state(bn))
    with pytest.raises(ValueError, match="takes 5 inputs"):
        layers_from_state_dict({"0.weight": np.zeros((4, 8)), "0.bias": np.zeros(4), "1.weight": np.zeros((1, 5)), "1.bias": np.zeros(1)})
    layers = layers_from_state_dict({"weight": np.zeros((1, 8)), "bias": np.zeros(1)})
    with pytest.raises(ValueError, match="different embedder"):
        head_scores(np.zeros((2, 16), np.float32), layers)
    with pytest.raises(ValueError, match="column"):
        head_scores(np.zeros((2, 8), np.float32), layers, column=1)
