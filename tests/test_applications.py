"""keras.applications models (``weights=None``, 32 x 32 inputs): every weight has a
layer rule, so no layer of these models takes the slow per-example fallback (the five
image models of the model-zoo benchmark; ``explain`` traces symbolically, 2-6 s each)."""

from __future__ import annotations

import keras
import pytest

from laplace_tf.curvature import explain

IMAGE = {"weights": None, "input_shape": (32, 32, 3), "classes": 10}
MODELS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(alpha=0.35, **IMAGE),
    "ResNet50": lambda: keras.applications.ResNet50(**IMAGE),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(**IMAGE),
    "DenseNet121": lambda: keras.applications.DenseNet121(**IMAGE),
    "ConvNeXtTiny": lambda: keras.applications.ConvNeXtTiny(**IMAGE),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_weight_of_an_application_model_has_a_rule(name):
    model = MODELS[name]()
    records = explain(model)
    assert not records.fallback, [(r.layer, r.layer_class) for r in records.fallback]
    covered = sum(r.size for r in records)
    assert covered == sum(v.shape.num_elements() for v in model.trainable_variables)
