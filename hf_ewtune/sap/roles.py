"""The two SAP roles: the data owner (:class:`SAPCustomer`) and the model owner (:class:`SAPVendor`).

Protocol (every message is a :class:`~hf_ewtune.sap.transport.Message`):

=========  ==========================================================  =====================================
kind       request tensors / meta                                      reply
=========  ==========================================================  =====================================
upload     hidden [B,T,d] (privatized), attention_mask i8, labels      ok, meta.n_examples (stored so far)
train      meta: epochs, learning_rate, batch_size, seed               train_done, meta.losses / train_loss
predict    hidden, attention_mask                                      logits [B, C]
reset      —                                                           ok (forget uploaded data)
=========  ==========================================================  =====================================

The data owner privatizes every example once (cached noise), uploads the dataset, and the model owner then
trains its PEFT-wrapped top with ``transformers.Trainer`` for as many epochs as it likes: everything after the
upload is post-processing of the privatized data. Labels and sequence lengths are sent in the clear.

Example:
    >>> import torch
    >>> from peft import LoraConfig
    >>> from hf_ewtune.testing import tiny_bert
    >>> from hf_ewtune.sap import DChiPrivatizer, LocalTransport, SAPCustomer, SAPVendor, split_model
    >>> bottom, top = split_model(tiny_bert(vocab_size=50), split_layer=1)
    >>> vendor = SAPVendor(top=top, peft_config=LoraConfig(r=4, target_modules=["query", "value"],
    ...                    task_type="SEQ_CLS", modules_to_save=["classifier"]))
    >>> customer = SAPCustomer(bottom=bottom, privatizer=DChiPrivatizer(eta=500.0, seed=0),
    ...                        transport=LocalTransport(vendor.handle))
    >>> data = {"input_ids": torch.randint(5, 50, (8, 6)), "attention_mask": torch.ones(8, 6, dtype=torch.long),
    ...         "labels": torch.randint(0, 2, (8,))}
    >>> customer.upload(data)
    8
    >>> customer.predict(data).shape
    torch.Size([8, 2])
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from hf_ewtune.sap.privatizers import CTIAllocator, DChiPrivatizer
from hf_ewtune.sap.split import SAPBottom
from hf_ewtune.sap.transport import Message, SAPProtocolError

logger = logging.getLogger(__name__)

__all__ = ["SAPCustomer", "SAPVendor", "iter_batches"]

_FIELDS = ("input_ids", "attention_mask", "labels", "token_type_ids", "position_ids")


def _as_padded_tensor(value: Any, pad: int) -> torch.Tensor:
    if torch.is_tensor(value):
        return value
    if len(value) and isinstance(value[0], (list, tuple)):
        t = max(len(r) for r in value)
        value = [list(r) + [pad] * (t - len(r)) for r in value]
    return torch.as_tensor(value)


def iter_batches(data: Any, *, batch_size: int, pad_token_id: int = 0) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(start_index, batch)`` from a dict of tensors/lists or a ``datasets.Dataset``.

    ``label`` is accepted as an alias of ``labels``. Ragged (unpadded) token lists are right-padded per batch
    (``input_ids`` with ``pad_token_id``, the other fields with 0).
    """
    if isinstance(data, Mapping):
        cols = dict(data)
        n = len(cols["input_ids"])
        get = lambda s, e: {k: cols[k][s:e] for k in cols}  # noqa: E731
    else:  # datasets.Dataset or list-like of dicts
        n = len(data)
        get = lambda s, e: data[s:e]  # noqa: E731
    for start in range(0, n, batch_size):
        raw = dict(get(start, min(start + batch_size, n)))
        if "label" in raw and "labels" not in raw:
            raw["labels"] = raw["label"]
        if "input_ids" in raw and "attention_mask" not in raw and not torch.is_tensor(raw["input_ids"]):
            raw["attention_mask"] = [[1] * len(r) for r in raw["input_ids"]]
        batch = {k: _as_padded_tensor(raw[k], pad_token_id if k == "input_ids" else 0)
                 for k in _FIELDS if k in raw and raw[k] is not None}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        yield start, batch


