"""Silero VAD, as shipped in its PyPI wheel, streamed over real and synthesized speech.

Models (all from ``silero-vad``'s wheel, all 16 kHz streaming with recurrent state):

* ``silero_vad.onnx``: the default (opset 16, written with spox): one top-level ``If`` on
  ``sr == 16000`` whose branches hold the 16 kHz and 8 kHz networks;
* ``silero_vad_16k_op15.onnx``: a PyTorch 2.3 export, opset 15, three ``If`` nodes;
* ``silero_vad_op18_ifless.onnx``: a PyTorch 2.9 export, opset 18, one top-level ``If`` on
  ``sr`` (the branches themselves have no control flow).

Not included: ``silero_vad_half.onnx`` (fp16), ``silero_vad_openvino_16k.onnx`` (fixed shape,
no ``sr``) and ``silero_vad_16k_sequence.onnx`` (a whole sequence of windows per call).

Streaming contract (read from the package's ``OnnxWrapper``): audio at 16 kHz in [-1, 1] is cut
into chunks of 512 samples; each call gets ``input`` (1, 64 + 512): the last 64 samples of the
previous call's input (zeros at a clip's start) followed by the chunk, ``state`` (2, 1, 128)
(zeros at a clip's start, then the previous call's ``stateN``) and ``sr`` (int64 scalar, 16000).
It returns ``output`` (1, 1), the speech probability, and ``stateN``.

Feeds: for every chunk, the fp32 model's own state going into it (each model has its own feed
files), so a lossy model is judged chunk by chunk from the fp32 state (no drift across chunks).

Audio: no recorded speech corpus is available offline, so
* eval holds the real 30 s two-speaker recording shipped in ``pyannote.audio``'s wheel
  (``pyannote/audio/sample/sample.wav``, with its speech reference ``sample.rttm``), plus clips
  of eval sentences spoken by eSpeak NG;
* calib holds only eSpeak NG clips of calibration sentences.
eSpeak NG is the library shipped inside PyPI's ``espeakng-loader`` wheel (driven here through
ctypes, x86-64 Linux), so no system package is needed. Each synthetic clip is a pause,
a sentence in one of several voices and a pause, over a low noise floor. Sentences come from
``_common.sentences`` (disjoint stdlib modules per split), so no clip contributes to both.
"""

from __future__ import annotations

import ctypes
import wave
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import ZooEntry, extract_member, finished, mark_finished, pip_wheel, sentences

WHEEL = "silero-vad==6.2.3"
AUDIO_WHEEL = "pyannote-audio==4.0.7"
TTS_WHEEL = "espeakng-loader==0.2.4"
RATE = 16000
CHUNK = 512
CONTEXT = 64
THRESHOLD = 0.5
CLIPS = {"calib": 8, "eval": 4}  # synthetic clips per split, one sentence each
WORDS = (5, 10)  # sentence length range for the synthetic clips
VOICES = ("en-us", "en-us+f2", "en", "en+m3", "en-gb-x-rp+f4", "en-us+m5")
# (entry name, wheel member, what it is)
MODELS = (
    ("silero_vad", "silero_vad.onnx",
     "default model, opset 16 (spox), top-level If on sr selecting the 16k / 8k network"),
    ("silero_vad.op15", "silero_vad_16k_op15.onnx",
     "16 kHz PyTorch 2.3 export, opset 15, three If nodes"),
    ("silero_vad.op18_ifless", "silero_vad_op18_ifless.onnx",
     "PyTorch 2.9 export, opset 18, one top-level If on sr, no control flow inside"),
)  # fmt: skip
KEY = f"folders seed0 {WHEEL} {AUDIO_WHEEL} {TTS_WHEEL} clips={CLIPS} words={WORDS} voices={VOICES}"

