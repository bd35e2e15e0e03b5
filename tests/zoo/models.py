"""The model zoo of the conformance matrix: real architectures built offline, tiny, from fixed seeds.

Every entry builds a model with random weights in eval mode and a realistic example input for it:

- Hugging Face `transformers` architectures from SMALL configs (a few layers 16-64 wide): the module
  structure, layer kinds and forward code of the real models, in milliseconds;
- `timm` models with `pretrained=False` where timm imports (docs/dependencies.md says how it installs
  beside the CPU torch); their entries are absent when it does not;
- `same_pad_cnn`: a pretrained-style EfficientNet-like CNN whose convolutions are `Conv2d` subclasses
  that pad in their own forward (efficientnet_pytorch's `Conv2dStaticSamePadding` and timm's
  `Conv2dSame`, written here);
- the project's awkward nets of tests/conftest.py (`awkward_*`).

Used by tests/zoo/test_zoo.py (a fast subset) and benchmarks/coverage.py (the whole matrix):

    from zoo.models import ZOO, build, example_inputs
    model = build("bert"); x = example_inputs("bert")      # x: a tensor or a dict of tensors
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub: never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

__all__ = ["ZooModel", "ZOO", "build", "example_inputs", "calibration", "output_tensor", "timm_available",
           "Conv2dStaticSamePadding", "Conv2dSame", "SamePadCNN"]

VOCAB = 96  # token ids in [4, VOCAB); 0 is padding
SEQ = 16  # tokens per example


@dataclass(frozen=True)
class ZooModel:
    name: str
    family: str  # "text", "decoder", "audio", "vision", "cnn", "awkward"
    source: str  # "transformers", "timm", "hand-written", "tests/conftest.py"
    make: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], Any]  # (batch, generator) -> tensor or dict of tensors
    note: str = ""


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------
def _tokens(batch: int, g: torch.Generator, *, token_types: bool = False, seq: int = SEQ) -> dict[str, torch.Tensor]:
    """Token ids with right padding: row i keeps seq - 3 * (i % 3) tokens, as a padded tokenizer batch."""
    ids = torch.randint(4, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for i in range(batch):
        kept = seq - 3 * (i % 3)
        ids[i, kept:] = 0
        mask[i, kept:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if token_types:
        out["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
    return out


def _image(size: int = 32, channels: int = 3) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    # Normalised images as an image processor gives them (mean 0, std 1 per channel).
    return lambda batch, g: {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


def _image_tensor(size: int = 32) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda batch, g: torch.randn(batch, 3, size, size, generator=g)


def _waveform(batch: int, g: torch.Generator, samples: int = 1600) -> dict[str, torch.Tensor]:
    # 0.1 s at 16 kHz: a few sines plus noise, normalised to zero mean and unit variance as Wav2Vec2's
    # feature extractor does.
    t = torch.arange(samples) / 16000.0
    freq = torch.randint(100, 2000, (batch, 3), generator=g).float()
    wave = torch.sin(2 * math.pi * freq[:, :, None] * t).sum(1) + 0.1 * torch.randn(batch, samples, generator=g)
    wave = (wave - wave.mean(1, keepdim=True)) / wave.std(1, keepdim=True)
    return {"input_values": wave}


def _mel(batch: int, g: torch.Generator, bins: int = 16, frames: int = 64) -> dict[str, torch.Tensor]:
    # Log-mel features as Whisper's feature extractor gives them: values in about [-1, 1].
    return {"input_features": (torch.rand(batch, bins, frames, generator=g) * 2 - 1)}


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers, tiny configs
# --------------------------------------------------------------------------------------------------
_ENC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def _hf(cls_name: str, config_name: str, **config: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        cfg = getattr(transformers, config_name)(**config)
        return getattr(transformers, cls_name)(cfg)

    return make


def _whisper_encoder() -> nn.Module:
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=16, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        decoder_layers=1, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=32, max_target_positions=32,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    return WhisperEncoder(cfg)


HF_MODELS: list[ZooModel] = [
    ZooModel("bert", "text", "transformers", _hf("BertModel", "BertConfig", **_ENC),
             lambda b, g: _tokens(b, g, token_types=True)),
    ZooModel("distilbert", "text", "transformers",
             _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                 hidden_dim=64, max_position_embeddings=64), _tokens),
    ZooModel("roberta", "text", "transformers",
             _hf("RobertaModel", "RobertaConfig", **{**_ENC, "max_position_embeddings": 66}, pad_token_id=1), _tokens),
    ZooModel("mpnet", "text", "transformers",
             _hf("MPNetModel", "MPNetConfig", **{**_ENC, "max_position_embeddings": 66}, pad_token_id=1), _tokens,
             "relative position bias (32 buckets: the model's code fixes the count)"),
    ZooModel("electra", "text", "transformers",
             _hf("ElectraModel", "ElectraConfig", **_ENC, embedding_size=16), _tokens,
             "embeddings 16 wide, projected to 32"),
    ZooModel("gpt2", "decoder", "transformers",
             _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 bos_token_id=1, eos_token_id=2, use_cache=False), _tokens, "Conv1D layers (transposed weights), lm_head tied to wte"),
    ZooModel("llama", "decoder", "transformers",
             _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=True, use_cache=False), _tokens,
             "grouped-query attention (4 query heads, 2 kv heads), lm_head tied to embed_tokens"),
    ZooModel("qwen2", "decoder", "transformers",
             _hf("Qwen2ForCausalLM", "Qwen2Config", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 tie_word_embeddings=False, use_cache=False), _tokens, "q/k/v with bias, GQA"),
    ZooModel("t5_encoder", "text", "transformers",
             _hf("T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                 num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu"), _tokens,
             "relative position bias, gated FFN, no biases"),
    ZooModel("whisper_encoder", "audio", "transformers", _whisper_encoder, _mel, "two Conv1d, then a transformer"),
    ZooModel("wav2vec2", "audio", "transformers",
             _hf("Wav2Vec2Model", "Wav2Vec2Config", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="group",
                 mask_time_prob=0.0), _waveform,
             "Conv1d feature encoder with GroupNorm, weight-normed grouped positional conv"),
    ZooModel("vit", "vision", "transformers",
             _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                 num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10), _image(32)),
    ZooModel("swin", "vision", "transformers",
             _hf("SwinForImageClassification", "SwinConfig", image_size=32, patch_size=2, embed_dim=16,
                 depths=[1, 1], num_heads=[2, 4], window_size=4, num_labels=10), _image(32),
             "shifted windows, relative position bias table"),
    ZooModel("convnext", "vision", "transformers",
             _hf("ConvNextForImageClassification", "ConvNextConfig", num_stages=2, hidden_sizes=[16, 32], depths=[1, 1],
                 num_labels=10), _image(32), "depthwise 7x7, LayerNorm channels-last, layer scale"),
    ZooModel("resnet", "vision", "transformers",
             _hf("ResNetForImageClassification", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                 depths=[1, 1, 1, 1], layer_type="bottleneck", num_labels=10), _image(32)),
    ZooModel("regnet", "vision", "transformers",
             _hf("RegNetForImageClassification", "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                 depths=[1, 1], groups_width=8, num_labels=10), _image(32), "grouped 3x3 convs, squeeze-excite"),
    ZooModel("efficientnet", "vision", "transformers",
             _hf("EfficientNetForImageClassification", "EfficientNetConfig", image_size=32, width_coefficient=0.25,
                 depth_coefficient=0.25, hidden_dim=320, num_labels=10), _image(32),
             "EfficientNetDepthwiseConv2d (a Conv2d subclass), squeeze-excite"),
    ZooModel("mobilenet_v2", "vision", "transformers",
             _hf("MobileNetV2ForImageClassification", "MobileNetV2Config", depth_multiplier=0.35, image_size=32,
                 finegrained_output=False, num_labels=10), _image(32), "inverted residuals, ReLU6"),
    ZooModel("mobilevit", "vision", "transformers",
             _hf("MobileViTForImageClassification", "MobileViTConfig", image_size=32, patch_size=2,
                 hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 64], num_attention_heads=2,
                 num_labels=10), _image(32), "convs unfolded into patches for attention, then folded back"),
]


# --------------------------------------------------------------------------------------------------
# A pretrained-style CNN whose convolutions pad in their own forward
# --------------------------------------------------------------------------------------------------
def _same_pads(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding of one dimension: (before, after); the odd pixel goes after."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class Conv2dStaticSamePadding(nn.Conv2d):
    """efficientnet_pytorch's pattern: 'SAME' padding computed once for a fixed image size, applied by a
    ZeroPad2d submodule in this conv's own forward, then F.conv2d on the conv's own weight."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 image_size: int, groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        top, bottom = _same_pads(image_size, kernel_size, stride, 1)
        self.static_padding = nn.ZeroPad2d((top, bottom, top, bottom)) if top or bottom else nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dSame(nn.Conv2d):
    """timm's pattern: 'SAME' padding computed from the input's size at every call (F.pad), then the
    convolution with padding 0."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, *,
                 groups: int = 1, bias: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, 1, groups, bias)

    def forward(self, x):
        ih, iw = x.shape[-2:]
        ph = _same_pads(ih, self.kernel_size[0], self.stride[0], self.dilation[0])
        pw = _same_pads(iw, self.kernel_size[1], self.stride[1], self.dilation[1])
        x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class _MBConv(nn.Module):
    """EfficientNet's MBConv: 1x1 expand, depthwise kxk (Conv2dSame), squeeze-excite (two 1x1 convs
    with bias), 1x1 project; residual when the shape allows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, image_size: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(Conv2dStaticSamePadding(cin, mid, 1, image_size=image_size),
                                    nn.BatchNorm2d(mid), nn.SiLU()) if expand != 1 else nn.Identity()
        self.dw = Conv2dSame(mid, mid, kernel, stride, groups=mid)
        self.bn_dw = nn.BatchNorm2d(mid)
        squeeze = max(1, cin // 4)
        self.se_reduce = Conv2dStaticSamePadding(mid, squeeze, 1, image_size=1, bias=True)
        self.se_expand = Conv2dStaticSamePadding(squeeze, mid, 1, image_size=1, bias=True)
        self.project = Conv2dStaticSamePadding(mid, cout, 1, image_size=image_size // stride)
        self.bn_project = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.expand(x)
        h = F.silu(self.bn_dw(self.dw(h)))
        s = F.adaptive_avg_pool2d(h, 1)
        h = h * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(s))))
        h = self.bn_project(self.project(h))
        return x + h if self.residual else h


