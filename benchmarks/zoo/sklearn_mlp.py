"""A scikit-learn ``StandardScaler`` + ``MLPClassifier`` pipeline on digits, via skl2onnx.

Data: scikit-learn's bundled ``load_digits`` (1797 real 8x8 handwritten digits, offline), split
by sample index: samples [0, 1200) train the model and the first 256 of them are the
calibration set; samples [1200, 1797) are the evaluation set, used neither for training nor for
calibration.

The ONNX graph is skl2onnx's default conversion: ``Scaler`` (ai.onnx.ml), the MLP's
``MatMul`` / ``Add`` / ``Relu`` layers, ``Softmax``, ``ArgMax`` + ``ArrayFeatureExtractor`` for
the label, and ``ZipMap`` turning the probabilities into a sequence of maps (``seq(map(int64,
tensor(float)))``). Outputs: ``output_label`` (int64, (N,)) and ``output_probability``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _common import ZooEntry, finished, mark_finished, save_feeds

TRAIN_END = 1200  # samples [0, TRAIN_END) train; the rest is the evaluation set
CALIB = 256  # the first CALIB training samples calibrate
HIDDEN = (128, 64)
SEED = 0
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}
KEY = (
    f"train={TRAIN_END} calib={CALIB} hidden={HIDDEN} seed={SEED} opset={TARGET_OPSET} "
    "variants=zipmap,tensor"
)


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_eval, y_eval)``: digits pixels (0..16, float32) split by index."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float32), data.target.astype(np.int64)
    return x[:TRAIN_END], y[:TRAIN_END], x[TRAIN_END:], y[TRAIN_END:]


def train(x: np.ndarray, y: np.ndarray):
    """A seeded scaler + MLP pipeline, as a user would write it."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=300, random_state=SEED)
    return make_pipeline(StandardScaler(), mlp).fit(x, y)


def export(pipeline, path: Path, zipmap: bool = True) -> None:
    """skl2onnx with its default options (ZipMap on), or with ``zipmap=False``."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier

    model = to_onnx(
        pipeline,
        initial_types=[("input", FloatTensorType([None, 64]))],
        target_opset=TARGET_OPSET,
        options=None if zipmap else {MLPClassifier: {"zipmap": False}},
    )
    path.write_bytes(model.SerializeToString())


def sanity(path: Path, x: np.ndarray, y: np.ndarray, expected: np.ndarray) -> dict:
    """Eval accuracy of the ONNX labels, and their agreement with scikit-learn's."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = sess.run(["output_label"], {"input": x})[0]
    return {
        "fp32_eval_accuracy": round(float(np.mean(labels == y)), 4),
        "onnx_matches_sklearn": round(float(np.mean(labels == expected)), 4),
    }


def opsets(path: Path) -> dict[str, int]:
    """The model's opset imports, ``""`` being the default domain."""
    import onnx

    return {op.domain: op.version for op in onnx.load(str(path)).opset_import}


def build_folder(folder: Path) -> dict:
    """Train, convert, write the feeds; return the sanity record."""
    x_train, y_train, x_eval, y_eval = digits_split()
    pipeline = train(x_train, y_train)
    model = folder / "mlp.onnx"
    export(pipeline, model)
    export(pipeline, folder / "mlp_tensor.onnx", zipmap=False)
    save_feeds(folder / "calib", [{"input": x_train[i : i + 1]} for i in range(CALIB)])
    save_feeds(folder / "eval", [{"input": x_eval[i : i + 1]} for i in range(len(x_eval))])
    import skl2onnx
    import sklearn

    record = sanity(model, x_eval, y_eval, pipeline.predict(x_eval))
    versions = {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__}
    return {**record, **versions, "opsets": opsets(model)}


def build(cache: Path) -> list[ZooEntry]:
    """The digits MLP with its calibration and evaluation digits."""
    folder = cache / "sklearn_mlp"
    record = finished(folder, KEY)
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        record = build_folder(folder)
        mark_finished(folder, KEY, record)
    return [
        ZooEntry(
            name="sklearn_mlp",
            model="sklearn_mlp/mlp.onnx",
            calib="sklearn_mlp/calib.npz",
            eval="sklearn_mlp/eval.npz",
            metric="label",
            output="output_label",
            source=f"trained here: scikit-learn {record['scikit-learn']} StandardScaler + "
            f"MLPClassifier{HIDDEN} on load_digits (seed {SEED}), converted by skl2onnx "
            f"{record['skl2onnx']}",
            split=f"load_digits by sample index: calib = samples 0..{CALIB - 1} (of the "
            f"training samples 0..{TRAIN_END - 1}); eval = samples {TRAIN_END}..1796",
            notes="skl2onnx default conversion, ZipMap kept: output_probability is a "
            "sequence of maps (int64 -> float), not a tensor; output_label is int64 (N,). "
            "Input 'input' float32 (N, 64), raw pixels 0..16 (the Scaler is in the graph). "
            f"Opsets {record['opsets']}.",
            extra={"input": "input", "zipmap_output": "output_probability", **record},
        ),
        ZooEntry(
            name="sklearn_mlp.tensor",
            model="sklearn_mlp/mlp_tensor.onnx",
            calib="sklearn_mlp/calib.npz",
            eval="sklearn_mlp/eval.npz",
            metric="label",
            output="label",
            source="the same pipeline converted with skl2onnx option zipmap=False",
            split=f"as sklearn_mlp: calib = samples 0..{CALIB - 1}; eval = {TRAIN_END}..1796",
            notes="outputs 'label' int64 (N,) and 'probabilities' float (N, 10).",
            extra={"input": "input", **record},
        ),
    ]