_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class Speaker:
    """eSpeak NG (the shared library and data from the ``espeakng-loader`` wheel) via ctypes."""

    def __init__(self, root: Path) -> None:
        """``root`` holds ``libespeak-ng.so`` and ``espeak-ng-data/``."""
        self.lib = ctypes.CDLL(str(root / "libespeak-ng.so"))
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                               ctypes.c_int]  # fmt: skip
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        self.rate = self.lib.espeak_Initialize(2, 0, str(root).encode(), 0)  # synchronous
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed in {root}")
        self.pieces: list[np.ndarray] = []
        self.callback = _CALLBACK(self._collect)  # kept alive as long as the library uses it
        self.lib.espeak_SetSynthCallback(self.callback)

    def _collect(self, wav: ctypes.Array, count: int, _events: int) -> int:
        if count > 0:
            self.pieces.append(np.ctypeslib.as_array(wav, shape=(count,)).copy())
        return 0

    def say(self, text: str, voice: str) -> np.ndarray:
        """``text`` spoken in ``voice``, float32 in [-1, 1] at 16 kHz."""
        from scipy.signal import resample_poly

        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
        data = text.encode("utf-8") + b"\0"
        self.pieces = []
        self.lib.espeak_ng_SetRandSeed(ctypes.c_long(0))  # some voices add random noise
        if self.lib.espeak_Synth(data, len(data), 0, 0, 0, 0, None, None) != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r}")
        self.lib.espeak_Synchronize()
        audio = np.concatenate(self.pieces).astype(np.float32) / 32768.0
        return resample_poly(audio, RATE, self.rate).astype(np.float32)


def extract_tree(archive: Path, prefix: str, dest: Path) -> Path:
    """Extract every member of ``archive`` under ``prefix`` into ``dest``; return its folder."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(dest, [name for name in zf.namelist() if name.startswith(prefix)])
    return dest / prefix


def synthetic_clips(speaker: Speaker, split: str, count: int) -> list[np.ndarray]:
    """``count`` clips of pause, one sentence, pause, over a low noise floor."""
    rng = np.random.default_rng(0 if split == "calib" else 1)
    texts = sentences(split, count, min_words=WORDS[0], max_words=WORDS[1])
    clips = []
    for index, text in enumerate(texts):
        speech = speaker.say(text, VOICES[index % len(VOICES)])
        speech *= rng.uniform(0.3, 0.9) / max(1e-6, float(np.abs(speech).max()))
        pauses = [np.zeros(int(RATE * rng.uniform(0.4, 1.2)), np.float32) for _ in range(2)]
        clip = np.concatenate([pauses[0], speech, pauses[1]])
        clips.append(clip + rng.normal(0.0, 0.003, clip.shape).astype(np.float32))
    return clips


def read_wav(path: Path) -> np.ndarray:
    """A 16-bit mono 16 kHz WAV file as float32 in [-1, 1]."""
    with wave.open(str(path)) as handle:
        if (handle.getnchannels(), handle.getsampwidth(), handle.getframerate()) != (1, 2, RATE):
            raise ValueError(f"{path}: expected 16-bit mono {RATE} Hz")
        frames = handle.readframes(handle.getnframes())
    return np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0


def speech_reference(rttm: Path, chunks: int) -> np.ndarray:
    """Per chunk, whether its centre lies in a speech turn of the RTTM reference."""
    turns = [line.split() for line in rttm.read_text().splitlines() if line.strip()]
    centres = (np.arange(chunks) * CHUNK + CHUNK / 2) / RATE
    speech = np.zeros(chunks, bool)
    for turn in turns:
        start, length = float(turn[3]), float(turn[4])
        speech |= (centres >= start) & (centres < start + length)
    return speech


def session(path: Path) -> ort.InferenceSession:
    """A quiet CPU session."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def stream(sess: ort.InferenceSession, clip: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Run ``clip`` chunk by chunk; return each chunk's feed (fp32 state in) and probabilities."""
    state = np.zeros((2, 1, 128), np.float32)
    context = np.zeros(CONTEXT, np.float32)
    feeds, probs = [], []
    for start in range(0, len(clip) - CHUNK + 1, CHUNK):
        window = np.concatenate([context, clip[start : start + CHUNK]])[None].astype(np.float32)
        feed = {"input": window, "state": state, "sr": np.array(RATE, np.int64)}
        prob, state = sess.run(["output", "stateN"], feed)
        feeds.append(feed)
        probs.append(float(prob.reshape(-1)[0]))
        context = window[0, -CONTEXT:]
    return feeds, np.array(probs)


