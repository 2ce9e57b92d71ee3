"""Reference architectures in plain torch (no torchvision), built deterministically.

Every ``build_*`` function seeds torch, builds the module, gives normalization layers
non-trivial parameters and statistics (so that BatchNorm folding is really exercised
downstream), and returns it in eval mode.

BatchNorm statistics are not drawn at random: gamma/beta are randomized first, then the
running mean/variance are *measured* by a few train-mode forward passes over seeded random
inputs (cumulative average). That keeps activations well scaled through 50 layers, which
random statistics would not, while every BN still has a non-identity affine transform.

Models:
    resnet18, resnet50: ImageNet ResNets (v1.5: stride on the 3x3 conv), input [N,3,224,224].
    mobilenet_v2: depthwise separable inverted residuals, ReLU6, input [N,3,224,224].
    detector: small YOLO-style net (channel Split/Concat, nearest upsampling, 3 outputs).
    encoder: BERT-style encoder, 6 layers, hidden 384, 12 heads, explicit attention.
    mlp: 3-layer perceptron on [N,64].
    fusion: image CNN branch + token-embedding branch, concatenated into an MLP head.
    densenet121: DenseNet-121 (dense blocks: every layer reads the Concat of all earlier
        feature maps of its block), input [N,3,224,224]; ``DenseNet`` takes small widths
        for tests.
    digits_cnn: the small CNN trained on scikit-learn digits (see ``train_digits.py``).
    digits_resnet: the residual CNN trained on digits upsampled to 32x32, onnxprune's
        default model (see ``train_default.py``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "BertEncoder",
    "DenseNet",
    "DigitsCNN",
    "DigitsResNet",
    "FusionNet",
    "MobileNetV2",
    "ResNet",
    "TinyDetector",
    "build_densenet121",
    "build_detector",
    "build_encoder",
    "build_fusion",
    "build_mlp",
    "build_mobilenet_v2",
    "build_resnet18",
    "build_resnet50",
    "count_params_and_macs",
    "init_normalization",
]


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    """Conv (no bias, 'same' padding for odd k) followed by BatchNorm."""
    conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


# --------------------------------------------------------------------------- ResNet


class _ResidualBlock(nn.Module):
    """``relu(body(x) + shortcut(x))``; subclasses build ``body``."""

    expansion = 1

    def __init__(self, body: nn.Module, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = body
        self.shortcut: nn.Module = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual sum followed by ReLU."""
        return self.relu(self.body(x) + self.shortcut(x))


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        body = nn.Sequential(
            *_conv_bn(cin, width, 3, stride), nn.ReLU(inplace=True), *_conv_bn(width, width, 3)
        )
        super().__init__(body, cin, width, stride)


class Bottleneck(_ResidualBlock):
    """1x1 reduce, 3x3 (carries the stride, as in torchvision's v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        body = nn.Sequential(
            *_conv_bn(cin, width, 1),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width, 3, stride),
            nn.ReLU(inplace=True),
            *_conv_bn(width, width * 4, 1),
        )
        super().__init__(body, cin, width * 4, stride)


class ResNet(nn.Module):
    """ImageNet ResNet: 7x7 stem, max pool, four stages, global average pool, FC."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            *_conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        )
        stages: list[nn.Module] = []
        cin = 64
        for i, blocks in enumerate(layers):
            width = 64 * 2**i
            stage: list[nn.Module] = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(block(cin, width, stride))
                cin = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes]."""
        x = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


# ------------------------------------------------------------------------ MobileNetV2


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear project; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [*_conv_bn(cin, hidden, 1), nn.ReLU6(inplace=True)]
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]
        layers += _conv_bn(hidden, cout, 1)
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output, with the residual added when shapes allow."""
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0), the torchvision layout: ~3.5M params, ~0.30 GMACs at 224."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [*_conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            cout = _make_divisible(c)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, 1280, 1), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes]."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- DenseNet


