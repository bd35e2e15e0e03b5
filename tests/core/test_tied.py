"""Tied embeddings (core/tied.py): an Embedding and a Linear sharing one weight are transformed ONCE by
quantize, prune and cluster, stay tied (the Embedding reads the Linear's compressed layer), round-trip
bit-exactly through the artifact with the table stored once, and export to ONNX Runtime."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shrinktunnel as st
from shrinktunnel.core.artifact import read_manifest
from shrinktunnel.core.coverage import stage_coverage
from shrinktunnel.core.tied import TiedEmbedding, tie_groups, tie_plan, tied_pairs

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, DIM = 300, 32


class TiedNet(nn.Module):
    """Embedding (padding_idx 0) -> mean -> Linear -> output head tied to the embedding."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.emb(ids))))


def _tied_net(tied: bool = True) -> TiedNet:
    torch.manual_seed(0)
    return TiedNet(tied).eval()


def _ids(seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, VOCAB, (4, 7))


# method -> (run, tolerance of ORT against PyTorch). Weight-only int8 layers run in ONNX Runtime's own
# kernels (a few 1e-3 off on these logits, as for untied models); the others compute in float.
METHODS = {
    "quantize": (lambda m, data: st.quantize(m, {"activations": None}, progress=False), 2e-2),
    "quantize_int4_group": (lambda m, data: st.quantize(
        m, {"activations": None, "weights": {"bits": 4, "granularity": "per_group", "group_size": 16},
            "tied": "quantize"},  # below 8 bits a tied head stays float unless asked (tied: auto)
        progress=False), 1e-4),
    "quantize_w8a8": (lambda m, data: st.quantize(m, {}, data=data, progress=False), 5e-2),
    "prune": (lambda m, data: st.prune(m, {"sparsity": 0.5}, progress=False), 1e-4),
    "cluster": (lambda m, data: st.cluster(m, {"bits": 4}, progress=False), 1e-4),
    # QAT trains the head's fake-quantized weight; the Embedding looks up the same rows while training.
    "qat": (lambda m, data: st.qat(m, {"activations": None, "loss": "mse_to_float", "steps": 3, "lr": 1e-3},
                                   data=data, progress=False), 2e-2),
}


def _run(method: str, model: nn.Module, data) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return METHODS[method][0](model, data)


def _stored_keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return list(f.keys())


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    from shrinktunnel.export import OrtModel

    out = OrtModel(path)(x)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return torch.as_tensor(out.logits if hasattr(out, "logits") else out)


def test_tied_pairs_and_the_plan():
    net = _tied_net()
    assert tied_pairs(net) == {"emb": "head"}
    assert tied_pairs(_tied_net(tied=False)) == {} and tie_groups(_tied_net()) == [("head", ["emb"])]
    assert tie_plan(net, ["*"], []) == ({"head": ["emb"]}, {})
    assert tie_plan(net, ["head"], []) == ({"head": ["emb"]}, {})  # the Embedding goes with its Linear
    together, refused = tie_plan(net, ["*"], ["emb"])  # an explicit skip keeps both, with the reason
    assert together == {} and "emb" in refused["head"]
    together, refused = tie_plan(net, ["emb"], [])
    assert together == {} and "head" in refused["emb"]


@pytest.mark.parametrize("method", list(METHODS))
def test_tied_pair_transformed_once_round_trips_and_exports(method, tmp_path):
    model, ids = _tied_net(), _ids()
    out = _run(method, model, [ids])
    (cov,) = stage_coverage(out)
    assert cov.share >= 0.95 and not cov.skipped, cov
    assert isinstance(out.emb, TiedEmbedding) and out.emb.layer is out.head  # one layer, two names
    assert out.emb.padding_idx == 0 and out.emb.num_embeddings == VOCAB and out.emb.embedding_dim == DIM
    # The lookup reads exactly the rows of the weight the head computes with.
    with torch.no_grad():
        assert torch.equal(out.emb(ids), out.emb.weight[ids])
        got = out(ids)
        ref = model(ids)
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.9, float(cos)

    path = st.save(out, tmp_path / "tied")
    keys = _stored_keys(path)
    assert not (any(k.startswith("emb.") for k in keys) and any(k.startswith("head.") for k in keys)), keys
    loaded = st.load(path, model=_tied_net())
    assert isinstance(loaded.emb, TiedEmbedding) and loaded.emb.layer is loaded.head
    with torch.no_grad():
        assert torch.equal(loaded(ids), got)

    # The same net with an untied copy of the table stores it twice: more bytes, by about a stored table.
    untied = _tied_net(tied=False)
    untied.load_state_dict(model.state_dict())
    twice = st.save(_run(method, untied, [ids]), tmp_path / "untied")
    tied_bytes, twice_bytes = (read_manifest(p)["tensors"]["bytes"] for p in (path, twice))
    table = sum(t.numel() * t.element_size() for t in out.head.state_dict().values())
    assert twice_bytes - tied_bytes >= 0.8 * table, (tied_bytes, twice_bytes, table)

    onnx = st.export_onnx(loaded, tmp_path / "m.onnx", example_inputs=ids)
    assert (_ort(onnx, ids) - got).abs().max() <= METHODS[method][1]


