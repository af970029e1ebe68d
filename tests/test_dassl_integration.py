"""examples/dassl_coop_prograd.py, unmodified, inside real Dassl (upstream Dassl.pytorch and
the ProGrad fork from ../shared/vendor) through official ProGrad's ``train.py`` with the stock
CoOp and ProGrad configs: train, best-val, test, eval-only, exact resume, fp16 / amp.

Each run is a subprocess (Dassl keeps global state) on a tiny OxfordPets-layout data set and
tiny random open_clip models (tests/dassl_harness.py).  The only config overrides are the
ones a machine without the hub needs (a tiny backbone, its image size, no pretrained
weights, no loader workers) and what a check needs (epochs, seeds, determinism for resume).
Skips with the reason when ../shared/vendor is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from dassl_harness import (CLASSES, OLD_CHECKPOINTS_ENV, OWN_CLASSES, OWN_DATASET, Workspace,
                           load_example)
from vendor_sources import custom_templates, vendor_tree  # noqa: F401 - the fixture

pytest.importorskip("yacs", reason="Dassl's runtime (the 'test' extra) is not installed")

TINY = ["MODEL.BACKBONE.NAME", "tiny-RN", "MODEL.BACKBONE.PRETRAINED", "False",
        "INPUT.SIZE", "(32, 32)", "DATALOADER.NUM_WORKERS", "0"]
DETERMINISTIC = ["DATALOADER.TRAIN_X.SAMPLER", "SequentialSampler",
                 "INPUT.TRANSFORMS", "['normalize']"]


@pytest.fixture(scope="module")
def ws(vendor_tree, tmp_path_factory):
    return Workspace(vendor_tree, tmp_path_factory.mktemp("dassl_ws"))


def _args(ws, config, *opts, flags=()):
    """train.py's arguments as the official scripts pass them (config options last)."""
    return ["--trainer", "CoOpProGradFast", "--seed", "1",
            "--dataset-config-file", ws.config("datasets/oxford_pets.yaml"),
            "--config-file", ws.config(config), *flags, *TINY, *opts]


def _eval_only(model_dir, epoch):
    return ["--eval-only", "--model-dir", str(model_dir), "--load-epoch", str(epoch)]


def _accuracies(text):
    return [float(a) for a in re.findall(r"\* accuracy: ([\d.]+)%", text)]


