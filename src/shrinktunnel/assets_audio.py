"""silero-vad's 16 kHz voice activity detector as a plain PyTorch module.

The package ships its weights as safetensors together with a tinygrad model definition; this is the
same network written in PyTorch (STFT as a fixed Conv1d, four Conv1d + ReLU, an LSTMCell, a 1x1 conv
head), so that every method can work on it. One call scores one chunk of 512 samples preceded by 64
samples of context: input (N, 576), output the speech probability (N, 1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .core.history import set_model_ref
from .errors import ModelError

__all__ = ["SileroVAD16k", "silero_vad_16k", "CHUNK", "CONTEXT"]

CHUNK, CONTEXT = 512, 64  # samples per call at 16 kHz, and the context carried over from the last call


class SileroVAD16k(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_fft, self.hop, self.pad = 256, 128, 64
        self.cutoff = self.n_fft // 2 + 1
        # Real and imaginary STFT bases stacked: 2 * 129 output channels.
        self.stft_conv = nn.Conv1d(1, 2 * self.cutoff, kernel_size=self.n_fft, stride=self.hop, bias=False)
        self.conv1 = nn.Conv1d(129, 128, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, kernel_size=3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, kernel_size=3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, kernel_size=3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        # x: (N, 576) samples; state: (2, N, 128) LSTM (h, c) or None for a fresh stream.
        x = F.pad(x, (0, self.pad), mode="reflect").unsqueeze(1)  # (N, 1, 640)
        x = self.stft_conv(x)  # (N, 258, 4)
        x = torch.sqrt(x[:, : self.cutoff] ** 2 + x[:, self.cutoff :] ** 2)  # magnitude (N, 129, 4)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x)).squeeze(-1)  # (N, 128)
        h, c = self.lstm_cell(x, None if state is None else (state[0], state[1]))
        x = F.relu(h.unsqueeze(-1))
        return torch.sigmoid(self.final_conv(x)).squeeze(1).mean(dim=1, keepdim=True)  # (N, 1)


def silero_vad_16k() -> nn.Module:
    """The pretrained silero-vad 16 kHz detector (309k parameters) from the `silero-vad` package."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("package 'silero_vad' is not installed; install it with: pip install silero-vad==6.2.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad_16k.safetensors"
    model = SileroVAD16k()
    model.load_state_dict(load_file(str(path)))
    return set_model_ref(model.eval(), "shrinktunnel.assets:silero_vad_16k")
