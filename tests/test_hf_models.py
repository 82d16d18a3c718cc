"""Real third-party models (Hugging Face transformers, from small configs, no downloads),
trained the Hugging Face way: a dict batch with labels, the model's own loss.

- a tied-embedding causal LM (GPT-2), a masked LM (BERT, tied), an encoder-decoder (BART, tied),
  Swin (strided views in the re-traced step): 10 steps, the loss falls, and the first steps
  match ``convert`` + GradScaler + torch.optim;
- BERT / ViT / GPT-2 training steps exported to ONNX, trained in onnxruntime next to the
  TrainStep: the losses track each other.

Dropout is 0 so the oracles see the same computation.
"""

import numpy as np
import pytest
import torch

import mpcompile
from mpcompile.dtypes import unit_roundoff

T = pytest.importorskip("transformers")
F16, BF16 = torch.float16, torch.bfloat16
B, L = 2, 16


def _lm(cls, cfg):
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=torch.Generator().manual_seed(0))
    return cls(cfg), {"input_ids": ids, "labels": ids}


def gpt2():
    return _lm(T.GPT2LMHeadModel, T.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def bert_mlm():
    return _lm(T.BertForMaskedLM, T.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def bart():
    model, b = _lm(T.BartForConditionalGeneration, T.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False, dropout=0.0,
        attention_dropout=0.0))
    return model, {**b, "decoder_input_ids": b["input_ids"]}


def _image(cls, cfg):
    g = torch.Generator().manual_seed(0)
    return cls(cfg), {"pixel_values": torch.randn(B, 3, 32, 32, generator=g),
                      "labels": torch.randint(0, 10, (B,), generator=g)}


def swin():
    return _image(T.SwinForImageClassification, T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0))


def vit():
    return _image(T.ViTForImageClassification, T.ViTConfig(
        image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0))


def _step(build, low, lr=3e-3):
    torch.manual_seed(0)
    model, b = build()
    step = mpcompile.compile_train_step(
        model, batch=b, optimizer=torch.optim.AdamW(model.parameters(), lr=lr), dtype=low,
        backend="eager")
    return step, b


SLOW = pytest.mark.slow
TRAIN = [pytest.param(gpt2, F16, id="gpt2-fp16"), pytest.param(bert_mlm, BF16, id="bert-bf16"),
         pytest.param(gpt2, BF16, id="gpt2-bf16", marks=SLOW),
         pytest.param(bert_mlm, F16, id="bert-fp16", marks=SLOW),
         pytest.param(bart, F16, id="bart-fp16", marks=SLOW),
         pytest.param(bart, BF16, id="bart-bf16", marks=SLOW),
         pytest.param(swin, F16, id="swin-fp16", marks=SLOW),
         pytest.param(swin, BF16, id="swin-bf16", marks=SLOW)]


@pytest.mark.parametrize("build,low", TRAIN)
def test_trains_the_hugging_face_way(build, low):
    step, b = _step(build, low)
    losses = [step(b) for _ in range(10)]
    assert sum(int(r.skipped) for r in losses) <= 3
    assert losses[-1].loss.item() < losses[0].loss.item()
    # the first step against convert + GradScaler + torch.optim on the same forward
    torch.manual_seed(0)
    model, _ = build()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mp = mpcompile.convert(model, b, dtype=low, backend="eager")
    scaler = torch.amp.GradScaler("cpu", enabled=low is F16)
    loss = mp(**b).loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert loss.item() == losses[0].loss.item()


def test_tied_causal_lm_keeps_one_master():
    step, _ = _step(gpt2, F16)
    assert step.ties == {"transformer.wte.weight": ("lm_head.weight",)}
    assert "master.lm_head.weight" not in step.layout
    m = step.to_module()
    assert m.lm_head.weight is m.transformer.wte.weight


EXPORT = [pytest.param(bert_mlm, F16, id="bert-fp16"),
          pytest.param(vit, BF16, id="vit-bf16", marks=SLOW),
          pytest.param(gpt2, F16, id="gpt2-fp16", marks=SLOW)]


@pytest.mark.parametrize("build,low", EXPORT)
def test_exported_step_tracks_the_train_step(build, low):
    step, b = _step(build, low)
    trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
    ours = [step(b).loss.item() for _ in range(5)]
    theirs = [trainer.step(b).loss for _ in range(5)]
    # the runtimes round different intermediates (onnxruntime's CPU provider computes FP16
    # nodes in FP32); after 5 AdamW steps the losses agree to a few hundred u of the format
    np.testing.assert_allclose(theirs, ours, rtol=256 * unit_roundoff(low))
    assert theirs[-1] < theirs[0]