class SamePadCNN(nn.Module):
    """A small EfficientNet-B0-shaped classifier (stem, 4 MBConv blocks, head, Linear) in which every
    convolution is a Conv2d subclass that pads in its own forward, as pretrained ImageNet CNNs ported
    from TensorFlow are. BatchNorm statistics are set away from identity, as a trained net's are."""

    def __init__(self, image_size: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        s = image_size
        self.stem = Conv2dStaticSamePadding(3, 16, 3, 2, image_size=s)
        self.bn_stem = nn.BatchNorm2d(16)
        self.blocks = nn.Sequential(
            _MBConv(16, 16, 3, 1, 1, s // 2),
            _MBConv(16, 24, 3, 2, 4, s // 2),
            _MBConv(24, 24, 5, 1, 4, s // 4),
            _MBConv(24, 40, 5, 2, 4, s // 4),
        )
        self.head = Conv2dStaticSamePadding(40, 64, 1, image_size=s // 8)
        self.bn_head = nn.BatchNorm2d(64)
        self.classifier = nn.Linear(64, num_classes)
        with torch.no_grad():  # trained-looking BatchNorms: folding them is then not an identity
            for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.silu(self.bn_stem(self.stem(x)))
        x = self.blocks(x)
        x = F.silu(self.bn_head(self.head(x)))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TorchTransformer(nn.Module):
    """torch's own nn.TransformerEncoder (nn.MultiheadAttention inside: a fused in_proj_weight, out_proj
    read by the fused op) over token embeddings, with a padding mask, then a Linear head."""

    def __init__(self, vocab: int = VOCAB, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, 3)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(h[:, 0])


HAND_MODELS: list[ZooModel] = [
    ZooModel("same_pad_cnn", "cnn", "hand-written", SamePadCNN, _image_tensor(32),
             "every conv a Conv2d subclass padding in its forward (Conv2dStaticSamePadding, Conv2dSame)"),
    ZooModel("torch_transformer", "text", "hand-written", TorchTransformer, _tokens,
             "torch's nn.TransformerEncoder: nn.MultiheadAttention with a padding mask"),
]


# --------------------------------------------------------------------------------------------------
# timm (optional)
# --------------------------------------------------------------------------------------------------
# scripts/install.sh puts timm where only the zoo looks (docs/dependencies.md says why): it needs
# torchvision, and the only torchvision that imports beside torch 2.13 here (0.16.2) would otherwise be
# imported by every `import transformers` in the project, with a warning about its image extension.
TIMM_EXTRA = TESTS.parent / ".venv" / "timm-extra"


def _timm_path() -> None:
    if TIMM_EXTRA.is_dir() and str(TIMM_EXTRA) not in sys.path:
        sys.path.append(str(TIMM_EXTRA))  # appended: it never shadows a package of the environment


def timm_available() -> bool:
    """Whether timm can be imported (from the environment, or from TIMM_EXTRA); decided without
    importing it, so that listing the zoo never puts torchvision into the process."""
    import importlib.util

    return importlib.util.find_spec("timm") is not None or (TIMM_EXTRA / "timm" / "__init__.py").is_file()


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        _timm_path()
        with warnings.catch_warnings():
            # torchvision 0.16's compiled ops and image extension do not load beside torch 2.13; timm's
            # model definitions use neither
            warnings.simplefilter("ignore")
            import timm

        return timm.create_model(name, pretrained=False, **kwargs)

    return make


# Three timm models, each for what the Hugging Face zoo lacks (a timm ResNet or ConvNeXt would repeat HF's).
TIMM_MODELS: list[ZooModel] = [
    ZooModel("timm_tf_mobilenetv3", "cnn", "timm",
             _timm("tf_mobilenetv3_small_minimal_100", num_classes=10), _image_tensor(64),
             "TensorFlow-ported: Conv2dSame (pads in its forward), hard-swish"),
    ZooModel("timm_efficientnet_b0", "cnn", "timm", _timm("efficientnet_b0", num_classes=10), _image_tensor(64),
             "BatchNormAct2d (BatchNorm + activation in one module), squeeze-excite"),
    ZooModel("timm_vit_tiny", "vision", "timm",
             _timm("vit_tiny_patch16_224", img_size=64, num_classes=10), _image_tensor(64),
             "fused qkv Linear, timm's Attention (F.scaled_dot_product_attention)"),
]


# --------------------------------------------------------------------------------------------------
# The project's awkward nets (tests/conftest.py)
# --------------------------------------------------------------------------------------------------
def _awkward() -> list[ZooModel]:
    from conftest import CASES

    return [ZooModel(f"awkward_{c.name}", "awkward", "tests/conftest.py", c.cls,
                     (lambda case: lambda b, g: case.make_inputs(b, g))(c), (c.cls.__doc__ or "").split(":")[0])
            for c in CASES.values()]


def _zoo() -> dict[str, ZooModel]:
    entries = HF_MODELS + HAND_MODELS + (TIMM_MODELS if timm_available() else []) + _awkward()
    return {z.name: z for z in entries}


ZOO: dict[str, ZooModel] = _zoo()


def build(name: str, seed: int = 0) -> nn.Module:
    """The zoo model `name` with the weights seed `seed` gives, in eval mode."""
    entry = ZOO[name]
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        model = entry.make()
    return model.eval()


def example_inputs(name: str, batch: int = 4, seed: int = 1) -> Any:
    """One realistic batch for the zoo model `name` (a tensor, or a dict of tensors as HF models take)."""
    return ZOO[name].inputs(batch, torch.Generator().manual_seed(seed))


def calibration(name: str, batches: int = 4, batch: int = 4, seed: int = 2) -> list[Any]:
    """A few batches to calibrate / score with, drawn apart from `example_inputs`."""
    g = torch.Generator().manual_seed(seed)
    return [ZOO[name].inputs(batch, g) for _ in range(batches)]


def output_tensor(output: Any) -> torch.Tensor:
    """The tensor that stands for a model's output: itself, `logits` / `last_hidden_state`, or the first."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next(o for o in output if isinstance(o, torch.Tensor))
    raise TypeError(f"no tensor in the output ({type(output).__name__})")


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Forward `inputs` (tensor or dict) without gradients; the output tensor."""
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return output_tensor(out)