def save_split(path: Path, feeds: list[dict]) -> None:
    """A folder of numbered ``.npz`` feeds, one per chunk.

    Not one stacked ``.npz``: a stacked scalar input (``sr``) would come back per sample as a
    numpy scalar, which onnxruntime refuses; a file per feed keeps it a 0-d array.
    """
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.npz"):
        stale.unlink()
    for index, feed in enumerate(feeds):
        np.savez(path / f"{index:05d}.npz", **feed)


def build_model(model: Path, clips: dict[str, list[np.ndarray]], reference: np.ndarray) -> dict:
    """Write the model's calib / eval feeds; return its fp32 sanity numbers."""
    sess = session(model)
    record: dict = {}
    for split, found in clips.items():
        runs = [stream(sess, clip) for clip in found]
        save_split(model.parent / f"{model.stem}.{split}", [f for feeds, _ in runs for f in feeds])
        record[f"{split}_chunks"] = sum(len(probs) for _, probs in runs)
        record[f"{split}_speech_fraction"] = round(
            float(np.mean(np.concatenate([probs for _, probs in runs]) > THRESHOLD)), 4
        )
        if split == "eval":  # the real recording is the first eval clip
            agree = (runs[0][1] > THRESHOLD) == reference
            record["fp32_vs_rttm_accuracy"] = round(float(np.mean(agree)), 4)
    return record


def build_folder(folder: Path, cache: Path) -> dict:
    """Extract models, audio and eSpeak NG, make the clips, write each model's feeds."""
    tts = extract_tree(pip_wheel(TTS_WHEEL, cache), "espeakng_loader/", folder / "tts")
    speaker = Speaker(tts)
    audio_wheel = pip_wheel(AUDIO_WHEEL, cache)
    real = read_wav(extract_member(audio_wheel, "sample/sample.wav", folder / "sample.wav"))
    rttm = extract_member(audio_wheel, "sample/sample.rttm", folder / "sample.rttm")
    reference = speech_reference(rttm, len(real) // CHUNK)
    clips = {
        "calib": synthetic_clips(speaker, "calib", CLIPS["calib"]),
        "eval": [real, *synthetic_clips(speaker, "eval", CLIPS["eval"])],
    }
    wheel = pip_wheel(WHEEL, cache)
    record = {}
    for name, member, _ in MODELS:
        model = extract_member(wheel, f"silero_vad/data/{member}", folder / member)
        record[name] = build_model(model, clips, reference)
    return record


def build(cache: Path) -> list[ZooEntry]:
    """The three silero VAD graphs with their streamed calib / eval chunks."""
    folder = cache / "silero"
    record = finished(folder, KEY)
    if record is None:
        folder.mkdir(parents=True, exist_ok=True)
        record = build_folder(folder, cache)
        mark_finished(folder, KEY, record)
    return [entry(name, member, what, record[name]) for name, member, what in MODELS]


def entry(name: str, member: str, what: str, checked: dict) -> ZooEntry:
    """The zoo entry of one silero graph."""
    stem = f"silero/{Path(member).stem}"
    return ZooEntry(
        name=name,
        model=f"silero/{member}",
        calib=f"{stem}.calib",
        eval=f"{stem}.eval",
        metric="sqnr",
        output="output",
        source=f"PyPI {WHEEL}: silero_vad/data/{member}",
        split=f"calib: {CLIPS['calib']} eSpeak NG clips of calibration sentences; eval: the "
        f"real 30 s recording from {AUDIO_WHEEL} (pyannote/audio/sample/sample.wav) and "
        f"{CLIPS['eval']} eSpeak NG clips of evaluation sentences; sentences from disjoint "
        "stdlib modules",
        notes=f"{what}. Third-party ONNX as shipped; control flow (If) and recurrent state. "
        "Inputs: input (1, 576) = 64 context samples + a 512-sample chunk at 16 kHz, state "
        "(2, 1, 128), sr int64 scalar 16000; outputs: output (1, 1) speech probability, "
        "stateN. Each chunk's state is the fp32 model's own state after the previous chunks "
        "of its clip (reset to zeros per clip).",
        extra={
            "rate": RATE,
            "chunk": CHUNK,
            "context": CONTEXT,
            "state_output": "stateN",
            "decision_threshold": THRESHOLD,
            "decision_agreement": "fraction of eval chunks with (p > 0.5) equal to fp32's",
            "reference": "silero/sample.rttm (speech turns of the first eval clip)",
            **checked,
        },
    )
