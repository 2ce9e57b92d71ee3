"""A small Keras CNN (Conv2D / BatchNormalization / Dense / Dropout) on digits, exported to ONNX.

Written the way Keras users write it: ``keras.Sequential`` on the TensorFlow backend
(``tf.keras`` is Keras 3 in TensorFlow 2.16+), trained briefly and seeded. Exported with Keras
3's ``model.export(format="onnx")``, which runs tf2onnx on the model's traced TensorFlow
function; ``tf2onnx.convert.from_keras`` itself fails on Keras 3 models (it looks up output
names that Keras 3 no longer has).

Data: scikit-learn's bundled ``load_digits`` split by sample index as in ``sklearn_mlp``
(train on samples [0, 1200), calibrate on the first 256 of them, evaluate on [1200, 1797)),
each 8x8 image scaled to [0, 1] and upsampled (bilinear) to 32x32, channels last.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from _common import ZooEntry, finished, mark_finished, save_feeds
from sklearn_mlp import CALIB, TRAIN_END, digits_split

SIZE = 32
EPOCHS = 15
BATCH = 32
SEED = 0
OPSET = 17
BN_MOMENTUM = 0.9  # Keras' default 0.99 leaves the moving statistics far off after 15 epochs
KEY = f"size={SIZE} epochs={EPOCHS} batch={BATCH} seed={SEED} opset={OPSET} bn={BN_MOMENTUM}"
NEEDS = "tensorflow-cpu==2.21.0 and tf2onnx==1.17.0 (the zoo extra)"


def upsample(x: np.ndarray) -> np.ndarray:
    """Digits rows (0..16) as (N, 32, 32, 1) float32 images in [0, 1] (bilinear)."""
    from PIL import Image

    images = [
        np.asarray(Image.fromarray(row.reshape(8, 8) / 16.0).resize((SIZE, SIZE), Image.BILINEAR))
        for row in x.astype(np.float32)
    ]
    return np.stack(images)[..., None].astype(np.float32)


def import_keras():
    """Keras 3 on the TensorFlow backend, seeded and deterministic."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        import keras
        import tensorflow as tf
        import tf2onnx  # noqa: F401  (model.export(format="onnx") needs it)
    except ImportError as error:
        raise RuntimeError(f"keras_cnn needs {NEEDS}: {error}") from error
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"keras_cnn needs the tensorflow backend, not {keras.backend.backend()}")
    keras.utils.set_random_seed(SEED)
    tf.config.experimental.enable_op_determinism()
    return keras


def model_definition(keras):
    """Three Conv2D + BatchNormalization + ReLU blocks, Dropout, Dense, softmax classes."""
    layers = keras.layers

    def block(filters: int, pool: bool) -> list:
        found = [
            layers.Conv2D(filters, 3, padding="same", use_bias=False),
            layers.BatchNormalization(momentum=BN_MOMENTUM),
            layers.Activation("relu"),
        ]
        return [*found, layers.MaxPooling2D()] if pool else found

    return keras.Sequential(
        [
            keras.Input((SIZE, SIZE, 1), name="image"),
            *block(16, True),
            *block(32, True),
            *block(64, False),
            layers.GlobalAveragePooling2D(),
            layers.Dropout(0.3),
            layers.Dense(64, activation="relu"),
            layers.Dropout(0.3),
            layers.Dense(10, activation="softmax"),
        ],
        name="digits_cnn",
    )


def train(keras, x: np.ndarray, y: np.ndarray):
    """Adam, sparse cross-entropy, ``EPOCHS`` epochs; never sees the evaluation samples."""
    model = model_definition(keras)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=True, verbose=0)
    return model


def sanity(path: Path, x: np.ndarray, y: np.ndarray, expected: np.ndarray) -> dict:
    """ONNX eval accuracy, agreement with Keras' classes and largest probability difference."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probs = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    classes = probs.argmax(-1)
    return {
        "fp32_eval_accuracy": round(float(np.mean(classes == y)), 4),
        "onnx_top1_matches_keras": round(float(np.mean(classes == expected.argmax(-1))), 4),
        "onnx_max_abs_diff_keras": float(np.abs(probs - expected).max()),
        "output": sess.get_outputs()[0].name,
    }


def build_folder(folder: Path) -> dict:
    """Train, export, write the feeds; return the sanity record."""
    keras = import_keras()
    import tensorflow as tf
    import tf2onnx

    x_train, y_train, x_eval, y_eval = digits_split()
    x_train, x_eval = upsample(x_train), upsample(x_eval)
    model = train(keras, x_train, y_train)
    path = folder / "cnn.onnx"
    model.export(str(path), format="onnx", opset_version=OPSET, verbose=False)
    save_feeds(folder / "calib", [{"image": x_train[i : i + 1]} for i in range(CALIB)])
    save_feeds(folder / "eval", [{"image": x_eval[i : i + 1]} for i in range(len(x_eval))])
    record = sanity(path, x_eval, y_eval, model.predict(x_eval, verbose=0))
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__}
    return {**record, **versions, "tf2onnx": tf2onnx.__version__}


def build(cache: Path) -> list[ZooEntry]:
    """The digits CNN with its calibration and evaluation images."""
    folder = cache / "keras_cnn"
    record = finished(folder, KEY)
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        record = build_folder(folder)
        mark_finished(folder, KEY, record)
    return [
        ZooEntry(
            name="keras_cnn",
            model="keras_cnn/cnn.onnx",
            calib="keras_cnn/calib.npz",
            eval="keras_cnn/eval.npz",
            metric="top1",
            output=record["output"],
            source=f"trained here: Keras {record['keras']} (TensorFlow {record['tensorflow']} "
            f"backend) on load_digits upsampled to {SIZE}x{SIZE}, seed {SEED}, {EPOCHS} epochs",
            split=f"load_digits by sample index: calib = samples 0..{CALIB - 1} (of the "
            f"training samples 0..{TRAIN_END - 1}); eval = samples {TRAIN_END}..1796",
            notes=f"Exported by Keras 3 model.export(format='onnx') (tf2onnx {record['tf2onnx']}"
            f", opset {OPSET}); tf2onnx.convert.from_keras fails on Keras 3. Input 'image' "
            f"(N, {SIZE}, {SIZE}, 1) NHWC in [0, 1]; output softmax probabilities (N, 10). "
            "tf2onnx folds BatchNormalization into the convolutions; Dropout is gone.",
            extra={"input": "image", **record},
        )
    ]