def test_a_tie_the_stage_leaves_half_of_stays_float_and_tied():
    model = _tied_net()
    for run in (lambda m: st.quantize(m, {"activations": None, "skip": ["emb"]}, progress=False),
                lambda m: st.prune(m, {"sparsity": 0.5, "skip": ["emb"]}, progress=False),
                lambda m: st.cluster(m, {"bits": 4, "skip": ["emb"]}, progress=False),
                lambda m: st.prune(m, {"sparsity": 0.5, "layers": ["emb"]}, progress=False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run(model)
        assert type(out.emb) is nn.Embedding and type(out.head) is nn.Linear
        assert out.head.weight is out.emb.weight  # still one table
        (cov,) = stage_coverage(out)
        assert any("tie holds" in why for why in cov.skipped.values()), cov.skipped


def test_layers_naming_only_the_head_takes_its_embedding_along(tmp_path):
    model, ids = _tied_net(), _ids()
    out = st.quantize(model, {"activations": None, "layers": ["head"]}, progress=False)
    assert isinstance(out.emb, TiedEmbedding) and out.emb.layer is out.head
    assert type(out.mix) is nn.Linear  # not selected
    loaded = st.load(st.save(out, tmp_path / "q"), model=_tied_net())
    with torch.no_grad():
        assert torch.equal(loaded(ids), out(ids))


def test_prune_then_cluster_keeps_the_tie(tmp_path):
    model, ids = _tied_net(), _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = st.cluster(st.prune(model, {"sparsity": 0.6}, progress=False), {"bits": 4}, progress=False)
    assert isinstance(out.emb, TiedEmbedding) and out.emb.layer is out.head
    assert type(out.head).__name__ == "ClusteredLayer" and out.head.sparse
    with torch.no_grad():
        got = out(ids)
        assert int((out.emb.weight == 0).sum()) >= 0.6 * VOCAB * DIM - 1  # the zeros stayed zeros
    loaded = st.load(st.save(out, tmp_path / "pc"), model=_tied_net())
    assert loaded.emb.layer is loaded.head
    with torch.no_grad():
        assert torch.equal(loaded(ids), got)


# -- a tiny GPT-2 (lm_head tied to transformer.wte) -------------------------------------------------
def _gpt2(tied: bool = True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=500, n_positions=64,
                                  use_cache=False, tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("method", ["quantize", "prune", "cluster", "qat"])
def test_gpt2_tied_coverage_round_trip_and_onnx(method, tmp_path):
    model = _gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.manual_seed(2)
    ids = torch.randint(0, 500, (2, 16))
    out = _run(method, model, [ids])
    (cov,) = stage_coverage(out)
    assert cov.share >= 0.95, cov  # 100 %: before, 80.8 % (quantize), 59 % (prune), 61.5 % (cluster)
    assert isinstance(out.transformer.wte, TiedEmbedding) and out.transformer.wte.layer is out.lm_head
    with torch.no_grad():
        got = out(ids).logits
    path = st.save(out, tmp_path / method)
    keys = _stored_keys(path)
    assert not (any(k.startswith("transformer.wte.") for k in keys) and any(k.startswith("lm_head.") for k in keys))
    loaded = st.load(path, model=_gpt2())
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, got)
    onnx = st.export_onnx(loaded, tmp_path / "m.onnx", example_inputs=ids)
    assert (_ort(onnx, ids) - got).abs().max() <= METHODS[method][1]


class SharedTable(nn.Module):
    """Two Embeddings sharing one table and no Linear (T5's `shared` and `encoder.embed_tokens`)."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Embedding(VOCAB, DIM)
        self.tokens = nn.Embedding(VOCAB, DIM, padding_idx=0)
        self.tokens.weight = self.shared.weight
        self.out = nn.Linear(DIM, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.tokens(ids).mean(1))


def _shared_table() -> SharedTable:
    torch.manual_seed(0)
    return SharedTable().eval()


@pytest.mark.parametrize("method", ["quantize", "prune", "cluster"])
def test_embeddings_sharing_a_table_become_one_layer_under_both_names(method, tmp_path):
    model, ids = _shared_table(), _ids()
    out = _run(method, model, [ids])
    (cov,) = stage_coverage(out)
    assert cov.share == 1.0, cov
    assert out.tokens is out.shared and type(out.tokens) is not nn.Embedding
    path = st.save(out, tmp_path / "s")
    keys = _stored_keys(path)
    assert not (any(k.startswith("shared.") for k in keys) and any(k.startswith("tokens.") for k in keys)), keys
    loaded = st.load(path, model=_shared_table())
    assert loaded.tokens is loaded.shared
    with torch.no_grad():
        assert torch.equal(loaded(ids), out(ids))
    # a skip naming one of them keeps both float and tied, with the reason
    kept = st.quantize(model, {"activations": None, "skip": ["shared"]}, progress=False)
    assert type(kept.tokens) is nn.Embedding and kept.tokens.weight is kept.shared.weight
    assert "tie holds" in stage_coverage(kept)[0].skipped["tokens"]


@pytest.mark.parametrize("entry", [{"layer": "mix", "padding_idx": 0}, {"layer": "nowhere"}, {"layer": "head", "padding_idx": "x"},
                                   {"padding_idx": 0}, "head"])
def test_an_edited_tied_entry_is_an_artifact_error(entry, tmp_path):
    import json

    from shrinktunnel.errors import ArtifactError

    model = _tied_net()
    path = st.save(st.quantize(model, {"activations": None}, progress=False), tmp_path / "q")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["stages"][0]["replay"]["tied"]["emb"] = entry
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError):
        st.load(path, model=_tied_net())