class SAPCustomer:
    """The data owner: runs the frozen bottom, privatizes, uploads, asks for training and predictions.

    Args:
        bottom: The frozen :class:`~hf_ewtune.sap.split.SAPBottom` received from the model owner.
        privatizer: A :class:`~hf_ewtune.sap.privatizers.DChiPrivatizer` (keep its seed secret).
        transport: ``LocalTransport(vendor.handle)`` or ``SocketTransport(port=..., secret=...)`` (see
            :class:`~hf_ewtune.sap.server.SAPServer`).
        cti: Optional fitted :class:`~hf_ewtune.sap.privatizers.CTIAllocator` (label-conditioned rates in
            training, max over classes at inference).
        zero_padding: Zero the bottom output at padding positions before sending (at ``split_layer >= 1`` those
            positions mix in real tokens through attention; the top never reads them).
        pad_token_id: Used to right-pad ragged (unpadded) ``input_ids`` per batch.
    """

    def __init__(self, *, bottom: SAPBottom, privatizer: DChiPrivatizer, transport: Any,
                 cti: CTIAllocator | None = None, zero_padding: bool = True, pad_token_id: int = 0):
        self.bottom = bottom.eval()
        self.pad_token_id = pad_token_id
        self.privatizer = privatizer
        self.transport = transport
        self.cti = cti
        self.zero_padding = zero_padding

    @staticmethod
    def example_ids(batch: Mapping[str, torch.Tensor], *, prefix: str = "train") -> list[str]:
        """Cache keys for a batch: ``prefix`` plus a hash of each example's real token ids.

        Keying by content means the same example always gets the same noise (however it is batched or re-sent),
        and two different examples can never share noise (shared noise would reveal ``h1 - h2`` exactly).
        """
        keys = []
        for row, m in zip(batch["input_ids"], batch["attention_mask"]):
            digest = hashlib.blake2b(row[m.bool()].to(torch.int64).numpy().tobytes(), digest_size=16).hexdigest()
            keys.append(f"{prefix}:{digest}")
        return keys

    @torch.no_grad()
    def privatize_batch(self, batch: Mapping[str, torch.Tensor], *, example_ids: list | None = None,
                        training: bool = True) -> dict[str, torch.Tensor]:
        """Bottom forward + d_chi noise for one batch; returns the tensors that will be sent."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h = self.bottom(input_ids=ids, attention_mask=mask, position_ids=batch.get("position_ids"),
                        token_type_ids=batch.get("token_type_ids")).float()
        if self.zero_padding:
            h = h * mask.unsqueeze(-1).to(h.dtype)
        token_eta = None
        if self.cti is not None:
            token_eta = self.cti.token_eta(ids, batch.get("labels") if training else None)
        out = {"hidden": self.privatizer(h, attention_mask=mask, example_ids=example_ids, token_eta=token_eta),
               "attention_mask": mask.to(torch.int8)}
        if "position_ids" in batch:
            out["position_ids"] = batch["position_ids"].to(torch.int32)
        return out

    def upload(self, data: Any, *, batch_size: int = 32, id_prefix: str = "train") -> int:
        """Privatize and upload a labelled dataset; returns the number of examples the vendor now holds.

        Noise is cached per example (see :meth:`example_ids`), so re-uploading the same data costs no privacy.
        """
        n_held = 0
        for _, batch in iter_batches(data, batch_size=batch_size, pad_token_id=self.pad_token_id):
            if "labels" not in batch:
                raise ValueError("upload() needs labels (a 'labels' or 'label' column).")
            tensors = self.privatize_batch(batch, example_ids=self.example_ids(batch, prefix=id_prefix))
            tensors["labels"] = batch["labels"].to(torch.int64)
            n_held = int(self.transport.request(Message(kind="upload", tensors=tensors)).meta["n_examples"])
        return n_held

    def train(self, **train_args: Any) -> dict[str, Any]:
        """Ask the vendor to train on everything uploaded; returns its metrics (``losses``, ``train_loss``)."""
        reply = self.transport.request(Message(kind="train", meta=train_args))
        return reply.meta

    def fit(self, data: Any, *, batch_size: int = 32, **train_args: Any) -> dict[str, Any]:
        """``upload`` then ``train``."""
        self.upload(data, batch_size=batch_size)
        return self.train(batch_size=batch_size, **train_args)

    def predict(self, data: Any, *, batch_size: int = 64, id_prefix: str = "predict") -> torch.Tensor:
        """Privatized inference through the vendor's tuned top; returns logits ``[N, C]``."""
        outs = []
        for _, batch in iter_batches(data, batch_size=batch_size, pad_token_id=self.pad_token_id):
            tensors = self.privatize_batch(batch, example_ids=self.example_ids(batch, prefix=id_prefix),
                                           training=False)
            outs.append(self.transport.request(Message(kind="predict", tensors=tensors)).tensors["logits"])
        return torch.cat(outs)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


