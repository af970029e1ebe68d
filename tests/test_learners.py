"""A prompt learner is what PromptedCLIP is given: one defined here, outside the package,
trains through PromptedCLIP, the trainer and the protocol grid; the methods are listed once;
checkpoints hold the learner's state and the earlier context-only ones still load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import coop_layouts as L
from clip_helpers import CLASSNAMES, tiny_cfg, tiny_clip
from prograd_fast import methods
from prograd_fast.clip import PromptedCLIP, default_tokenizer
from prograd_fast.clip.learner import Learner
from prograd_fast.clip.trainer import TrainConfig, Trainer


class OffsetLearner(Learner):
    """A toy learner: the fixed prompts "a photo of a NAME." plus one learned offset per
    token position, shared by all classes."""

    def __init__(self, tower, classnames, tokenizer=None, **settings) -> None:
        super().__init__()
        self.classnames = [str(c).replace("_", " ") for c in classnames]
        tokenizer = tokenizer or default_tokenizer(tower.context_length)
        tokens = tokenizer([f"a photo of a {c}." for c in self.classnames])
        with torch.no_grad():
            self.register_buffer("embedding", tower.token_embedding(tokens), persistent=False)
        self.register_buffer("eot", tower.eot_positions(tokens), persistent=False)
        self.offset = nn.Parameter(torch.zeros(tokens.shape[1], tower.width))

    def forward(self):
        return self.embedding + self.offset.to(self.embedding.dtype), self.eot

    def moved_to(self, tower, classnames, tokenizer=None, **settings) -> "OffsetLearner":
        other = OffsetLearner(tower, classnames, tokenizer)
        with torch.no_grad():
            other.offset.copy_(self.offset)
        return other


@pytest.fixture
def offset_method():
    method = methods.register_method(methods.Method("offset", "Offset", prograd=True,
                                                    learner=OffsetLearner))
    yield method
    methods.METHODS.pop(method.name)


def _data(n=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g),
                         torch.randint(0, len(CLASSNAMES), (n,), generator=g))


def test_a_learner_of_ones_own_trains_and_resumes_through_the_trainer(tmp_path, offset_method):
    def trainer(out, epochs):
        model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, learner=OffsetLearner)
        cfg = TrainConfig(method="offset", epochs=epochs, batch_size=8, lr=0.5, warmup_lr=0.05,
                          output_dir=str(out), progress=False)
        return Trainer(model, _data(), _data(9, seed=1), cfg)

    full = trainer(tmp_path / "a", 2)
    assert full.model.shared_prefix is None and "shares no prompt prefix" in \
        full.model.shared_prefix_off
    assert [p is full.model.prompt_learner.offset for g in full.optimizer.param_groups
            for p in g["params"]] == [True]
    history = full.fit()
    assert history[-1]["conflict_rate"] is not None  # ProGrad's projection ran
    assert full.model.prompt_learner.offset.abs().sum() > 0  # it trained
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    assert "ctx" not in state and set(state["learner"]) == {"offset"}
    resumed = trainer(tmp_path / "a", 2)
    assert resumed.maybe_resume()
    assert torch.equal(resumed.model.prompt_learner.offset, full.model.prompt_learner.offset)


def test_a_built_learner_is_taken_as_given():
    clip = tiny_clip(seed=7)
    model = PromptedCLIP(clip, CLASSNAMES, learner=OffsetLearner)
    given = PromptedCLIP(clip, CLASSNAMES, learner=model.prompt_learner)
    assert given.prompt_learner is model.prompt_learner
    with pytest.raises(TypeError, match="n_ctx"):
        PromptedCLIP(clip, CLASSNAMES, learner=model.prompt_learner, n_ctx=4)


def test_a_learner_of_ones_own_runs_the_protocol_grid(tmp_path, offset_method):
    from prograd_fast.protocols import GridOptions, GridRunner

    root = tmp_path / "data"
    L.make(root, "dtd")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(tiny_cfg()))
    opts = GridOptions("base2new", str(root), datasets=["dtd"], seeds=[1], methods=["offset"],
                       model=str(cfg), pretrained=None, output_dir=str(tmp_path / "out"),
                       epochs=1, progress=False)
    runner = GridRunner(opts, log=lambda *a: None)
    [(run, result)] = runner.run()
    assert run.method == "offset" and run.trained
    assert set(result["tests"]) == {"dtd/base", "dtd/new"}  # base -> new through moved_to
    assert all(0 <= acc <= 100 for acc in result["tests"].values())
    state = torch.load(runner.run_dir(run) / "checkpoint.pt", weights_only=False)
    assert state["learner"]["offset"].abs().sum() > 0


def test_the_methods_are_listed_once():
    from prograd_fast.cli import build_parser
    from prograd_fast.clip import trainer
    from prograd_fast.protocols import config

    assert trainer.METHODS is methods.METHODS and config.METHODS is methods.METHODS
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    [method] = [a for a in train._actions if a.dest == "method"]
    assert list(method.choices) == list(methods.METHODS) == [
        "zeroshot", "coop", "prograd", "kgcoop", "kgcoop+prograd", "cocoop", "cocoop+prograd",
        "maple", "maple+prograd", "ivlp", "ivlp+prograd", "vpt", "vpt+prograd"]
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method(methods.Method("coop", "CoOp"))


def test_a_checkpoint_holding_only_the_context_still_loads(tmp_path):
    def trainer(epochs):
        model = PromptedCLIP(tiny_clip(seed=7), CLASSNAMES, n_ctx=3)
        cfg = TrainConfig(method="coop", epochs=epochs, batch_size=8, lr=0.5,
                          output_dir=str(tmp_path), progress=False)
        return Trainer(model, _data(), None, cfg)

    first = trainer(1)
    first.fit()
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    assert torch.equal(state["learner"]["ctx"], state["ctx"])
    del state["learner"]  # as an earlier version wrote it
    torch.save(state, path)
    again = trainer(2)
    assert again.maybe_resume()
    assert torch.equal(again.model.prompt_learner.ctx, first.model.prompt_learner.ctx)
