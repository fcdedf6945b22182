import json

import pytest
import torch

from p5rec.train.model import PRESETS, build_model, load_pretrained, t5_config
from p5rec.prompts.tokenizer import build_tokenizer, train_sentencepiece

CORPUS = ["the strings sound great", "a cheap cable that works", "my amp hums a little"] * 20


def _tok(ids=()):
    return build_tokenizer(train_sentencepiece(CORPUS, vocab_size=50), ids)


def test_presets_have_expected_shapes():
    assert PRESETS["small"].d_model == 512 and PRESETS["small"].num_layers == 6  # the t5-small shape
    cfg = t5_config("mini", 1000)
    assert cfg.vocab_size == 1000 and cfg.decoder_start_token_id == 0 and cfg.eos_token_id == 1
    with pytest.raises(ValueError, match="unknown model preset"):
        t5_config("huge", 10)


def test_build_model_covers_the_tokenizer():
    tok = _tok(["<i1>", "<i2>", "<u1>"])
    model = build_model("tiny", tok)
    assert model.config.vocab_size >= len(tok) and model.config.vocab_size % 8 == 0
    out = model.generate(**tok(["<u1> the strings"], return_tensors="pt"), max_new_tokens=3)
    assert out.shape[0] == 1


def test_load_pretrained_checkpoint_extends_vocabulary(tmp_path):
    """The pretrained path is real code: save a checkpoint, reload it, add id tokens, outputs stay identical."""
    torch.manual_seed(0)
    tok = _tok()
    model = build_model("tiny", tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    new_ids = [f"<i{i}>" for i in range(1, 40)]
    loaded, ltok = load_pretrained(tmp_path, id_tokens=new_ids)
    assert len(ltok) == len(tok) + len(new_ids)
    assert loaded.get_input_embeddings().num_embeddings >= len(ltok)
    enc = tok(["the strings sound great"], return_tensors="pt")
    model.eval(), loaded.eval()
    a = model.generate(**enc, max_new_tokens=4, do_sample=False)
    b = loaded.generate(**enc, max_new_tokens=4, do_sample=False)
    assert torch.equal(a, b)  # old tokens behave exactly as before the vocabulary grew
    assert ltok("<i7>", add_special_tokens=False).input_ids == [ltok.convert_tokens_to_ids("<i7>")]


def test_load_pretrained_missing_path_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "nope")


def test_load_pretrained_without_a_tokenizer_is_clear(tmp_path):
    build_model("tiny", _tok()).save_pretrained(tmp_path)  # weights only, no tokenizer beside them
    with pytest.raises(FileNotFoundError, match="no tokenizer saved beside the checkpoint"):
        load_pretrained(tmp_path)


def test_training_from_a_checkpoint_keeps_its_tokenizer(quick_run, tmp_path):
    """A second stage on other families (and another --vocab_size) tokenizes with the checkpoint's own pieces:
    a freshly trained SentencePiece model would give the checkpoint's embedding rows other meanings."""
    from transformers import AutoTokenizer

    from conftest import TINY
    from p5rec.train.training import main as train_main

    out = tmp_path / "stage2"
    args = TINY + ["--output_dir", str(out), "--model_name_or_path", str(quick_run), "--families",
                   "explanation,review", "--vocab_size", "300", "--max_steps", "2", "--save_steps", "2",
                   "--eval_strategy", "no", "--skip_test", "true", "--eval_users", "0"]
    assert train_main(args) == 0
    before, after = (AutoTokenizer.from_pretrained(str(d)).get_vocab() for d in (quick_run, out))
    assert after == before
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["model_name_or_path"] == str(quick_run)
    # the first stage's templates stay seen: the evaluation scores sequential 2-x as trained, not zero-shot
    parent = json.loads((quick_run / "run_config.json").read_text())["mixture"]["trained_templates"]
    assert any(t.startswith("2-") for t in parent)
    assert config["mixture"]["trained_templates"] == sorted(parent)
    assert config["mixture"]["parent_run"]["same_index"] is True


def test_separate_item_output_rows_start_tied_and_then_answer_for_the_items(tmp_path):
    """--item_output_rows separate: the item tokens' logits come from rows of their own, copied from the shared
    ones (so nothing changes at the start); the encoder's embedding no longer gets the items' softmax gradient."""
    from p5rec.train.model import P5T5ForConditionalGeneration

    torch.manual_seed(0)
    model = P5T5ForConditionalGeneration(t5_config("tiny", 64)).eval()
    x = torch.randint(2, 40, (3, 7))  # prompts without item tokens, one-item answers (never fed back in)
    y = torch.randint(40, 60, (3, 1))
    before = model(input_ids=x, labels=y).logits
    model.set_item_output_rows([40, 60])
    assert torch.allclose(model(input_ids=x, labels=y).logits, before)
    model.train()
    model(input_ids=x, labels=y).loss.backward()
    assert model.item_head.grad.abs().sum() > 0
    assert model.shared.weight.grad[40:60].abs().sum() == 0  # items only answered, never read: no pull on them
    model.zero_grad()
    model.config.item_token_range = [40, 60]  # the item-softmax loss scores items against the separate rows too
    model(input_ids=x, labels=y).loss.backward()
    assert model.item_head.grad.abs().sum() > 0 and model.shared.weight.grad[40:60].abs().sum() == 0
    del model.config.item_token_range
    with torch.no_grad():
        model.item_head.add_(torch.randn_like(model.item_head))
    model.eval()
    after = model(input_ids=x, labels=y).logits
    assert torch.allclose(after[..., :40], before[..., :40]) and not torch.allclose(after[..., 40:60], before[..., 40:60])
    model.save_pretrained(tmp_path)
    loaded = P5T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert torch.allclose(loaded(input_ids=x, labels=y).logits, after)
    assert loaded.generate(input_ids=x, max_new_tokens=3, num_beams=2).shape[0] == 3
