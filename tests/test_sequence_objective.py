"""The sequence-level objective: `sequence` templates (target = the user's item sequence, prompt names no item),
their render plan and tokenization, the item-restricted softmax, and the embedding learning-rate group."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F

from p5rec.prompts import templates as T
from p5rec.prompts.templates import RenderConfig, load_templates, render_split, validate

from template_fixtures import SEQUENCES, FakePrepared


@pytest.fixture(scope="module")
def shipped():
    return load_templates()


@pytest.fixture(scope="module")
def prepared():
    return FakePrepared()


def _sequence_templates(ts):
    return [t for t in ts if t.scoring == "sequence"]


def test_shipped_sequence_templates_exist_seen_and_unseen(shipped):
    seq = _sequence_templates(shipped)
    assert {t.family for t in seq} == {"sequential"}
    assert any(t.seen for t in seq) and any(not t.seen for t in seq)


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("form", ["token", "text"])
def test_target_sequence_never_reaches_the_encoder(shipped, prepared, split, form):
    """Every shipped sequence template, on every record: no item of the target appears in the prompt."""
    for t in _sequence_templates(shipped):
        cfg = RenderConfig(template_ids=[t.id], id_form=form, sequence_renders=2)
        ds = render_split(prepared, t.family, split, cfg, shipped)
        assert len(ds) > 0, t.id
        for src, tgt in zip(ds["source"], ds["target"]):
            items = tgt.replace("><", "> <").split() if form == "token" else tgt.split(" , ")
            assert len(items) >= 2 and all(i not in src for i in items), (t.id, src, tgt)
            assert "<i" not in src and "item_" not in src, (t.id, src)


def test_train_renders_one_row_per_user_with_the_whole_training_sequence(shipped, prepared):
    t = _sequence_templates(shipped)[0]
    ds = render_split(prepared, "sequential", "train", RenderConfig(template_ids=[t.id], sequence_renders=3), shipped)
    assert sorted(ds["user"]) == sorted(u for u in SEQUENCES for _ in range(3))
    for user, tgt in zip(ds["user"], ds["target"]):
        train_part = SEQUENCES[user][:-2]
        assert tgt == "".join(f"<i{i[1:]}>" for i in train_part)
    # max_sequence keeps the most recent items
    ds = render_split(prepared, "sequential", "train", RenderConfig(template_ids=[t.id], max_sequence=2), shipped)
    for user, tgt in zip(ds["user"], ds["target"]):
        assert tgt == "".join(f"<i{i[1:]}>" for i in SEQUENCES[user][:-2][-2:])


def test_sequence_rows_do_not_change_the_other_templates_rows(shipped, prepared):
    """Adding sequence templates to a family leaves the rows of its per-position templates as they were."""
    others = [t.id for t in shipped.by_family("sequential") if t.seen and t.scoring != "sequence"]
    base = render_split(prepared, "sequential", "train", RenderConfig(template_ids=others, renders={"sequential": 3}),
                        shipped)
    both = render_split(prepared, "sequential", "train",
                        RenderConfig(template_ids=others + ["2-S1"], renders={"sequential": 3}), shipped)
    rows = [r for r in both.to_list() if r["template"] != "2-S1"]
    assert rows == base.to_list()
    assert sum(t == "2-S1" for t in both["template"]) == len(SEQUENCES)
    none = render_split(prepared, "sequential", "train",
                        RenderConfig(template_ids=others + ["2-S1"], renders={"sequential": 3}, sequence_renders=0),
                        shipped)
    assert none.to_list() == base.to_list()


def _write(tmp_path, body: str):
    path = tmp_path / "seq.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_validation_rejects_a_sequence_template_whose_prompt_names_items(tmp_path):
    path = _write(tmp_path, """\
        family: sequential
        data: sequential
        schema: {user: u, history: h, sequence: s, target: t}
        templates:
          - id: "x-1"
            name: leaky
            seen: true
            scoring: sequence
            fields: [user, history, sequence]
            source: "{{ user }} had {{ history | ids }}"
            target: "{{ sequence | ids }}"
          - id: "x-2"
            name: wrong_target
            seen: true
            scoring: sequence
            fields: [user, target]
            source: "{{ user }}"
            target: "{{ target }}"
        """)
    problems = validate(path)
    kinds = {(p.template, p.kind) for p in problems}
    assert ("x-1", "sequence_leak") in kinds and ("x-2", "sequence_target") in kinds
    leak = next(p for p in problems if p.kind == "sequence_leak")
    assert leak.line == 5 and "history" in leak.message and str(path) in str(leak)


def test_tokenized_sequences_keep_every_item_and_drop_eos(shipped, prepared):
    from p5rec.prompts.mixture import MixtureSpec, tokenize
    from p5rec.prompts.tokenizer import build_tokenizer, train_sentencepiece

    ids = [f"<i{i}>" for i in range(1, 21)]
    tok = build_tokenizer(train_sentencepiece(["list the items interacted with oldest first"] * 50, 60), ids)
    ds = render_split(prepared, "sequential", "train", RenderConfig(template_ids=["2-S1", "2-1"]), shipped)
    spec = MixtureSpec(max_target_length=3)
    out = tokenize(ds, tok, spec, "t", frozenset({"2-S1"}))
    longest = 0
    for row in out:
        labels = row["labels"]
        if row["template"] == "2-S1":
            assert labels == tok(row["target"], add_special_tokens=False).input_ids  # whole, no EOS
            longest = max(longest, len(labels))
        else:
            assert labels[-1] == tok.eos_token_id and len(labels) <= spec.max_target_length
    assert longest > spec.max_target_length
    with_eos = tokenize(ds, tok, MixtureSpec(sequence_eos=True), "t", frozenset({"2-S1"}))
    assert all(r["labels"][-1] == tok.eos_token_id for r in with_eos)


# ------------------------------------------------------------------ the item-restricted softmax
def test_item_softmax_loss_matches_its_definition():
    from p5rec.train.model import item_softmax_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 4, 8), torch.randn(30, 8)
    labels = torch.tensor([[12, 15, 1, -100], [20, 1, -100, -100]])  # items 10..24, EOS 1
    got = item_softmax_loss(hidden, labels, weight, [10, 25])
    terms = []
    for b in range(2):
        for t in range(4):
            y = int(labels[b, t])
            if y == -100:
                continue
            logits = hidden[b, t] @ weight.T
            if 10 <= y < 25:
                terms.append(-F.log_softmax(logits[10:25], -1)[y - 10])
            else:
                terms.append(-F.log_softmax(logits, -1)[y])
    assert torch.allclose(got, torch.stack(terms).mean())


def test_model_with_item_range_trains_on_that_loss_and_loads_as_plain_t5(tmp_path):
    from transformers import T5ForConditionalGeneration

    from p5rec.train.model import P5T5ForConditionalGeneration, item_softmax_loss, t5_config

    torch.manual_seed(0)
    model = P5T5ForConditionalGeneration(t5_config("tiny", 40))
    enc = torch.tensor([[5, 6, 1], [7, 1, 0]])
    labels = torch.tensor([[20, 21, 22], [25, 1, -100]])
    plain = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels).loss
    model.config.item_token_range = [10, 30]
    out = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels)
    assert out.logits is None and not torch.allclose(out.loss, plain)
    out.loss.backward()
    assert model.shared.weight.grad is not None
    # the same number by hand: full forward, then the restricted loss on the (scaled) decoder output
    dec = model(input_ids=enc, attention_mask=(enc > 0).long(), decoder_input_ids=model._shift_right(labels),
                output_hidden_states=True).decoder_hidden_states[-1] * model.config.d_model**-0.5
    assert torch.allclose(out.loss, item_softmax_loss(dec, labels, model.lm_head.weight, [10, 30]), atol=1e-5)
    model.save_pretrained(tmp_path)
    again = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert again.config.item_token_range == [10, 30]
    assert torch.allclose(again.shared.weight, model.shared.weight)


def test_item_token_range_of_added_tokens():
    from p5rec.train.model import item_token_range
    from p5rec.prompts.tokenizer import build_tokenizer, train_sentencepiece

    users, items = [f"<u{i}>" for i in range(3)], [f"<i{i}>" for i in range(5)]
    tok = build_tokenizer(train_sentencepiece(["a few words here"] * 20, 40), users + items)
    lo, hi = item_token_range(tok, items)
    assert hi - lo == 5 and tok.convert_ids_to_tokens(list(range(lo, hi))) == items
    assert item_token_range(tok, ["<i0>", "<u1>"]) is None


def test_embedding_gets_its_own_learning_rate(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    from p5rec.train.model import P5T5ForConditionalGeneration, t5_config
    from p5rec.train.trainer import P5Trainer

    model = P5T5ForConditionalGeneration(t5_config("tiny", 40))
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none")
    trainer = P5Trainer(model=model, args=args, embedding_lr_multiplier=8.0)
    opt = trainer.create_optimizer()
    shared = model.shared.weight
    groups = [g for g in opt.param_groups if any(p is shared for p in g["params"])]
    assert len(groups) == 1 and groups[0]["params"] == [shared] and groups[0]["lr"] == pytest.approx(8e-3)
    others = [p for g in opt.param_groups if g is not groups[0] for p in g["params"]]
    assert len(others) + 1 == len(list(model.parameters()))
    assert all(g["lr"] == pytest.approx(1e-3) for g in opt.param_groups if g is not groups[0])


@pytest.mark.parametrize("multiplier", [4.0, 0.5])
def test_id_rows_step_like_a_larger_learning_rate_of_their_own(multiplier):
    """scale_row_steps on AdamW (weight decay on) gives the same trajectory as the rows in a parameter group
    with ``multiplier`` times the learning rate, over steps whose gradients depend on the weights."""
    from p5rec.train.trainer import scale_row_steps

    torch.manual_seed(0)
    init, target = torch.randn(10, 4), torch.randn(10, 4)
    rows = torch.tensor([2, 5, 7])
    rest = torch.tensor([i for i in range(10) if i not in (2, 5, 7)])

    w = torch.nn.Parameter(init.clone())
    opt = torch.optim.AdamW([w], lr=0.05, weight_decay=0.1)
    scale_row_steps(opt, w, rows, multiplier)
    a, b = torch.nn.Parameter(init[rows].clone()), torch.nn.Parameter(init[rest].clone())
    ref = torch.optim.AdamW([{"params": [a], "lr": 0.05 * multiplier}, {"params": [b]}], lr=0.05, weight_decay=0.1)
    for _ in range(5):
        for o, loss in ((opt, ((w - target) ** 3).abs().sum()),
                        (ref, ((a - target[rows]) ** 3).abs().sum() + ((b - target[rest]) ** 3).abs().sum())):
            o.zero_grad()
            loss.backward()
            o.step()
    assert torch.allclose(w.detach()[rows], a.detach(), atol=1e-6)
    assert torch.allclose(w.detach()[rest], b.detach(), atol=1e-6)
    assert not torch.allclose(w.detach()[rows], init[rows])


def test_id_rows_flags_need_id_tokens():
    from p5rec.train.training import ModelArguments

    with pytest.raises(ValueError, match="id_form token"):
        ModelArguments(id_form="text", id_embedding_lr_multiplier=8.0)
    with pytest.raises(ValueError, match="positive"):
        ModelArguments(id_embedding_lr_multiplier=0.0)


def test_sequence_rows_default_on_only_when_a_sequence_template_is_named():
    from p5rec.train.training import DataArguments

    shipped = load_templates()
    assert DataArguments().sequence_render_count(shipped) == 0  # the main job's mixture
    assert DataArguments(templates="2-1,2-S2").sequence_render_count(shipped) == 1
    assert DataArguments(templates="2-1").sequence_render_count(shipped) == 0
    assert DataArguments(templates="2-1", sequence_renders=4).sequence_render_count(shipped) == 4


# ------------------------------------------------------------------ the loss's reduction: per token or per example
def test_example_reduction_weighs_every_row_once():
    """Hand-computed: row 0 has three labelled tokens, row 1 one; "token" averages the four terms, "example" the
    two row means (P5's), with and without the item-restricted softmax."""
    from p5rec.train.model import item_softmax_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(30, 8)
    labels = torch.tensor([[12, 3, 1], [20, -100, -100]])
    for span in (None, [10, 25]):
        terms = {}
        for b, t in ((0, 0), (0, 1), (0, 2), (1, 0)):
            y, logits = int(labels[b, t]), hidden[b, t] @ weight.T
            if span and 10 <= y < 25:
                terms[b, t] = -F.log_softmax(logits[10:25], -1)[y - 10]
            else:
                terms[b, t] = -F.log_softmax(logits, -1)[y]
        row0 = (terms[0, 0] + terms[0, 1] + terms[0, 2]) / 3
        assert torch.allclose(item_softmax_loss(hidden, labels, weight, span, "token"),
                              sum(terms.values()) / 4)
        assert torch.allclose(item_softmax_loss(hidden, labels, weight, span, "example"), (row0 + terms[1, 0]) / 2)
    # a row without labels does not count
    padded = torch.cat([labels, torch.full((1, 3), -100)])
    assert torch.allclose(item_softmax_loss(torch.cat([hidden, hidden[:1]]), padded, weight, None, "example"),
                          item_softmax_loss(hidden, labels, weight, None, "example"))
    with pytest.raises(ValueError, match="loss reduction"):
        item_softmax_loss(hidden, labels, weight, None, "sum")


def test_model_example_reduction_differs_from_stock_t5_only_in_the_weights():
    """The model with ``loss_reduction = "example"`` gives the per-example loss of stock T5's own logits, and the
    stock loss when every row has as many labels."""
    from p5rec.train.model import P5T5ForConditionalGeneration, t5_config

    torch.manual_seed(0)
    model = P5T5ForConditionalGeneration(t5_config("tiny", 40)).eval()  # eval: stock T5 returns its logits
    enc = torch.tensor([[5, 6, 1], [7, 1, 0]])
    labels = torch.tensor([[20, 21, 22], [25, 1, -100]])
    stock = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels)
    nll = F.cross_entropy(stock.logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    model.config.loss_reduction = "example"
    got = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels).loss
    assert torch.allclose(got, (nll[0].sum() / 3 + nll[1].sum() / 2) / 2, atol=1e-6)
    assert not torch.allclose(got, stock.loss)
    even = torch.tensor([[20, 21, 1], [25, 26, 1]])
    model.config.loss_reduction = "token"
    token = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=even).loss
    model.config.loss_reduction = "example"
    assert torch.allclose(model(input_ids=enc, attention_mask=(enc > 0).long(), labels=even).loss, token, atol=1e-6)


