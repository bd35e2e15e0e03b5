"""Tiny Hugging Face models of every zoo architecture, random weights, built offline in milliseconds.

`ZOO[name]() -> (model, example_inputs)`: the model in eval mode, wrapped so that it returns one
tensor (its main output), and one batch in the data convention (a dict of tensors for text and
speech models, a tensor for vision models). Sequence lengths and image sizes are small but not
powers of two where it matters, so shapes are not accidentally equal.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

TEXT = ("bert", "distilbert", "roberta", "mpnet", "electra", "gpt2", "llama", "qwen2", "t5")
SPEECH = ("whisper", "wav2vec2")
VISION = ("vit", "swin", "convnext", "resnet", "regnet", "efficientnet", "mobilenetv2", "mobilevit")
ENCODERS = ("bert", "distilbert", "roberta", "mpnet", "electra", "vit", "t5")  # attention fusion applies
VOCAB = 99
SEQ = 12  # tokens of the example batch
MAX_POSITIONS = 64


class Main(nn.Module):
    """The model's first output (last_hidden_state or logits) as a plain tensor; the inputs by name."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, input_features=None, input_values=None):
        given = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                 "input_features": input_features, "input_values": input_values}
        out = self.model(**{k: v for k, v in given.items() if v is not None})
        if isinstance(out, dict):  # ModelOutput (an OrderedDict): its first field set
            return next(iter(out.values()))
        return out[0] if isinstance(out, (tuple, list)) else out


def _text_batch(batch=2, seq=SEQ, mask=True, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    out = {"input_ids": ids}
    if mask:
        m = torch.ones(batch, seq, dtype=torch.long)
        m[-1, max(1, seq - 3):] = 0  # one padded row (its first token kept: a row with no token has no softmax)
        out["attention_mask"] = m
    return out


def _image(batch=2, size=32, channels=3, seed=1):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _build(cls, config, reinit=False):
    torch.manual_seed(0)
    model = cls(config).eval()
    if reinit:  # Hugging Face's std=0.02 init shrinks a deep CNN's output to ~1e-30
        for m in model.modules():
            if isinstance(m, nn.Conv2d):  # He init keeps the activations' scale through ReLU stacks
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):  # running statistics 0 / 1, affine 1 / 0
                m.reset_parameters()
    return Main(model).eval()


def bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=MAX_POSITIONS)
    return _build(BertModel, cfg), _text_batch()


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
                           max_position_embeddings=MAX_POSITIONS)
    return _build(DistilBertModel, cfg), _text_batch()


def roberta():
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=MAX_POSITIONS + 2, pad_token_id=1)
    return _build(RobertaModel, cfg), _text_batch()


def mpnet():
    from transformers import MPNetConfig, MPNetModel

    cfg = MPNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=48, max_position_embeddings=MAX_POSITIONS + 2, relative_attention_num_buckets=32)
    return _build(MPNetModel, cfg), _text_batch()


def electra():
    from transformers import ElectraConfig, ElectraModel

    cfg = ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=MAX_POSITIONS)
    return _build(ElectraModel, cfg), _text_batch()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, use_cache=False)
    return _build(GPT2LMHeadModel, cfg), _text_batch()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=True, use_cache=False)
    return _build(LlamaForCausalLM, cfg), _text_batch()


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                      use_cache=False)
    return _build(Qwen2ForCausalLM, cfg), _text_batch()


def t5():
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20)
    return _build(T5EncoderModel, cfg), _text_batch()


def whisper():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4,
                        encoder_ffn_dim=48, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=48,
                        max_source_positions=20)
    features = torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(1))  # 2 x max_source_positions frames
    return _build(WhisperEncoder, cfg), {"input_features": features}


def wav2vec2():
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                         conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer",
                         mask_time_prob=0.0)
    audio = torch.randn(2, 400, generator=torch.Generator().manual_seed(1))
    return _build(Wav2Vec2Model, cfg), {"input_values": audio}


def vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                    image_size=32, patch_size=8)
    return _build(ViTModel, cfg), _image()


def swin():
    from transformers import SwinConfig, SwinModel

    cfg = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4)
    return _build(SwinModel, cfg, reinit=True), _image()


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(num_channels=3, hidden_sizes=(8, 16), depths=(1, 1), num_stages=2)
    return _build(ConvNextModel, cfg, reinit=True), _image()


def resnet():
    from transformers import ResNetConfig, ResNetModel

    cfg = ResNetConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), layer_type="bottleneck")
    return _build(ResNetModel, cfg, reinit=True), _image()


def regnet():
    from transformers import RegNetConfig, RegNetModel

    cfg = RegNetConfig(embedding_size=8, hidden_sizes=(8, 16), depths=(1, 1), groups_width=4)
    return _build(RegNetModel, cfg, reinit=True), _image()


def efficientnet():
    from transformers import EfficientNetConfig, EfficientNetModel

    cfg = EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                             num_hidden_layers=4)
    return _build(EfficientNetModel, cfg, reinit=True), _image()


def mobilenetv2():
    from transformers import MobileNetV2Config, MobileNetV2Model

    cfg = MobileNetV2Config(image_size=32, depth_multiplier=0.25, finegrained_output=False)
    return _build(MobileNetV2Model, cfg, reinit=True), _image()


def mobilevit():
    from transformers import MobileViTConfig, MobileViTModel

    cfg = MobileViTConfig(image_size=32, hidden_sizes=(16, 24, 32), neck_hidden_sizes=(8, 8, 16, 16, 24, 32, 64),
                          num_attention_heads=2, patch_size=2)
    return _build(MobileViTModel, cfg, reinit=True), _image()


ZOO = {name: globals()[name] for name in TEXT + SPEECH + VISION}
