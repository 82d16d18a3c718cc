"""Third-party models, as a new user would try them: convert, train, export.

Hugging Face transformers models built from small configs with random weights (no downloads),
FP16 and BF16. For each: ``convert`` + one forward; ``compile_train_step`` with the model's own
loss (a dict batch with labels, ``loss_fn=None``), 10 steps of AdamW on one batch (the loss
must fall); ``export_onnx(step)`` + 2 steps in onnxruntime (finite losses). Dropout is set to 0
so the exported step is deterministic. Prints a Markdown table.

    python benchmarks/third_party_models.py [--only NAME ...] [--dtype fp16|bf16|both]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import math
import time
import warnings

import torch
import transformers as T

import mpcompile

B, L = 2, 16


def _ids(vocab: int, n: int = L) -> torch.Tensor:
    return torch.randint(3, vocab, (B, n))


def _lm(cls, cfg):
    ids = _ids(cfg.vocab_size)
    return cls(cfg), {"input_ids": ids, "labels": ids}


def _seq2seq(cls, cfg):
    ids = _ids(cfg.vocab_size)
    return cls(cfg), {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}


def _image(cls, cfg, size=32, labels=10):
    return cls(cfg), {"pixel_values": torch.randn(B, 3, size, size),
                      "labels": torch.randint(0, labels, (B,))}


NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
BERTISH = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, **NO_DROP)
VIT = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2,
           num_attention_heads=2, intermediate_size=64, num_labels=10, **NO_DROP)

MODELS = {
    "bert-mlm": lambda: _lm(T.BertForMaskedLM, T.BertConfig(**BERTISH)),
    "roberta-mlm": lambda: _lm(T.RobertaForMaskedLM, T.RobertaConfig(**BERTISH)),
    "distilbert-mlm": lambda: _lm(T.DistilBertForMaskedLM, T.DistilBertConfig(
        vocab_size=128, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
        max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)),
    "gpt2": lambda: _lm(T.GPT2LMHeadModel, T.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "gpt-neo": lambda: _lm(T.GPTNeoForCausalLM, T.GPTNeoConfig(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=2,
        attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
        window_size=8, use_cache=False, embed_dropout=0.0, attention_dropout=0.0,
        resid_dropout=0.0)),
    "opt": lambda: _lm(T.OPTForCausalLM, T.OPTConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ffn_dim=64, max_position_embeddings=64, use_cache=False, dropout=0.0,
        attention_dropout=0.0)),
    "t5": lambda: _seq2seq(T.T5ForConditionalGeneration, T.T5Config(
        vocab_size=128, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        use_cache=False, dropout_rate=0.0)),
    "bart": lambda: _seq2seq(T.BartForConditionalGeneration, T.BartConfig(
        vocab_size=128, d_model=32, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False, dropout=0.0,
        attention_dropout=0.0)),
    "whisper": lambda: _whisper(),
    "wav2vec2-ctc": lambda: _wav2vec2(),
    "vit": lambda: _image(T.ViTForImageClassification, T.ViTConfig(**VIT)),
    "deit": lambda: _image(T.DeiTForImageClassification, T.DeiTConfig(**VIT)),
    "swin": lambda: _image(T.SwinForImageClassification, T.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
        window_size=4, num_labels=10, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, drop_path_rate=0.0)),
    "resnet": lambda: _image(T.ResNetForImageClassification, T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
    "convnext": lambda: _image(T.ConvNextForImageClassification, T.ConvNextConfig(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
        drop_path_rate=0.0)),
}


def _whisper():
    cfg = T.WhisperConfig(vocab_size=128, num_mel_bins=16, d_model=32, encoder_layers=1,
                          decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_source_positions=16, max_target_positions=32, use_cache=False,
                          dropout=0.0, attention_dropout=0.0, decoder_start_token_id=1,
                          pad_token_id=0)
    ids = _ids(128, 8)
    return T.WhisperForConditionalGeneration(cfg), {
        "input_features": torch.randn(B, 16, 32), "decoder_input_ids": ids, "labels": ids}


def _wav2vec2():
    cfg = T.Wav2Vec2Config(vocab_size=16, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                           num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
                           hidden_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                           activation_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                           ctc_loss_reduction="mean", pad_token_id=0)
    return T.Wav2Vec2ForCTC(cfg), {"input_values": torch.randn(B, 800),
                                   "labels": torch.randint(1, 16, (B, 6))}


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:160]


def run_one(name: str, dtype: torch.dtype) -> dict:
    out = {"model": name, "dtype": str(dtype).removeprefix("torch.")}
    try:
        torch.manual_seed(0)
        model, batch = MODELS[name]()
    except Exception as e:  # noqa: BLE001 - a config this transformers release rejects
        return {**out, "convert": f"model not built: {_short(e)}", "train": "-", "export": "-"}
    try:
        mp = mpcompile.convert(model, batch, dtype=dtype)
        mp(**batch)
        out["convert"] = "ok"
    except Exception as e:  # noqa: BLE001 - the survey reports every failure
        out["convert"] = _short(e)
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    step = None
    try:
        t0 = time.perf_counter()
        step = mpcompile.compile_train_step(
            model, batch=batch, optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3),
            dtype=dtype)
        out["compile_s"] = round(time.perf_counter() - t0, 1)
        results = [step(batch) for _ in range(10)]
        losses = [r.loss.item() for r in results]
        skips = sum(int(r.skipped) for r in results)
        ok = all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        out["train"] = (f"{'ok' if ok else 'FAIL'} {losses[0]:.3f}->{losses[-1]:.3f}, "
                        f"{skips} skipped")
        out["ties"] = ", ".join(f"{k}={'/'.join(v)}" for k, v in step.ties.items()) or "-"
    except Exception as e:  # noqa: BLE001
        out["train"] = _short(e)
    if step is not None:
        try:
            trainer = mpcompile.OrtTrainer(mpcompile.export_onnx(step))
            ort = [trainer.step(batch).loss for _ in range(2)]
            ok = all(math.isfinite(v) for v in ort)
            out["export"] = f"{'ok' if ok else 'FAIL'} ORT loss {ort[0]:.3f}, {ort[1]:.3f}"
        except Exception as e:  # noqa: BLE001
            out["export"] = _short(e)
    else:
        out["export"] = "-"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(MODELS), default=sorted(MODELS))
    ap.add_argument("--dtype", choices=["fp16", "bf16", "both"], default="both")
    args = ap.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    dtypes = {"fp16": [torch.float16], "bf16": [torch.bfloat16],
              "both": [torch.float16, torch.bfloat16]}[args.dtype]
    print("| model | dtype | convert | train (10 steps) | export + 2 ORT steps | ties |")
    print("|---|---|---|---|---|---|")
    for name in args.only:
        for dt in dtypes:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                r = run_one(name, dt)
            print(f"| {r['model']} | {r['dtype']} | {r['convert']} | {r['train']} | "
                  f"{r['export']} | {r.get('ties', '-')} |", flush=True)


if __name__ == "__main__":
    main()
