"""MiniLM relation distillation, scale-free hint losses and training without dropout: the formulas
against a Hugging Face BERT's own attention, and the options at work in the trainer."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shrinktunnel.distillation import DistillConfig, Hint, Relation, distill_train
from shrinktunnel.distillation.config import HintLoss
from shrinktunnel.distillation.losses import feature_loss
from shrinktunnel.distillation.relations import relation_logits, relation_loss
from shrinktunnel.errors import ConfigError, ModelError

transformers = pytest.importorskip("transformers")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def bert(layers: int, seed: int = 0, dropout: float = 0.0) -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=16, initializer_range=0.3,
                                  hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                  attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.BertModel(cfg).eval()


def token_batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 50, (6, 10), generator=g)
        mask = (torch.arange(10) < torch.randint(3, 11, (6, 1), generator=g)).long()
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def projections(model, layer, batch):
    got = {}
    attn = model.encoder.layer[layer].attention.self
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in ("query", "key", "value")]
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    for h in hooks:
        h.remove()
    return (got["query"], got["key"], got["value"]), out.attentions[layer]


def test_qk_relation_is_the_models_own_attention_distribution():
    model, batch = bert(2), token_batches(1)[0]
    qkv, attentions = projections(model, 1, batch)
    mine = relation_logits(qkv, "qk", 4, batch["attention_mask"]).exp()
    real = batch["attention_mask"].bool()[:, None, :, None] & torch.ones_like(mine, dtype=torch.bool)
    torch.testing.assert_close(mine, attentions, atol=1e-6, rtol=1e-5)
    assert bool((mine.masked_select(~batch["attention_mask"].bool()[:, None, None, :].expand_as(mine)) == 0).all())
    assert real.any()


def test_relation_loss_is_a_kl_over_real_queries_zero_on_itself():
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    t_qkv = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(3))
    s_qkv = tuple(torch.randn(2, 4, 8, generator=g) for _ in range(3))
    t, s = relation_logits(t_qkv, "vv", 2, mask), relation_logits(s_qkv, "vv", 2, mask)
    assert float(relation_loss(t, t, mask)) == 0.0
    manual = []
    for b in range(2):
        n = int(mask[b].sum())
        for h in range(2):
            for q in range(n):
                p, r = t[b, h, q, :n].exp(), s[b, h, q, :n].exp()
                manual.append((p * (p.log() - r.log())).sum())
    torch.testing.assert_close(relation_loss(s, t, mask), torch.stack(manual).mean(), atol=1e-6, rtol=1e-5)
    # what the padding holds changes nothing
    noisy = tuple(x + 100 * (1 - mask)[..., None] * torch.randn(2, 4, 8, generator=g) for x in s_qkv)
    assert torch.equal(relation_loss(relation_logits(noisy, "vv", 2, mask), t, mask), relation_loss(s, t, mask))


def test_scale_free_hint_losses():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1] * 5])
    mse = feature_loss(s, t, mask, HintLoss.MSE)
    scale = (t.pow(2) * mask[..., None]).sum() / (mask.sum() * 8)
    torch.testing.assert_close(feature_loss(s, t, mask, HintLoss.SCALED_MSE), mse / scale)
    # exactly invariant to the features' scale (a power of two)
    assert torch.equal(feature_loss(8 * s, 8 * t, mask, "scaled_mse"), feature_loss(s, t, mask, "scaled_mse"))
    cos = 1 - F.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(feature_loss(s, t, mask, HintLoss.COSINE), cos[mask.bool()].mean())
    maps_s, maps_t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(feature_loss(maps_s, maps_t, None, "cosine"),
                               (1 - F.cosine_similarity(maps_s, maps_t, dim=1)).mean())


def attention_gap(student, teacher, pairs, data):
    gaps = []
    for b in data:
        for s_layer, t_layer in pairs:
            _, sa = projections(student, s_layer, b)
            _, ta = projections(teacher, t_layer, b)
            gaps.append((sa - ta).abs().mean())
    return float(torch.stack(gaps).mean())


def test_relations_alone_teach_the_students_attention():
    teacher, data = bert(4), token_batches()
    import shrinktunnel as st

    student = st.compress(teacher, [{"keep_layers": {"keep": "alternate"}}], progress=False).model
    pairs = [(0, 1), (1, 3)]
    rel = [Relation(student=f"encoder.layer.{s}.attention.self", teacher=f"encoder.layer.{t}.attention.self",
                    kinds=["qk", "vv"], heads=4) for s, t in pairs]
    before = attention_gap(student, teacher, pairs, data)
    log = distill_train(student, teacher, data, DistillConfig(loss="none", relations=rel, steps=40, lr=3e-3), progress=False)
    after = attention_gap(student, teacher, pairs, data)
    assert log.losses[-1] < 0.5 * log.losses[0] and after < 0.6 * before, (log.losses[0], log.losses[-1], before, after)
    assert not teacher.encoder.layer[1].attention.self.query._forward_hooks  # hooks removed


def test_relation_errors_name_the_module_and_leave_no_hook():
    teacher, data = bert(2), token_batches(1)
    student = bert(2, seed=1)
    bad = Relation(student="encoder.layer.0.attention", teacher="encoder.layer.0.attention.self", heads=4)
    with pytest.raises(ConfigError, match="query / key / value"):
        distill_train(student, teacher, data, DistillConfig(loss="none", relations=[bad], steps=1), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        distill_train(student, teacher, data, DistillConfig(
            loss="none", relations=[bad.model_copy(update={"student": "encoder.layer.9.attention.self"})], steps=1), progress=False)
    three = Relation(student="encoder.layer.0.attention.self", teacher="encoder.layer.0.attention.self", heads=3)
    with pytest.raises(ModelError, match="3 heads"):
        distill_train(student, teacher, data, DistillConfig(loss="none", relations=[three], steps=1), progress=False)
    with pytest.raises(ConfigError):
        distill_train(student, teacher, data, DistillConfig(
            loss="cosine", hints=[Hint(student="encoder.layer.0", teacher="encoder.nope")], steps=1), progress=False)
    assert all(not m._forward_hooks for m in list(teacher.modules()) + list(student.modules()))
    with pytest.raises(ValueError, match="not known"):
        Relation(student="a", teacher="b", kinds=["qv"])


def test_dropout_false_trains_the_function_that_is_evaluated():
    teacher, data = bert(2), token_batches(2)
    student = bert(2, seed=1, dropout=0.5)
    from shrinktunnel.distillation.losses import embedding_loss, pool
    from shrinktunnel.distillation.config import OutputLoss, Pooling

    def eval_loss(m):
        b = data[0]
        with torch.no_grad():
            s = pool(m(**b).last_hidden_state, b["attention_mask"], Pooling.MEAN, OutputLoss.COSINE)
            t = pool(teacher(**b).last_hidden_state, b["attention_mask"], Pooling.MEAN, OutputLoss.COSINE)
        return float(embedding_loss(s, t, OutputLoss.COSINE))

    expected = eval_loss(student)
    losses = {}
    for dropout in (False, True):
        s = bert(2, seed=1, dropout=0.5)
        log = distill_train(s, teacher, data, DistillConfig(loss="cosine", steps=1, lr=1e-9, dropout=dropout), progress=False)
        losses[dropout] = log.losses[0]
    assert losses[False] == pytest.approx(expected, rel=1e-6, abs=0)
    assert abs(losses[True] - expected) > 1e-3  # with dropout at 0.5 the training loss is another function's


def test_the_new_options_work_as_a_recipe_stage_and_the_manifest_keeps_the_evaluations():
    import shrinktunnel as st

    teacher, data = bert(4), token_batches()
    recipe = [{"keep_layers": {"keep": "alternate"}},
              {"distill": {"loss": "none", "steps": 6, "lr": 3e-3, "dropout": False, "eval_every": 3, "restore_best": False,
                           "relations": [{"student": "encoder.layer.1.attention.self",
                                          "teacher": "encoder.layer.3.attention.self", "heads": 4}],
                           "hints": [{"student": "encoder.layer.1", "teacher": "encoder.layer.3", "loss": "cosine"}]}}]
    calls = []
    result = st.compress(teacher, recipe, data=data, eval_fn=lambda m: calls.append(1) or float(len(calls)), progress=False)
    log = result.manifest["stages"][-1]["replay"]["log"]
    assert log["steps"] == 6 and [e[0] for e in log["evals"]] == [0, 3, 6]
    assert len(result.model.encoder.layer) == 2