class _PadCollator:
    def __init__(self, padding_side: str = "right"):
        self.padding_side = padding_side

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        t = max(r["attention_mask"].shape[0] for r in rows)
        out: dict[str, list] = {k: [] for k in rows[0]}
        for r in rows:
            pad = t - r["attention_mask"].shape[0]
            for k, v in r.items():
                if k == "labels" and v.dim() == 0:
                    out[k].append(v)
                    continue
                if pad:
                    shape = (pad, *v.shape[1:])
                    fill = torch.full(shape, -100 if k == "labels" else 0, dtype=v.dtype)
                    v = torch.cat([v, fill] if self.padding_side == "right" else [fill, v])
                out[k].append(v)
        return {k: torch.stack(v) for k, v in out.items()}


class SAPVendor:
    """The model owner: holds the top model (with a PEFT adapter) and serves :class:`SAPCustomer` requests.

    Args:
        top: The top model from :func:`~hf_ewtune.sap.split.split_model`.
        peft_config: A ``peft`` config (e.g. ``LoraConfig(r=8, target_modules=["query", "value"],
            task_type="SEQ_CLS", modules_to_save=["classifier"])``); ``None`` trains ``top`` as given.
        trainer_cls: ``transformers.Trainer`` (default) or a subclass such as ``hf_ewtune.DPTrainer`` (its
            ``get_privacy_spent()`` is returned under ``dp_sgd``, separate from the d_chi guarantee).
        training_args: Extra ``TrainingArguments`` keywords (``output_dir`` defaults to a temporary folder).
        trainer_kwargs: Extra keywords for ``trainer_cls`` (e.g. privacy arguments of a DP trainer).
        padding_side: How uploaded examples of different lengths are padded in a batch.
    """

    def __init__(self, *, top: nn.Module, peft_config: Any = None, trainer_cls: type | None = None,
                 training_args: dict[str, Any] | None = None, trainer_kwargs: dict[str, Any] | None = None,
                 padding_side: str = "right"):
        if peft_config is not None:
            from peft import get_peft_model

            top = get_peft_model(top, peft_config)
        self.model = top
        self.trainer_cls = trainer_cls
        self.training_args = dict(training_args or {})
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.padding_side = padding_side
        self.rows: list[dict[str, torch.Tensor]] = []
        self.last_trainer = None

    # ------------------------------------------------------------------ protocol
    def handle(self, message: Message) -> Message:
        """Serve one request (pass ``vendor.handle`` to a transport)."""
        if message.kind == "ping":
            return Message(kind="pong")
        if message.kind == "upload":
            self._store(message.tensors)
            return Message(kind="ok", meta={"n_examples": len(self.rows)})
        if message.kind == "train":
            return Message(kind="train_done", meta=self.train(**message.meta))
        if message.kind == "predict":
            return Message(kind="logits", tensors={"logits": self.predict(message.tensors)})
        if message.kind == "reset":
            self.rows.clear()
            return Message(kind="ok", meta={"n_examples": 0})
        raise SAPProtocolError(f"unknown message kind {message.kind!r}")

    def _store(self, t: Mapping[str, torch.Tensor]) -> None:
        for key in ("hidden", "attention_mask", "labels"):
            if key not in t:
                raise SAPProtocolError(f"upload message lacks the {key!r} tensor.")
        hidden, mask = t["hidden"], t["attention_mask"]
        if hidden.dim() != 3 or mask.shape != hidden.shape[:2] or t["labels"].shape[0] != hidden.shape[0]:
            raise SAPProtocolError(f"inconsistent upload shapes: hidden {tuple(hidden.shape)}, "
                                   f"attention_mask {tuple(mask.shape)}, labels {tuple(t['labels'].shape)}.")
        for i in range(hidden.shape[0]):
            end = hidden.shape[1]
            if self.padding_side == "right" and bool(mask[i].any()):
                end = int(mask[i].nonzero().max()) + 1  # drop trailing padding; batches are re-padded later
            row = {"inputs_embeds": hidden[i, :end].float(), "attention_mask": mask[i, :end].long(),
                   "labels": t["labels"][i].long()}
            if "position_ids" in t:
                row["position_ids"] = t["position_ids"][i, :end].long()
            self.rows.append(row)

    # ------------------------------------------------------------------ training / inference
    def build_trainer(self, *, epochs: float = 1.0, learning_rate: float = 5e-4, batch_size: int = 32, seed: int = 0):
        """A ``Trainer`` (or ``trainer_cls``) over the uploaded privatized examples."""
        from transformers import Trainer, TrainingArguments

        args = {"output_dir": tempfile.mkdtemp(prefix="sap_vendor_"), "num_train_epochs": epochs,
                "learning_rate": learning_rate, "per_device_train_batch_size": batch_size, "seed": seed,
                "logging_steps": 1, "save_strategy": "no", "report_to": "none", "remove_unused_columns": False,
                "label_names": ["labels"], "disable_tqdm": True, "dataloader_num_workers": 0,
                "use_cpu": not torch.cuda.is_available()}
        args.update(self.training_args)
        cls = self.trainer_cls or Trainer
        trainer = cls(model=self.model, args=TrainingArguments(**args), train_dataset=_ListDataset(self.rows),
                      data_collator=_PadCollator(self.padding_side), **self.trainer_kwargs)
        if args.get("disable_tqdm"):
            from transformers.trainer_callback import PrinterCallback

            trainer.remove_callback(PrinterCallback)  # metrics are returned to the customer instead
        return trainer

    def train(self, *, epochs: float = 1.0, learning_rate: float = 5e-4, batch_size: int = 32, seed: int = 0) -> dict:
        """Train the top on everything uploaded; returns ``{"losses": [...], "train_loss": float, "steps": int}``."""
        if not self.rows:
            raise SAPProtocolError("train requested before any upload.")
        trainer = self.build_trainer(epochs=epochs, learning_rate=learning_rate, batch_size=batch_size, seed=seed)
        result = trainer.train()
        self.last_trainer = trainer
        losses = [float(r["loss"]) for r in trainer.state.log_history if "loss" in r]
        self.model.eval()
        out = {"losses": losses, "train_loss": float(result.training_loss), "steps": int(trainer.state.global_step)}
        if hasattr(trainer, "get_privacy_spent"):  # e.g. hf_ewtune.DPTrainer: report its (epsilon, delta) separately
            report = trainer.get_privacy_spent()
            out["dp_sgd"] = {k: v for k, v in getattr(report, "__dict__", {}).items()
                             if isinstance(v, (int, float, str, bool)) or v is None}
        return out

    @torch.no_grad()
    def predict(self, t: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits for one privatized batch (``hidden``, ``attention_mask``, optional ``position_ids``)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        kwargs = {"inputs_embeds": t["hidden"].float().to(device), "attention_mask": t["attention_mask"].long().to(device)}
        if "position_ids" in t:
            kwargs["position_ids"] = t["position_ids"].long().to(device)
        return self.model(**kwargs).logits.float().cpu()
