"""The distillation trainer and st.distill: it learns from the teacher, evaluates, stops early,
resumes an interrupted run bit for bit, and rejects bad input with typed errors."""

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import shrinktunnel as st
from shrinktunnel.distillation import DistillConfig, Hint, distill_train
from shrinktunnel.errors import ConfigError, ModelError

from conftest import snapshot, state_dicts_equal


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def mlp(hidden: int, seed: int, out: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, out)).eval()


def batches(n=12, b=32, seed=7, labels=False, teacher=None):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(b, 6, generator=g) for _ in range(n)]
    if labels:
        with torch.no_grad():
            return [(x, teacher(x).argmax(1)) for x in xs]
    return xs


def agreement(a: nn.Module, b: nn.Module, data) -> float:
    with torch.no_grad():
        return float(torch.cat([(a(x).argmax(1) == b(x).argmax(1)).float() for x in data]).mean())


def test_st_distill_teaches_the_student_and_changes_neither_model():
    teacher, student = mlp(64, 0), mlp(16, 1)
    t0, s0 = snapshot(teacher), snapshot(student)
    data, held_out = batches(), batches(seed=99)
    before = agreement(student, teacher, held_out)
    out = st.distill(student, teacher, data, st.DistillConfig(steps=200, lr=1e-2, temperature=2.0), progress=False)
    assert state_dicts_equal(teacher, t0) and state_dicts_equal(student, s0)
    assert out is not student
    after = agreement(out, teacher, held_out)
    assert before < 0.3 and after > 0.8, (before, after)


def test_hard_labels_are_used_when_present_and_their_absence_is_reported():
    teacher = mlp(32, 0)
    warned = []
    distill_train(mlp(8, 2), teacher, batches(n=2), DistillConfig(steps=3, alpha=0.5), progress=False, warn=warned.append)
    assert len(warned) == 1 and "no targets" in warned[0]
    warned.clear()
    distill_train(mlp(8, 2), teacher, batches(n=2, labels=True, teacher=teacher), DistillConfig(steps=3, alpha=0.5),
                  progress=False, warn=warned.append)
    assert warned == []


def test_fitnets_hint_with_adapter_trains_a_narrower_hidden_layer():
    teacher, student = mlp(24, 0), mlp(8, 1)
    data = batches()
    cfg = DistillConfig(loss="none", hints=[Hint(student="1", teacher="1")], steps=200, lr=1e-2)
    log = distill_train(student, teacher, data, cfg, progress=False)
    assert sum(log.losses[-10:]) < 0.3 * sum(log.losses[:10])
    assert len(list(student.parameters())) == 4  # the adapter trained beside it is not part of the student


def test_conv_hint_uses_a_1x1_adapter():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 3)).eval()
    student = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 3)).eval()
    data = [torch.randn(8, 1, 6, 6) for _ in range(4)]
    cfg = DistillConfig(hints=[Hint(student="0", teacher="0", weight=0.5)], steps=40, lr=5e-3)
    log = distill_train(student, teacher, data, cfg, progress=False)
    assert log.losses[-1] < log.losses[0]


def test_embedding_distillation_of_a_hugging_face_encoder_with_mask_mean_pooling():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16,
                                  initializer_range=0.3)  # large weights: each layer matters
    torch.manual_seed(0)
    teacher = transformers.BertModel(cfg).eval()
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(4):
        ids = torch.randint(1, 50, (8, 10), generator=g)
        mask = (torch.arange(10) < torch.randint(3, 11, (8, 1), generator=g)).long()
        data.append({"input_ids": ids, "attention_mask": mask})
    student = st.compress(teacher, [{"keep_layers": {"keep": "alternate"}}], progress=False).model
    assert len(student.encoder.layer) == 2 and student.config.num_hidden_layers == 2

    def fidelity(m):
        from shrinktunnel.distillation.losses import pool
        from shrinktunnel.distillation.config import OutputLoss, Pooling

        with torch.no_grad():
            cos = [torch.cosine_similarity(pool(m(**b).last_hidden_state, b["attention_mask"], Pooling.MEAN, OutputLoss.COSINE),
                                           pool(teacher(**b).last_hidden_state, b["attention_mask"], Pooling.MEAN, OutputLoss.COSINE)).mean()
                   for b in data]
        return float(torch.stack(cos).mean())

    out = st.distill(student, teacher, data, {"loss": "cosine", "steps": 30, "lr": 3e-3}, progress=False)
    assert fidelity(student) < 0.5 and fidelity(out) > 0.75, (fidelity(student), fidelity(out))