def _checkpoint(out, name):
    return torch.load(out / "prompt_learner" / name, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("dassl", ["upstream", "prograd_fork"])
def test_stock_prograd_config_trains_tests_best_val_and_eval_only(ws, tmp_path, dassl):
    """configs/trainers/ProGrad/rn50.yaml as the official scripts run it (CTX_INIT True,
    PREC fp16 by default, LOSS.LAMBDA on the command line), best-val model deployed, then
    ``--eval-only --load-epoch``."""
    out = tmp_path / "train"
    text = ws.run(dassl, _args(ws, "trainers/ProGrad/rn50.yaml", "LOSS.LAMBDA", "1.0",
                               "DATASET.NUM_SHOTS", "2", "OPTIM.MAX_EPOCH", "2",
                               "TEST.FINAL_MODEL", "best_val"), out)
    official = custom_templates(ws.code / "trainers" / "prograd.py")["OxfordPets"]
    assert f"Prompts: {[official.format(c.replace('_', ' ')) for c in CLASSES]}" in text
    assert "Deploy the model with the best val performance" in text
    assert re.search(r"Loading weights to prompt_learner from \".*model-best\.pth\.tar\"", text)
    accs = _accuracies(text)
    assert len(accs) == 3 and all(0 <= a <= 100 for a in accs)  # val x2, then test
    last = _checkpoint(out, "model.pth.tar-2")
    assert last["epoch"] == 2 and set(last["state_dict"]) == {"ctx"}
    assert last["state_dict"]["ctx"].dtype == torch.float32  # fp32 master context under fp16
    assert last["optimizer"]["param_groups"][0]["lam"] == 1.0

    evaluated = ws.run(dassl, _args(ws, "trainers/ProGrad/rn50.yaml", "DATASET.NUM_SHOTS", "2",
                                    flags=_eval_only(out, 2)), tmp_path / "eval")
    assert "(epoch = 2)" in evaluated and len(_accuracies(evaluated)) == 1


def test_official_checkpoint_loads_for_eval_and_init_weights(ws, tmp_path):
    """A checkpoint as CoOp / official ProGrad save it: fp16 context plus ``token_prefix`` /
    ``token_suffix`` of the saved run's classes, no ``val_result`` (the ProGrad fork's
    format, which upstream Dassl's own ``load_model`` cannot read), a pickled scheduler
    (hence OLD_CHECKPOINTS_ENV).  ``--eval-only`` loads it; ``MODEL.INIT_WEIGHTS`` (Dassl's
    load_pretrained_weights) warm-starts from it: with lr 0 the saved context is its own."""
    ctx = torch.randn(16, 32)  # N_CTX 16, the tiny models' text width
    sgd = torch.optim.SGD([torch.nn.Parameter(ctx.half())], lr=0.002, momentum=0.9)
    official = {"state_dict": {"ctx": ctx.half(),
                               "token_prefix": torch.randn(len(CLASSES), 1, 32).half(),
                               "token_suffix": torch.randn(len(CLASSES), 60, 32).half()},
                "epoch": 1, "optimizer": sgd.state_dict(),
                "scheduler": {"successor": torch.optim.lr_scheduler.CosineAnnealingLR(sgd, 3),
                              "last_epoch": 1}}
    path = tmp_path / "official" / "prompt_learner" / "model.pth.tar-1"
    path.parent.mkdir(parents=True)
    torch.save(official, path)
    prec = ["TRAINER.COOP.PREC", "fp32"]
    text = ws.run("upstream", _args(ws, "trainers/ProGrad/rn50.yaml", *prec,
                                    flags=_eval_only(tmp_path / "official", 1)),
                  tmp_path / "eval", env=OLD_CHECKPOINTS_ENV)
    assert "(epoch = 1)" in text and len(_accuracies(text)) == 1
    warm = tmp_path / "warm"
    ws.run("upstream", _args(ws, "trainers/ProGrad/rn50.yaml", *prec, "OPTIM.MAX_EPOCH", "1",
                             "TEST.NO_TEST", "True", "OPTIM.LR", "0.0", "OPTIM.WARMUP_EPOCH", "0",
                             "MODEL.INIT_WEIGHTS", str(path)), warm, env=OLD_CHECKPOINTS_ENV)
    assert torch.equal(_checkpoint(warm, "model.pth.tar-1")["state_dict"]["ctx"], ctx.half().float())


def test_stock_coop_config_vit_amp_official_lambda_and_optim_keys(ws, tmp_path):
    """configs/trainers/CoOp/rn50.yaml with a ViT backbone named CoOp-style ("/"), PREC amp,
    the official LOSS.LAMBDA and Dassl's SGD keys, which reach ProGradSGD."""
    out = tmp_path / "train"
    text = ws.run("upstream", _args(ws, "trainers/CoOp/rn50.yaml", "MODEL.BACKBONE.NAME",
                                    "tiny-ViT/8", "TRAINER.COOP.PREC", "amp", "LOSS.LAMBDA", "0.5",
                                    "OPTIM.SGD_NESTEROV", "True", "OPTIM.MAX_EPOCH", "1"), out)
    group = _checkpoint(out, "model.pth.tar-1")["optimizer"]["param_groups"][0]
    assert (group["lam"], group["nesterov"], group["momentum"]) == (0.5, True, 0.9)
    assert len(_accuracies(text)) == 1


def test_resume_is_exact(ws, tmp_path):
    """Interrupted after epoch 1 of 3 and resumed (Dassl's resume_model_if_exist) equals the
    uninterrupted run: context, momentum, lam and learning rate."""
    args = _args(ws, "trainers/ProGrad/rn50.yaml", "TRAINER.COOP.PREC", "fp32",
                 "OPTIM.MAX_EPOCH", "3", "TRAIN.CHECKPOINT_FREQ", "1", "TEST.NO_TEST", "True",
                 *DETERMINISTIC)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ws.run("upstream", args, full)
    (resumed / "prompt_learner").mkdir(parents=True)
    shutil.copy(full / "prompt_learner" / "model.pth.tar-1", resumed / "prompt_learner")
    (resumed / "prompt_learner" / "checkpoint").write_text("model.pth.tar-1\n")
    text = ws.run("upstream", args, resumed)
    assert "Previous epoch: 1" in text
    a, b = _checkpoint(full, "model.pth.tar-3"), _checkpoint(resumed, "model.pth.tar-3")
    assert torch.equal(a["state_dict"]["ctx"], b["state_dict"]["ctx"])
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(
        torch.equal(sa[k]["momentum_buffer"], sb[k]["momentum_buffer"]) for k in sa)
    first = _checkpoint(full, "model.pth.tar-1")["state_dict"]["ctx"]
    assert not torch.equal(first, a["state_dict"]["ctx"])  # epochs 2-3 did train


OFFICIAL_PROMPT_LEARNER = """
import sys, torch
from types import SimpleNamespace as NS
from yacs.config import CfgNode as CN
from trainers.prograd import PromptLearner
a = torch.load(sys.argv[1])
emb = torch.nn.Embedding(*a["weight"].shape)
emb.weight.data.copy_(a["weight"])
clip = NS(token_embedding=emb, ln_final=NS(weight=torch.zeros(a["weight"].shape[1])),
          visual=NS(input_resolution=16), dtype=torch.float32)
cfg = CN(dict(TRAINER=CN(dict(COOP=CN(dict(N_CTX=a["n_ctx"], CTX_INIT=True, CSC=False,
                                           CLASS_TOKEN_POSITION="end")))),
              DATASET=CN(dict(NAME=a["dataset"])), INPUT=CN(dict(SIZE=(16, 16)))))
with torch.no_grad():
    pl = PromptLearner(cfg, a["classnames"], clip)
    torch.save({"ctx": pl.ctx.detach(), "prompts": pl().detach(),
                "tokens": pl.tokenized_prompts}, sys.argv[2])
"""


@pytest.mark.parametrize("dataset", ["OxfordPets", "EuroSAT"])
def test_ctx_init_true_equals_official_prograd_prompt_learner(ws, tmp_path, dataset):
    """Official ProGrad's own PromptLearner (trainers/prograd.py, in the ProGrad fork of
    Dassl) and ours with the example's CTX_INIT True translation, on the same embeddings."""
    from clip_helpers import tiny_clip
    from prograd_fast.clip import PromptLearner, TextTower, get_templates

    example = load_example()
    tower = TextTower.from_model(tiny_clip(seed=5))
    template = get_templates(dataset, "prograd")[0]
    ours = PromptLearner(tower, CLASSES, n_ctx=16, truncate=False,
                         **example.context_init(True, template))
    torch.save({"weight": tower.token_embedding.weight.detach(), "classnames": CLASSES,
                "dataset": dataset, "n_ctx": 16}, tmp_path / "in.pt")
    script = tmp_path / "official.py"
    script.write_text(OFFICIAL_PROMPT_LEARNER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ws.code), str(ws.dassl["prograd_fork"])]))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "in.pt"),
                           str(tmp_path / "out.pt")], cwd=ws.code, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    official = torch.load(tmp_path / "out.pt")
    assert torch.equal(ours.tokenized_prompts, official["tokens"])
    torch.testing.assert_close(ours.ctx.detach(), official["ctx"], rtol=0, atol=0)
    embeddings, eot = ours()
    torch.testing.assert_close(embeddings.detach(), official["prompts"], rtol=0, atol=0)
    assert torch.equal(eot, official["tokens"].argmax(-1))