def test_family_loss_weights_scale_each_rows_terms():
    """Row weights multiply a row's terms and leave the denominators alone: weight 1 is the unweighted loss, and a
    weight of 0 removes the row's terms from the numerator only."""
    from p5rec.train.model import item_softmax_loss

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 3, 8), torch.randn(30, 8)
    labels = torch.tensor([[12, 3, 1], [20, 1, -100]])
    nll = F.cross_entropy((hidden @ weight.T).transpose(1, 2), labels, reduction="none", ignore_index=-100)
    for reduction in ("token", "example"):
        plain = item_softmax_loss(hidden, labels, weight, None, reduction)
        assert torch.allclose(item_softmax_loss(hidden, labels, weight, None, reduction, torch.ones(2)), plain)
    got = item_softmax_loss(hidden, labels, weight, None, "token", torch.tensor([0.5, 2.0]))
    assert torch.allclose(got, (0.5 * nll[0].sum() + 2.0 * nll[1].sum()) / 5)
    got = item_softmax_loss(hidden, labels, weight, None, "example", torch.tensor([0.0, 2.0]))
    assert torch.allclose(got, (0.0 + 2.0 * nll[1].sum() / 2) / 2)


def test_training_loss_is_stock_t5s_from_the_labelled_positions_alone():
    """In training, logits are computed at labelled positions only (no logits come back): the loss and every
    gradient are stock T5's, which computes them at every position of the padded batch."""
    from p5rec.train.model import P5T5ForConditionalGeneration, t5_config

    torch.manual_seed(0)
    model = P5T5ForConditionalGeneration(t5_config("tiny", 48))
    enc = torch.tensor([[5, 6, 7, 1], [8, 1, 0, 0], [9, 10, 1, 0]])
    labels = torch.tensor([[20, 21, 22, 23], [25, 1, -100, -100], [30, -100, -100, -100]])
    fast = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels)
    assert fast.logits is None
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    stock = super(P5T5ForConditionalGeneration, model).forward(
        input_ids=enc, attention_mask=(enc > 0).long(), labels=labels)
    assert stock.logits.shape == (3, 4, 48)
    stock.loss.backward()
    assert torch.allclose(fast.loss, stock.loss, atol=1e-6)
    assert fast_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, dict(model.named_parameters())[name].grad, atol=1e-6), name
    model.eval()  # outside training: stock T5, logits and all
    assert model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels).logits.shape == (3, 4, 48)


def test_model_weights_rows_by_their_family_ids_and_only_in_training_batches():
    from p5rec.train.model import P5T5ForConditionalGeneration, t5_config

    torch.manual_seed(0)
    model = P5T5ForConditionalGeneration(t5_config("tiny", 40)).eval()  # eval: stock T5 returns its logits
    enc = torch.tensor([[5, 6, 1], [7, 1, 0]])
    labels = torch.tensor([[20, 21, 1], [25, 1, -100]])
    stock = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels)
    nll = F.cross_entropy(stock.logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    model.config.family_loss_weights = {"rating": 3.0, "sequential": 0.5}
    assert model.family_names == ["rating", "sequential"]
    # a call without family_ids (generation, scoring) is the unweighted model
    assert torch.allclose(model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels).loss, stock.loss)
    got = model(input_ids=enc, attention_mask=(enc > 0).long(), labels=labels,
                family_ids=torch.tensor([1, -1])).loss  # sequential, then a family without a weight (1)
    assert torch.allclose(got, (0.5 * nll[0].sum() + nll[1].sum()) / 5, atol=1e-6)
