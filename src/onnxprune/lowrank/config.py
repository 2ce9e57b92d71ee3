"""Options of the low-rank rewrite, validated once (the CLI and the Python API share them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, get_args

from onnxprune.errors import UsageError
from onnxprune.registry.options import option

__all__ = ["CONV_MODES", "METHODS", "LowRankConfig"]

#: How convolutions are factorized (``None``: convolutions are left alone).
ConvMode = Literal["spatial", "tucker", "separable"]
CONV_MODES: tuple[str, ...] = get_args(ConvMode)
#: How linear weights are decomposed: plain SVD, SVD-LLM whitening, ASVD channel scaling.
Method = Literal["svd", "svd-llm", "asvd"]
METHODS: tuple[str, ...] = get_args(Method)
_RULES = ("rank", "layer_ranks", "energy", "target_params", "target_macs", "max_layer_error")


@dataclasses.dataclass(frozen=True)
class LowRankConfig:
    """What to factorize and how to pick ranks.

    Exactly one rank rule is given: ``rank`` (explicit), ``energy`` (keep this share of
    ``sum s^2`` per layer), ``target_params`` / ``target_macs`` (the factorized layers end
    at this fraction of their dense parameters / MACs, one energy level shared by all
    layers, found by bisection), or ``max_layer_error`` (per layer, the smallest rank whose
    relative output error ``||X W - X W_r||_F / ||X W||_F`` on calibration data is within the
    budget; without activation statistics the weight error ``||W - W_r||_F / ||W||_F``).

    Attributes:
        rank: Explicit rank (Tucker: both ranks; separable: channel multiplier).
        layer_ranks: Explicit ranks per node name (a plan replayed from a report, e.g. to
            compare decompositions at equal ranks); layers not listed are skipped.
        energy: Energy fraction in (0, 1].
        target_params: Parameter fraction of the candidate layers, in (0, 1).
        target_macs: MAC fraction of the candidate layers, in (0, 1).
        max_layer_error: Relative per-layer error budget, in (0, 1).
        method: ``svd``, ``svd-llm`` or ``asvd`` (the last two need calibration data).
        conv: ``spatial``, ``tucker``, ``separable`` or None (convolutions untouched).
        fold: Run the linear-chain folding pass after factorizing.
        factorize: Factorize at all (False: only fold).
        exclude: Node names never rewritten.
        round_to: Ranks are rounded up to a multiple of this (1: no rounding).
        margin: Factorize only when the factored cost is at most ``margin`` x the dense cost.
        latency_check: Time each linear layer dense vs factored in onnxruntime and keep the
            dense one unless the factored one is faster. Also turns on the conv check.
        conv_latency_check: Time each conv layer, original vs factored chain, as standalone
            models at the layer's input shape and keep the original unless the chain is at
            least 5% faster. On by default: on MobileNetV2 Tucker-2 the only rewritten conv
            (the 3-channel stem) is slower factored, and the probe costs ~0.25 s.
        latency_threads: Intra-op threads of the conv latency probes (match the deployment).
        calib_samples: At most this many calibration samples feed the statistics.
        dims: Symbolic dimension values for shapes (MACs, latency probes, synthetic feeds).
    """

    rank: int | None = option(None, help="the same rank for every layer", metavar="R")
    layer_ranks: Mapping[str, tuple[int, ...]] | None = option(
        None, help="explicit ranks per node (a plan replayed from a report)", cli=False
    )
    energy: float | None = option(None, help="keep this share of sum(sigma^2), (0, 1]", metavar="E")
    target_params: float | None = option(
        None, help="the factorized layers end at this fraction of their params", metavar="F"
    )
    target_macs: float | None = option(
        None, help="the factorized layers end at this fraction of their MACs", metavar="F"
    )
    max_layer_error: float | None = option(
        None, help="relative per-layer output error budget, (0, 1)", metavar="B"
    )
    method: Method = option(
        "svd",
        help="svd, or activation-aware svd-llm (whitening) / asvd (channel scaling), --calib",
        aliases=(
            (
                "--activation-aware",
                {"action": "store_const", "const": "svd-llm", "help": "same as --method svd-llm"},
            ),
            ("--aware-method", {"choices": ("svd-llm", "asvd"), "help": "same as --method"}),
        ),
    )
    conv: ConvMode | None = option(None, help="also factorize 2-D convolutions this way")
    fold: bool = option(False, help="merge chains of linear ops afterwards")
    factorize: bool = option(True, help="factorize (--fold alone without a rank rule only folds)")
    exclude: tuple[str, ...] = option((), help="nodes kept dense", metavar="NODE")
    round_to: int = option(8, help="ranks are rounded up to a multiple of this", metavar="N")
    margin: float = option(0.9, help="factorize only when factored cost <= margin x dense cost")
    latency_check: bool = option(
        False,
        help="also time MatMul/Gemm factorizations; keep layers that are not measured faster",
    )
    conv_latency_check: bool = option(
        True,
        help="time conv decompositions at the layer's input shape and keep a conv unless its "
        "chain measures at least 5%% faster",
    )
    latency_threads: int = option(1, help="intra-op threads of the latency probes", metavar="N")
    calib_samples: int = option(32, help="at most this many samples feed the statistics")
    dims: Mapping[str, int] = option(
        help="symbolic dimension values (the shared --dim option)", default_factory=dict, cli=False
    )

    @property
    def activation_aware(self) -> bool:
        """True when the decomposition needs activation statistics."""
        return self.method != "svd"

    @property
    def check_conv_latency(self) -> bool:
        """True when conv rewrites are timed before they are applied."""
        return self.conv is not None and (self.latency_check or self.conv_latency_check)

    def rule(self) -> str:
        """The name of the rank rule in use."""
        for name in _RULES:
            if getattr(self, name) is not None:
                return name
        return "none"

    def validate(self, *, has_calib: bool) -> None:
        """Raise UsageError naming the first bad option."""
        given = [n for n in _RULES if getattr(self, n) is not None]
        if self.factorize and not given:
            raise UsageError(
                "give a rank rule: --rank R, --energy E, --target-params F, --target-macs F "
                "or --max-layer-error B"
            )
        if len(given) > 1:
            flags = " and ".join("--" + n.replace("_", "-") for n in given)
            raise UsageError(f"{flags}: give only one rank rule")
        if self.rank is not None and self.rank <= 0:
            raise UsageError(f"--rank {self.rank}: must be a positive integer")
        for node, ranks in (self.layer_ranks or {}).items():
            if not ranks or min(ranks) <= 0:
                raise UsageError(f"layer_ranks[{node!r}] = {ranks}: ranks must be positive")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise UsageError(f"--energy {self.energy}: must be in (0, 1]")
        for name in ("target_params", "target_macs", "max_layer_error"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise UsageError(f"--{name.replace('_', '-')} {value}: must be in (0, 1)")
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.conv is not None and self.conv not in CONV_MODES:
            raise UsageError(f"--conv {self.conv!r}: choose from {', '.join(CONV_MODES)}")
        if self.activation_aware and not has_calib:
            raise UsageError(
                "--activation-aware needs --calib PATH: the input statistics come from "
                "calibration data"
            )
        if self.round_to < 1:
            raise UsageError(f"--round-to {self.round_to}: must be >= 1")
        if not 0.0 < self.margin <= 1.0:
            raise UsageError(f"margin {self.margin}: must be in (0, 1]")
        if self.latency_threads < 0:
            raise UsageError(f"latency_threads {self.latency_threads}: must be >= 0")
        if self.calib_samples < 1:
            raise UsageError(f"calib_samples {self.calib_samples}: must be >= 1")