@pytest.fixture(scope="module")
def own(ws, tmp_path_factory):
    """The workspace with a data set of the user's own registered (dassl_harness)."""
    return ws.with_own_dataset(tmp_path_factory.mktemp("own_code"))


def _own_args(own, *opts):
    return ["--trainer", "CoOpProGradFast", "--seed", "1",
            "--dataset-config-file", own.config("datasets/my_shapes.yaml"),
            "--config-file", own.config("trainers/ProGrad/rn50.yaml"), *TINY,
            "TRAINER.COOP.PREC", "fp32", "OPTIM.MAX_EPOCH", "1", *opts]


def _prompts_line(template, classes):
    return f"Prompts: {[template.format(c.replace('_', ' ')) for c in classes]}"


def test_own_dataset_trains_with_clips_template_and_says_so_once(own, tmp_path):
    """A data set that is none of CoOp's 15, with the stock ProGrad config (CTX_INIT True):
    it trains and tests; the teacher uses "a photo of a {}.", one line says so and names
    the key that overrides it, and the context starts from that template."""
    text = own.run("upstream", _own_args(own), tmp_path / "train")
    notes = [line for line in text.splitlines() if "No teacher template" in line]
    assert notes == [f"No teacher template for DATASET.NAME {OWN_DATASET!r}: using "
                     f"'a photo of a {{}}.' (set TRAINER.PROGRAD.TEMPLATE to change it)"]
    assert _prompts_line("a photo of a {}.", OWN_CLASSES) in text
    assert 'Initial context: "' + "X " * 12 + 'a photo of a"' in text  # N_CTX 16, 4 words
    assert len(_accuracies(text)) == 1


def test_own_dataset_template_key_sets_the_teacher_and_the_context(own, tmp_path):
    text = own.run("upstream", _own_args(own, "TRAINER.PROGRAD.TEMPLATE", "a sketch of the {}."),
                   tmp_path / "train")
    assert "No teacher template" not in text
    assert _prompts_line("a sketch of the {}.", OWN_CLASSES) in text
    assert 'Initial context: "' + "X " * 12 + 'a sketch of the"' in text
    assert len(_accuracies(text)) == 1