def test_early_stopping_restores_the_best_evaluation():
    teacher, student = mlp(32, 0), mlp(8, 1)
    s0 = snapshot(student)
    scores = iter([1.0, 0.5, 0.4, 0.3, 0.2, 0.1])  # step 0 is best: every later evaluation is worse
    cfg = DistillConfig(steps=100, lr=1e-2, eval_every=5, patience=2)
    log = distill_train(student, teacher, batches(), cfg, eval_fn=lambda m: next(scores), progress=False)
    assert log.stopped_early and log.steps == 10 and log.best_step == 0
    assert [s for s, _ in log.evals] == [0, 5, 10]
    assert state_dicts_equal(student, s0)  # restore_best: the student it received


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("schedule", [{}, {"schedule": "linear", "warmup": 0.2}], ids=["constant", "warmup-linear"])
def test_an_interrupted_run_resumes_from_its_checkpoint_bit_for_bit(tmp_path, schedule):
    teacher = mlp(32, 0)
    data = batches(n=5)
    cfg = dict(steps=23, lr=1e-2, eval_every=4, checkpoint_every=4, restore_best=False, **schedule)

    reference = mlp(8, 1)
    distill_train(reference, teacher, data, DistillConfig(**cfg), eval_fn=lambda m: 0.0, progress=False)

    calls = {"n": 0}

    def flaky(m):
        calls["n"] += 1
        if calls["n"] == 4:  # the evaluation at step 12: the run dies there
            raise Interrupt
        return 0.0

    ckpt = tmp_path / "ckpt"
    student = mlp(8, 1)
    with pytest.raises(Interrupt):
        distill_train(student, teacher, data, DistillConfig(**cfg, checkpoint=str(ckpt)), eval_fn=flaky, progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["best.safetensors", "optimizer.safetensors", "state.json", "student.safetensors"]

    resumed = mlp(8, 1)  # a fresh process would rebuild the student from scratch
    log = distill_train(resumed, teacher, data, DistillConfig(**cfg, checkpoint=str(ckpt)), eval_fn=lambda m: 0.0, progress=False)
    assert log.resumed_from == 8 and log.steps == 23 and len(log.losses) == 23
    assert state_dicts_equal(resumed, reference)

    again = mlp(8, 1)  # a finished checkpoint returns its result without training
    log = distill_train(again, teacher, data, DistillConfig(**cfg, checkpoint=str(ckpt)), progress=False)
    assert log.resumed_from == 23 and state_dicts_equal(again, reference)

    with pytest.raises(ConfigError, match="different run"):
        distill_train(mlp(8, 1), teacher, data, DistillConfig(**{**cfg, "lr": 0.5}, checkpoint=str(ckpt)), progress=False)


def test_the_schedule_sets_each_steps_learning_rate(monkeypatch):
    from shrinktunnel.distillation import trainer

    assert [trainer.lr_factor(i, 10, "linear", 0.2) for i in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    assert trainer.lr_factor(2, 10, "cosine", 0.2) == 1.0 and trainer.lr_factor(6, 10, "cosine", 0.2) == pytest.approx(0.5)
    assert [trainer.lr_factor(i, 4, "constant", 0.5) for i in range(4)] == [0.5, 1.0, 1.0, 1.0]
    seen = []  # the lr every optimiser step really used
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    distill_train(mlp(8, 1), mlp(32, 0), batches(n=3), DistillConfig(steps=10, lr=0.1, schedule="linear", warmup=0.2),
                  progress=False)
    assert seen == pytest.approx([0.1 * trainer.lr_factor(i, 10, "linear", 0.2) for i in range(10)])


def test_bad_input_is_a_typed_error():
    teacher = mlp(16, 0, out=12)
    with pytest.raises(ModelError, match="12 outputs"):
        st.distill(mlp(8, 1, out=10), teacher, batches(n=1), progress=False)
    for t in (0, -1.5):
        with pytest.raises(ConfigError, match="temperature must be positive"):
            st.DistillConfig(temperature=t)
    with pytest.raises(ConfigError, match="temperature must be positive"):
        st.compress(mlp(8, 1), [{"distill": {"temperature": 0}}], data=batches(n=1), progress=False)
    with pytest.raises(ConfigError, match="does not exist"):
        st.distill(mlp(8, 1), teacher, batches(n=1), {"loss": "none", "hints": [{"student": "9", "teacher": "1"}]}, progress=False)
    with pytest.raises(ConfigError, match="patience needs eval_every"):
        st.DistillConfig(patience=3)
    with pytest.raises(ConfigError, match="teacher is passed"):
        st.distill(mlp(8, 1), teacher, batches(n=1), {"teacher": "x.py:f"}, progress=False)


class Blocks(nn.Module):
    """A stack of 6 residual blocks: keep_layers' auto finds the ModuleList."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6))
        self.out = nn.Linear(16, 5)

    def forward(self, x):
        h = self.inp(x)
        for block in self.layers:
            h = h + block(h)
        return self.out(h)


def test_recipe_keep_layers_then_distill_from_the_original_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = Blocks().eval()
    data, held_out = batches(n=16), batches(seed=5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump([{"keep_layers": {"keep": "alternate"}},
                                      {"distill": {"steps": 200, "lr": 3e-3, "temperature": 2.0}}]))
    result = st.compress(model, str(recipe), data=data, progress=False)
    student = result.model
    assert len(student.layers) == 3
    shallow = st.compress(model, [{"keep_layers": {"keep": [1, 3, 5]}}], progress=False).model
    assert agreement(student, model, held_out) > agreement(shallow, model, held_out)
    assert [s["method"] for s in result.manifest["stages"]] == ["keep_layers", "distill"]
    result.save(tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=Blocks())
    x = held_out[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), student(x), atol=0, rtol=0)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.fc1 = nn.Linear(8 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


@pytest.mark.parametrize("first", [{"prune_channels": {"ratio": 0.5}}, {"decompose": {"ratio": 0.3, "keep_if_slower": False, "method": "svd"}}],
                         ids=["prune_channels", "decompose"])
def test_distill_recovers_after_another_method_in_one_recipe(first, tmp_path):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    g = torch.Generator().manual_seed(3)
    data = [torch.randn(16, 1, 6, 6, generator=g) for _ in range(8)]
    held = torch.randn(64, 1, 6, 6, generator=g)
    x0 = data[0][:2]
    compressed = st.compress(model, [first], data=data, example_inputs=x0, progress=False).model
    result = st.compress(model, [first, {"distill": {"steps": 150, "lr": 3e-3, "loss": "mse"}}], data=data,
                         example_inputs=x0, progress=False)
    with torch.no_grad():
        err_before = float(((compressed(held) - model(held)) ** 2).mean())
        err_after = float(((result.model(held) - model(held)) ** 2).mean())
    assert err_after < 0.8 * err_before, (err_before, err_after)
    result.save(tmp_path / "a")
    loaded = st.load(tmp_path / "a", model=SmallCNN())
    with torch.no_grad():
        torch.testing.assert_close(loaded(held), result.model(held), atol=0, rtol=0)


def test_frozen_parameters_stay_exactly_as_they_were():
    teacher, student = mlp(32, 0), mlp(8, 1)
    w0 = student[0].weight.detach().clone()
    out = st.distill(student, teacher, batches(n=2), {"steps": 10, "lr": 1e-2, "freeze": ["0.*"]}, progress=False)
    torch.testing.assert_close(out[0].weight, w0, atol=0, rtol=0)
    assert not torch.equal(out[2].weight, student[2].weight)
    assert all(p.requires_grad for p in out.parameters())  # the flags are restored
    with pytest.raises(ConfigError, match="matches no parameter"):
        st.distill(student, teacher, batches(n=1), {"steps": 1, "freeze": ["nope*"]}, progress=False)


class _FreshBatches:
    """A DataLoader-like iterable: every pass yields NEW tensors (shuffled copies), each freed after
    its step, so a new batch may get the id of a freed one."""

    def __init__(self, n: int = 6) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n * 8, 6, generator=g)
        self.n = n

    def __iter__(self):
        order = torch.randperm(len(self.x))
        for i in range(self.n):
            yield self.x[order[i * 8:(i + 1) * 8]].clone()


def test_cached_teacher_outputs_never_belong_to_another_batch():
    """The teacher cache used to be keyed by id(batch): with fresh batches per step, a freed batch's id
    came back and the step trained on that batch's teacher outputs. Every step must see its own."""
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (batch, teacher output it was paired with)
    true_teacher = nn.Linear(6, 4)
    true_teacher.load_state_dict(teacher.state_dict())
    teacher.register_forward_hook(lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))
    calls_before = len(seen)
    distill_train(student, teacher, _FreshBatches(), DistillConfig(steps=30, lr=1e-3, loss="mse", cache_teacher=True),
                  progress=False)
    assert len(seen) - calls_before == 31  # the probe batch, then one teacher forward per step: no stale hit
    for x, out in seen:
        torch.testing.assert_close(out, true_teacher(x).detach(), atol=0, rtol=0)
    # a list is cycled as the same objects: there the cache saves the forwards
    seen.clear()
    batches = [torch.randn(8, 6) for _ in range(3)]
    distill_train(student, teacher, batches, DistillConfig(steps=30, lr=1e-3, loss="mse", cache_teacher=True),
                  progress=False)
    assert len(seen) == 1 + 3  # the probe (its cache entry dropped), then each batch once