class _DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (``bn_size * growth``), BN-ReLU-3x3 conv (``growth``) on the Concat
    of all earlier feature maps of the block (torchvision's layout)."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        hidden = bn_size * growth
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(inplace=True),
            nn.Conv2d(cin, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, growth, 3, padding=1, bias=False),
        )

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The ``growth`` new channels."""
        return self.body(torch.cat(features, 1))


class _DenseBlock(nn.Module):
    """``layers`` dense layers; the output concatenates the input and every layer's output."""

    def __init__(self, layers: int, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(cin + i * growth, growth, bn_size) for i in range(layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Concat of ``x`` and every layer's new channels."""
        features = [x]
        for layer in self.layers:
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """DenseNet-BC (torchvision layout): 7x7 stem, dense blocks joined by BN-ReLU-1x1
    conv-avg pool transitions that halve the channels, BN-ReLU, global pool, FC.

    Defaults are DenseNet-121: 7,978,856 params, ~2.87 GMACs at 224x224.
    """

    def __init__(
        self,
        blocks: tuple[int, ...] = (6, 12, 24, 16),
        growth: int = 32,
        init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            *_conv_bn(3, init_features, 7, 2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        ]
        channels = init_features
        for i, count in enumerate(blocks):
            layers.append(_DenseBlock(count, channels, growth, bn_size))
            channels += count * growth
            if i != len(blocks) - 1:
                layers += [
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(channels, channels // 2, 1, bias=False),
                    nn.AvgPool2d(2, 2),
                ]
                channels //= 2
        layers += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes]."""
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------- Detector


class ConvBNAct(nn.Sequential):
    """Conv + BN + SiLU, the YOLO building block."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__(*_conv_bn(cin, cout, k, stride), nn.SiLU())


class SplitBlock(nn.Module):
    """C2f-style block: 1x1 conv, split channels in two, refine one half twice, concat all.

    The Split on the channel axis and the Concat of four pieces are the couplings a
    channel pruner must track with offsets.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.half = cout // 2
        self.cv1 = ConvBNAct(cin, 2 * self.half)
        self.m1 = nn.Sequential(
            ConvBNAct(self.half, self.half, 3), ConvBNAct(self.half, self.half, 3)
        )
        self.m2 = nn.Sequential(
            ConvBNAct(self.half, self.half, 3), ConvBNAct(self.half, self.half, 3)
        )
        self.cv2 = ConvBNAct(4 * self.half, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Split, refine, concatenate, fuse."""
        a, b = torch.split(self.cv1(x), [self.half, self.half], dim=1)
        b1 = self.m1(b) + b
        b2 = self.m2(b1)
        return self.cv2(torch.cat([a, b, b1, b2], dim=1))


class TinyDetector(nn.Module):
    """YOLO-like: 4 stride-2 stages, top-down FPN with nearest upsampling, 3 detection heads.

    Input [N,3,128,128]; outputs ``p3`` [N,A*(5+C),16,16], ``p4`` [..,8,8], ``p5`` [..,4,4].
    """

    def __init__(self, num_classes: int = 4, anchors: int = 3) -> None:
        super().__init__()
        out = anchors * (5 + num_classes)
        self.stem = ConvBNAct(3, 16, 3, 2)
        self.s2 = nn.Sequential(ConvBNAct(16, 32, 3, 2), SplitBlock(32, 32))
        self.s3 = nn.Sequential(ConvBNAct(32, 64, 3, 2), SplitBlock(64, 64))
        self.s4 = nn.Sequential(ConvBNAct(64, 96, 3, 2), SplitBlock(96, 96))
        self.s5 = nn.Sequential(ConvBNAct(96, 128, 3, 2), SplitBlock(128, 128))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.top4 = SplitBlock(128 + 96, 96)
        self.top3 = SplitBlock(96 + 64, 64)
        self.head3 = nn.Conv2d(64, out, 1)
        self.head4 = nn.Conv2d(96, out, 1)
        self.head5 = nn.Conv2d(128, out, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the three head maps, finest first."""
        c3 = self.s3(self.s2(self.stem(x)))
        c4 = self.s4(c3)
        c5 = self.s5(c4)
        p4 = self.top4(torch.cat([self.up(c5), c4], dim=1))
        p3 = self.top3(torch.cat([self.up(p4), c3], dim=1))
        return self.head3(p3), self.head4(p4), self.head5(c5)


# ---------------------------------------------------------------------------- Encoder


class SelfAttention(nn.Module):
    """Multi-head attention written out: MatMul, Reshape/Transpose heads, Softmax."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """``mask_bias`` is [N,1,1,S]: 0 where attended, -10000 where masked."""
        q = self._split_heads(self.query(x))
        k = self._split_heads(self.key(x))
        v = self._split_heads(self.value(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        context = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2)
        batch, seq = x.shape[0], x.shape[1]
        return self.out(context.reshape(batch, seq, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (BERT): attention + residual + LN, GELU FFN + residual + LN."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.attention = SelfAttention(hidden, heads)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        """One encoder layer."""
        x = self.ln1(x + self.attention(x, mask_bias))
        return self.ln2(x + self.ffn(x))


class BertEncoder(nn.Module):
    """BERT-style encoder (MiniLM-L6 sized by default).

    Inputs ``input_ids`` and ``attention_mask`` (int64 [N,S]); outputs the last hidden state
    [N,S,H] and the pooled first token, tanh(W h0 + b) [N,H].
    """

    def __init__(
        self,
        *,
        vocab: int = 30522,
        hidden: int = 384,
        layers: int = 6,
        heads: int = 12,
        ffn: int = 1536,
        max_positions: int = 512,
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.layers = nn.ModuleList(EncoderLayer(hidden, heads, ffn) for _ in range(layers))
        self.pooler = nn.Linear(hidden, hidden)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (last_hidden_state, pooler_output)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.ln(self.word(input_ids) + self.position(positions).unsqueeze(0))
        mask_bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask_bias)
        return x, torch.tanh(self.pooler(x[:, 0]))


# ------------------------------------------------------------------ Small models


class FusionNet(nn.Module):
    """Two inputs: ``image`` [N,3,32,32] through a CNN, ``tokens`` int64 [N,S] embedded and
    mean-pooled; the two feature vectors are concatenated into an MLP head (10 logits)."""

    def __init__(self, vocab: int = 1000, embed: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.cnn = nn.Sequential(
            *_conv_bn(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(64, 64, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.embedding = nn.Embedding(vocab, embed)
        self.text = nn.Sequential(nn.Linear(embed, 64), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(64 + 64, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Return logits [N, num_classes]."""
        text = self.text(self.embedding(tokens).mean(dim=1))
        return self.head(torch.cat([self.cnn(image), text], dim=1))


class DigitsCNN(nn.Module):
    """CNN for 8x8 digits: conv 1->16->32 (3x3, BN, ReLU), 2x2 max pool, FC 512->64->10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(1, 16, 3), nn.ReLU(), *_conv_bn(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, 10]."""
        return self.classifier(self.features(x))


class DigitsResNet(nn.Module):
    """Residual CNN for digits upsampled to 32x32 (onnxprune's default model).

    Stem conv 1->``widths[0]`` (3x3, BN, ReLU), one :class:`BasicBlock` per entry of
    ``widths`` (the first at 32x32, each later one halves the resolution with a 3x3 stride-2
    conv and a 1x1 projection shortcut), global average pool, FC ``widths[-1]``->10.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(1, widths[0], 3), nn.ReLU(inplace=True))
        cins = (widths[0], *widths[:-1])
        self.stages = nn.Sequential(
            *(
                BasicBlock(cin, width, 1 if i == 0 else 2)
                for i, (cin, width) in enumerate(zip(cins, widths, strict=True))
            )
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, 10]."""
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


# ------------------------------------------------------------------ Initialization


def init_normalization(
    model: nn.Module, calibration_inputs: tuple[torch.Tensor, ...], seed: int = 0
) -> nn.Module:
    """Randomize BN/LayerNorm affine parameters, then measure BN running statistics.

    gamma ~ U(0.5, 1.5) and beta ~ N(0, 0.1) for every BatchNorm and LayerNorm; then one
    train-mode forward pass over ``calibration_inputs`` with ``momentum=None`` sets the BN
    running mean/variance to the batch statistics. Returns ``model`` in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d | nn.LayerNorm)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(torch.rand(norm.weight.shape, generator=gen) + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, generator=gen) * 0.1)
    batchnorms = [m for m in norms if isinstance(m, nn.BatchNorm2d)]
    if batchnorms:
        for bn in batchnorms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration passes
        model.train()
        with torch.no_grad():
            model(*calibration_inputs)
        for bn in batchnorms:
            bn.momentum = 0.1
    return model.eval()


def _image_batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def build_resnet18(seed: int = 0) -> ResNet:
    """ResNet-18: ~11.7M params, ~1.82 GMACs at 224x224."""
    torch.manual_seed(seed)
    model = ResNet(BasicBlock, [2, 2, 2, 2])
    init_normalization(model, (_image_batch((8, 3, 224, 224), seed + 1),), seed)
    return model


def build_resnet50(seed: int = 0) -> ResNet:
    """ResNet-50 (bottleneck v1.5): ~25.6M params, ~4.1 GMACs at 224x224."""
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [3, 4, 6, 3])
    init_normalization(model, (_image_batch((8, 3, 224, 224), seed + 1),), seed)
    return model


def build_mobilenet_v2(seed: int = 0) -> MobileNetV2:
    """MobileNetV2 1.0: ~3.5M params, ~0.30 GMACs at 224x224."""
    torch.manual_seed(seed)
    model = MobileNetV2()
    init_normalization(model, (_image_batch((8, 3, 224, 224), seed + 1),), seed)
    return model


def build_densenet121(seed: int = 0) -> DenseNet:
    """DenseNet-121: 7,978,856 params, ~2.87 GMACs at 224x224."""
    torch.manual_seed(seed)
    model = DenseNet()
    init_normalization(model, (_image_batch((4, 3, 224, 224), seed + 1),), seed)
    return model


def build_detector(seed: int = 0) -> TinyDetector:
    """The small YOLO-style detector (input 128x128)."""
    torch.manual_seed(seed)
    model = TinyDetector()
    init_normalization(model, (_image_batch((8, 3, 128, 128), seed + 1),), seed)
    return model


def build_encoder(seed: int = 0, **kwargs: int) -> BertEncoder:
    """The BERT-style encoder; ``kwargs`` override sizes (e.g. ``vocab=1000`` for tests)."""
    torch.manual_seed(seed)
    model = BertEncoder(**kwargs)
    # BERT's initializer: N(0, 0.02) for Linear/Embedding weights, small random biases.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.02)
            if isinstance(module, nn.Linear):
                module.bias.normal_(0.0, 0.02)
    return init_normalization(model, (), seed)


def build_mlp(seed: int = 0) -> nn.Sequential:
    """MLP 64 -> 256 -> 128 -> 10 with ReLU."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model.eval()


def build_fusion(seed: int = 0) -> FusionNet:
    """The two-input image + tokens model."""
    torch.manual_seed(seed)
    model = FusionNet()
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, 1000, (8, 16), generator=gen)
    init_normalization(model, (_image_batch((8, 3, 32, 32), seed + 1), tokens), seed)
    return model


def count_params_and_macs(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """Count parameters and multiply-accumulates of Conv2d and Linear layers for one forward.

    Only convolutions and linear layers are counted (the usual convention); the attention
    score/context MatMuls of the encoder are added analytically by the caller if wanted.
    """
    macs = 0

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        nonlocal macs
        weight = module.weight
        if isinstance(module, nn.Conv2d):
            # each output element costs (cin/groups) * kh * kw MACs
            macs += output.numel() * weight[0].numel()
        else:
            macs += output.numel() * weight.shape[1]

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(*inputs)
    for handle in handles:
        handle.remove()
    params = sum(p.numel() for p in model.parameters())
    return params, macs
