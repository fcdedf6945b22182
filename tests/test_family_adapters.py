"""Capacity per task family: residual adapters routed by each row's family (p5rec.train.model.FamilyAdapters)."""

import json
import logging
import re

import pytest
import torch

from p5rec.train.model import P5T5ForConditionalGeneration, family_route, t5_config
from p5rec.train.training import main as train_main

from conftest import TINY

FAMILIES = ["sequential", "explanation"]


def _model(stacks=("encoder", "decoder"), seed=0, adapters=True):
    cfg = t5_config("tiny", 64)
    if adapters:
        cfg.family_adapters = {"families": FAMILIES, "dim": 8, "stacks": list(stacks)}
    torch.manual_seed(seed)
    return P5T5ForConditionalGeneration(cfg).eval()


def _perturb(model):
    """Adapters start as the identity (``up`` at zero); give them weights so that routing shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in model.family_adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g))


def _batch(n=4):
    g = torch.Generator().manual_seed(2)
    return torch.randint(2, 64, (n, 7), generator=g), torch.randint(2, 64, (n, 5), generator=g)


def _row_losses(model, x, y, **kw):
    logits = model(input_ids=x, decoder_input_ids=model._shift_right(y), **kw).logits
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def test_adapters_start_as_the_model_without_them():
    x, y = _batch()
    plain, adapted = _model(adapters=False), _model()
    shared = {k: v for k, v in adapted.state_dict().items() if not k.startswith("family_adapters.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())  # the same seed, the same weights
    with torch.no_grad():
        assert torch.allclose(_row_losses(plain, x, y), _row_losses(adapted, x, y, family_ids=torch.tensor([0, 1, 0, 1])))


@pytest.mark.parametrize("stacks", [("encoder",), ("decoder",), ("encoder", "decoder")])
def test_each_row_is_routed_through_its_own_family(stacks):
    model = _model(stacks)
    _perturb(model)
    x, y = _batch()
    with torch.no_grad():
        mixed = _row_losses(model, x, y, family_ids=torch.tensor([0, 1, 1, 0]))
        with family_route(model, "sequential"):
            as_seq = _row_losses(model, x, y)
        with family_route(model, "explanation"):
            as_expl = _row_losses(model, x, y)
    assert torch.allclose(mixed, torch.stack([as_seq[0], as_expl[1], as_expl[2], as_seq[3]]), atol=1e-6)
    assert not torch.allclose(as_seq, as_expl)  # the two families' adapters answer differently


def test_gradient_reaches_only_the_batchs_families():
    model = _model().train()
    x, y = _batch()
    model(input_ids=x, labels=y, family_ids=torch.tensor([1, 1, 1, 1])).loss.backward()
    for a in model.family_adapters.values():
        per_family = a.up.grad.abs().sum(dim=(0, 2, 3))
        assert per_family[0] == 0 and per_family[1] > 0


def test_an_unrouted_call_is_refused_and_the_route_is_restored():
    model = _model()
    x, y = _batch()
    with pytest.raises(RuntimeError, match="family_route"):
        model(input_ids=x, labels=y)
    with family_route(model, "explanation"):
        model(input_ids=x, labels=y, family_ids=torch.tensor([0, 0, 0, 0]))  # an explicit batch overrides it
        assert model._route.tolist() == [1]
    assert model._route is None


def test_a_family_without_adapter_answers_with_the_shared_model(caplog):
    plain, adapted = _model(adapters=False), _model()
    _perturb(adapted)
    x, y = _batch()
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        with family_route(adapted, "ranking"):
            got = _row_losses(adapted, x, y)
        with family_route(adapted, "ranking"):
            _row_losses(adapted, x, y)
    assert torch.allclose(got, _row_losses(plain, x, y), atol=1e-6)
    assert sum("no adapter for family 'ranking'" in r.message for r in caplog.records) == 1  # said once


def test_beam_search_routes_every_beam():
    model = _model(("decoder",))
    _perturb(model)
    x, _ = _batch(2)
    with torch.no_grad(), family_route(model, "explanation"):
        beams = model.generate(input_ids=x, num_beams=3, max_new_tokens=4, do_sample=False)
        greedy = model.generate(input_ids=x, num_beams=1, max_new_tokens=4, do_sample=False)
    assert beams.shape[0] == 2 and greedy.shape[0] == 2


def test_adapters_survive_save_and_load(tmp_path):
    model = _model()
    _perturb(model)
    model.save_pretrained(tmp_path)
    loaded = P5T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    x, y = _batch()
    ids = torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.equal(_row_losses(model, x, y, family_ids=ids), _row_losses(loaded, x, y, family_ids=ids))


def test_unknown_stack_is_one_clear_line():
    cfg = t5_config("tiny", 64)
    cfg.family_adapters = {"families": FAMILIES, "dim": 8, "stacks": ["middle"]}
    with pytest.raises(ValueError, match="unknown stacks"):
        P5T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("flags, message", [
    (["--family_adapter_dim", "-1"], "expected 0 .none. or a positive width"),
    (["--family_adapter_dim", "8", "--family_adapter_stacks", "middle"], "unknown .'middle'."),
    (["--item_output_rows", "separate", "--id_form", "text"], "needs one token per item"),
])
def test_bad_adapter_flags_are_one_clear_line(flags, message, tmp_path, capsys):
    assert train_main(TINY + flags + ["--output_dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0])
    assert not (tmp_path / "r").exists()


def test_adapters_on_a_checkpoint_without_them_are_refused(quick_run, tmp_path, capsys):
    assert train_main(TINY + ["--model_name_or_path", str(quick_run), "--family_adapter_dim", "8",
                              "--output_dir", str(tmp_path / "r"), "--max_steps", "1", "--eval_strategy", "no",
                              "--skip_test", "true", "--eval_users", "0"]) == 2
    assert "has no family adapters" in capsys.readouterr().err


def test_a_run_with_adapters_trains_scores_and_predicts(tmp_path):
    """Every family's rows train their own adapters; evaluation and the predict API route by template family."""
    from p5rec.serve.inference import P5Rec

    out = tmp_path / "adapted"
    assert train_main(TINY + ["--output_dir", str(out), "--family_adapter_dim", "8", "--max_steps", "12",
                              "--eval_steps", "12", "--save_steps", "12", "--test_max_cases", "4"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["family_adapters"] == {"families": ["sequential", "direct", "rating", "explanation", "review"],
                                         "dim": 8, "stacks": ["decoder"]}
    model = P5T5ForConditionalGeneration.from_pretrained(out)
    moved = model.family_adapters["decoder"].up.abs().sum(dim=(0, 2, 3))
    assert (moved > 0).all()  # every family's adapter was trained by its own rows
    results = json.loads((out / "results.json").read_text())
    assert {"sequential", "rating", "explanation"} <= set(results["families"])
    rec = P5Rec.from_pretrained(out)
    users, items = sorted(json.loads((out / "index.json").read_text())["users"]), None
    items = sorted(json.loads((out / "index.json").read_text())["items"])
    assert len(rec.recommend(items[:3], user=users[0], k=5)) == 5
    assert isinstance(rec.explain(users[0], items[0]), str)
    assert rec.predict_rating(users[0], items[0])["text"] is not None
