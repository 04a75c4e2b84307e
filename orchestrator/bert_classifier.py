"""The `bert_classifier` kind: a BERT encoder and a classification head over token ids.

The model takes ONE tensor, the token ids, and derives the attention mask from the tokenizer's
pad id: the training loop, MLflow's pytorch flavor and the ONNX/TorchScript exports then see a
plain tensor-to-logits module, as for every other kind. Its encoder starts fresh, from an orch
export of a `bert_mlm` run (model.json + state_dict.pt), or from a transformers
save_pretrained directory; the head always starts fresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.model_zoo import DataInfo, ModelError, bert_config
from orchestrator.spec import MODEL_SECTIONS, BertClassifierModel, BertMLMModel

__all__ = ["BertClassifier", "build_bert_classifier", "classifier_example"]

# The orch kinds whose exports hold a BERT encoder under `bert.`.
_ENCODER_KINDS = ("bert_mlm", "bert_classifier")
# What must agree between pretrained weights and the model: (BertConfig attribute, spec field).
_ARCHITECTURE = (
    ("vocab_size", "vocab_size"),
    ("hidden_size", "hidden_size"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("intermediate_size", "intermediate_size"),
    ("max_position_embeddings", "max_seq_len"),
)


class BertClassifier(nn.Module):
    """BERT's encoder, pooled (mean of the unpadded tokens, or [CLS] through the pooler), then
    dropout and a linear layer to one logit per class."""

    def __init__(self, config: Any, num_classes: int, pad_id: int, pooling: str):
        from transformers import BertModel

        super().__init__()
        self.pad_id = pad_id
        self.pooling = pooling
        self.bert = BertModel(config, add_pooling_layer=pooling == "cls")
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, num_classes)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        keep = input_ids != self.pad_id
        out = self.bert(input_ids=input_ids, attention_mask=keep.long())
        if self.pooling == "cls":
            pooled = out.pooler_output
        else:
            weights = keep.unsqueeze(-1).to(out.last_hidden_state.dtype)
            summed = (out.last_hidden_state * weights).sum(1)
            pooled = summed / weights.sum(1).clamp(min=1.0)
        return self.classifier(self.dropout(pooled))


def build_bert_classifier(spec: BertClassifierModel, data: DataInfo) -> nn.Module:
    if data.num_classes is None or data.pad_id is None:
        raise ModelError(
            "model: bert_classifier takes its classes and pad token from labeled text "
            "(data.format: labeled_text), and this data has none"
        )
    config = bert_config(spec, data, pad_token_id=data.pad_id)
    model = BertClassifier(config, data.num_classes, data.pad_id, spec.pooling)
    if spec.pretrained:
        _load_encoder(model, spec.pretrained, config)
    return model


def classifier_example(spec: BertClassifierModel, data: DataInfo) -> np.ndarray:
    """One sample as the model trains on it: (1, seq_len) int64 token ids."""
    length = min(data.seq_len or 16, spec.max_seq_len)
    # Not the pad id: a sample of padding alone has nothing to attend to.
    return np.full((1, length), (data.pad_id or 0) + 1, dtype=np.int64)


# --------------------------------------------------------------------------- pretrained
def _load_encoder(model: BertClassifier, path: str, config: Any) -> None:
    """Load pretrained encoder weights into `model.bert`; a clear ModelError when they do not
    fit. Language-model heads are dropped; a pooler the weights lack starts fresh."""
    where = Path(path)
    if (where / "model.json").is_file():
        theirs, state = _orch_export(where)
    elif (where / "config.json").is_file():
        theirs, state = _save_pretrained(where, model.pooling == "cls")
    else:
        raise ModelError(
            f"model.pretrained: {path} is neither an orch model export (model.json, "
            "state_dict.pt: the model/ directory of a bert_mlm run) nor a save_pretrained "
            "directory (config.json)"
        )
    _check_architecture(theirs, config, path)
    missing, unexpected = model.bert.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("pooler.")]
    unexpected = [k for k in unexpected if not k.startswith("pooler.")]
    if missing or unexpected:
        raise ModelError(
            f"model.pretrained: {path} does not hold a whole BERT encoder "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
        )


def _orch_export(where: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """An orch export's architecture (as a BertConfig) and its encoder weights, `bert.` cut."""
    try:
        meta = json.loads((where / "model.json").read_text())
        kind = meta["model"]["kind"]
        data = DataInfo(**meta["data"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"model.pretrained: {where}/model.json is not an orch export ({exc})"
        ) from None
    if kind not in _ENCODER_KINDS:
        raise ModelError(
            f"model.pretrained: {where} is an export of a {kind} model; a bert_classifier "
            f"starts from a BERT encoder ({' or '.join(_ENCODER_KINDS)} exports)"
        )
    section = MODEL_SECTIONS[kind].model_validate(meta["model"])
    assert isinstance(section, BertMLMModel | BertClassifierModel)
    try:
        state = torch.load(where / "state_dict.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as exc:
        raise ModelError(f"model.pretrained: cannot load {where}/state_dict.pt: {exc}") from None
    encoder = {k.removeprefix("bert."): v for k, v in state.items() if k.startswith("bert.")}
    return bert_config(section, data), encoder


def _save_pretrained(where: Path, pooler: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    from transformers import BertModel

    try:
        # BertModel takes the encoder out of any BERT checkpoint (MLM, classifier...).
        encoder = BertModel.from_pretrained(where, add_pooling_layer=pooler, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.pretrained: cannot load {where}: {exc}") from None
    return encoder.config, encoder.state_dict()


def _check_architecture(theirs: Any, ours: Any, path: str) -> None:
    differ = [
        (field, getattr(theirs, attr), getattr(ours, attr))
        for attr, field in _ARCHITECTURE
        if getattr(theirs, attr) != getattr(ours, attr)
    ]
    if not differ:
        return
    both = "; ".join(f"{field} {there} there, {here} here" for field, there, here in differ)
    fix = ", ".join(
        f"model.{field}: {there}" for field, there, _ in differ if field != "vocab_size"
    )
    hints = [f"set {fix}"] if fix else []
    if any(field == "vocab_size" for field, _, _ in differ):
        hints.append(
            "use the tokenizer the weights were trained with "
            f"(data.tokenizer: {{kind: file, path: {path}/tokenizer.json}})"
        )
    raise ModelError(
        f"model.pretrained: {path} does not fit this model: {both}; {' and '.join(hints)}"
    )
