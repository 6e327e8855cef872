"""Split-and-Privatize (SAP): split a model, privatize token representations with d_chi noise, train the top.

The data owner runs the frozen bottom of the model and uploads d_chi-privatized representations; the model
owner trains a PEFT adapter on the top. The guarantee is metric local DP per token position (``eta``), not
(epsilon, delta)-DP, and it is reported separately from any DP-SGD accounting; empirical privacy is measured
with inversion attacks (:mod:`hf_ewtune.sap.attacks`).

Example:
    >>> import torch
    >>> from hf_ewtune.sap import DChiPrivatizer, split_model
    >>> from hf_ewtune.testing import tiny_bert
    >>> bottom, top = split_model(tiny_bert(vocab_size=50), split_layer=0)
    >>> h = DChiPrivatizer(eta=200.0, seed=0)(bottom(input_ids=torch.tensor([[2, 5, 3]])))
    >>> top(inputs_embeds=h).logits.shape
    torch.Size([1, 2])
"""

from hf_ewtune.sap.attacks import LearnedInversion, empirical_privacy, median_nn_distance, nn_inversion
from hf_ewtune.sap.auth import SAPAuthenticationError, generate_secret
from hf_ewtune.sap.privatizers import (
    CTIAllocator,
    DChiGuarantee,
    DChiPrivatizer,
    eta_for_relative_noise,
    sample_dchi_noise,
)
from hf_ewtune.sap.roles import SAPCustomer, SAPVendor
from hf_ewtune.sap.server import SAPServer
from hf_ewtune.sap.split import SAPBottom, split_model
from hf_ewtune.sap.transport import LocalTransport, Message, SAPProtocolError, SocketTransport, serve

__all__ = [
    "CTIAllocator", "DChiGuarantee", "DChiPrivatizer", "LearnedInversion", "LocalTransport", "Message",
    "SAPAuthenticationError", "SAPBottom", "SAPCustomer", "SAPProtocolError", "SAPServer", "SAPVendor",
    "SocketTransport", "empirical_privacy", "eta_for_relative_noise", "generate_secret", "median_nn_distance",
    "nn_inversion", "sample_dchi_noise", "serve", "split_model",
]
