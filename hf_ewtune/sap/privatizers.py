"""d_chi-privacy (metric local DP) for token representations, and CTI importance-adaptive budgets.

The mechanism adds, to each token vector ``h`` independently, noise ``z = r * u`` with ``u`` uniform on the
unit sphere (a normalised Gaussian) and ONE radius per token ``r ~ Gamma(shape=d, rate=eta)``, so that the
noise density is proportional to ``exp(-eta * ||z||)`` and ``E||z|| = d / eta``, ``sd||z|| = sqrt(d) / eta``.
A token position is then ``eta * ||h - h'||``-indistinguishable from any other vector ``h'``.

This is **not** (epsilon, delta)-DP on examples and must never be fed to a DP-SGD accountant.

Example:
    >>> import torch
    >>> from hf_ewtune.sap import DChiPrivatizer
    >>> priv = DChiPrivatizer(eta=100.0, seed=0)
    >>> z = priv(torch.zeros(20, 50, 64))
    >>> abs(float(z.norm(dim=-1).mean()) - 64 / 100.0) < 0.01  # E||z|| = d / eta
    True
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import torch

from hf_ewtune.errors import PrivacyConfigError

logger = logging.getLogger(__name__)

__all__ = ["DChiPrivatizer", "CTIAllocator", "DChiGuarantee", "eta_for_relative_noise", "sample_dchi_noise",
           "dchi_log_density"]


def dchi_log_density(z: torch.Tensor, *, eta: float) -> torch.Tensor:
    """``log p(z)`` of the d_chi noise, ``p(z) = c exp(-eta ||z||)`` with ``c = eta^d Gamma(d/2) / (2 pi^(d/2) Gamma(d))``.

    Example:
        >>> float(dchi_log_density(torch.zeros(1, 2), eta=1.0))  # 2-d: c = 1 / (2 pi)
        -1.8378770664093453
    """
    d = z.shape[-1]
    log_c = d * math.log(eta) + math.lgamma(d / 2) - math.log(2) - (d / 2) * math.log(math.pi) - math.lgamma(d)
    return log_c - eta * z.double().norm(dim=-1)


def eta_for_relative_noise(*, alpha: float, mean_norm: float, d: int) -> float:
    """The rate ``eta`` giving expected noise norm ``alpha * mean_norm``: ``eta = d / (alpha * mean_norm)``.

    Args:
        alpha: Relative noise ``E||z|| / E||h||`` (e.g. 0.03 is mild, 1.0 is as large as the signal).
        mean_norm: Mean L2 norm of the (non-padding) token representations ``E||h||``.
        d: Representation dimension.

    Example:
        >>> eta_for_relative_noise(alpha=0.5, mean_norm=28.0, d=768)
        54.857142857142854
    """
    if alpha <= 0 or mean_norm <= 0 or d <= 0:
        raise PrivacyConfigError(
            f"eta_for_relative_noise needs alpha > 0, mean_norm > 0 and d > 0 (got alpha={alpha}, "
            f"mean_norm={mean_norm}, d={d})."
        )
    return d / (alpha * mean_norm)


def sample_dchi_noise(shape: Sequence[int], eta: float | torch.Tensor, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """Draw d_chi noise of shape ``[..., d]`` with one Gamma radius per vector.

    Args:
        shape: Output shape; the last entry is the dimension ``d``.
        eta: Rate, a float or a tensor broadcastable to ``shape[:-1]``. ``inf`` gives zero noise.
        generator: Optional ``torch.Generator`` for reproducible draws (the global RNG is never touched
            when it is given).

    Example:
        >>> z = sample_dchi_noise((1000, 16), 8.0, generator=torch.Generator().manual_seed(0))
        >>> round(float(z.norm(dim=-1).mean()))  # d / eta = 2
        2
    """
    shape = tuple(int(s) for s in shape)
    d = shape[-1]
    lead = shape[:-1]
    eta_t = torch.as_tensor(eta, dtype=torch.float64, device=device).expand(lead) if lead else torch.as_tensor(
        eta, dtype=torch.float64, device=device)
    if bool((eta_t <= 0).any()) or bool(torch.isnan(eta_t).any()):
        raise PrivacyConfigError("eta must be > 0 everywhere (use float('inf') for 'no noise').")
    g = torch.randn(shape, generator=generator, dtype=torch.float64, device=device)
    u = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    finite = torch.isfinite(eta_t)
    safe_rate = torch.where(finite, eta_t, torch.ones_like(eta_t))
    # ONE radius per vector; torch's Gamma takes a RATE (numpy / random.gammavariate take a scale).
    seed = None if generator is None else int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        r = torch.distributions.Gamma(torch.full_like(safe_rate, float(d)), safe_rate).sample()
    r = torch.where(finite, r, torch.zeros_like(r))
    return (u * r.unsqueeze(-1)).to(dtype)


@dataclass
class DChiGuarantee:
    """What a :class:`DChiPrivatizer` promises (per token position, metric local DP).

    Attributes:
        eta: Base per-token rate (the mechanism is ``eta * ||h - h'||``-private per token).
        eta_max: Largest per-token rate actually used (differs from ``eta`` under CTI; ``inf`` means some tokens
            were left unperturbed and have no protection).
        draws_per_example: Largest number of independent noise draws any example received (1 with caching).
        effective_eta: ``draws_per_example * eta_max`` (basic composition over repeated draws).
        note: Plain-language statement.
    """

    eta: float
    eta_max: float
    draws_per_example: int
    effective_eta: float
    cached: bool
    note: str = field(default="")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class DChiPrivatizer:
    """Add d_chi noise to token representations ``[batch, tokens, dim]``.

    Args:
        eta: Base rate (> 0). Larger means less noise: ``E||z|| = d / eta``.
        cache_per_example: Draw noise once per example id and reuse it (default). Re-drawing in every epoch
            lets the receiver average the noise away; then the reported guarantee is ``T * eta``.
        seed: Seed of the privatizer's own generator (the global RNG is not used). Keep it secret.
        project_to_vocab: If set, snap each noisy vector to its nearest row of ``vocab_embeddings`` (the
            product's text-to-text variant; only meaningful at ``split_layer == 0``).
        vocab_embeddings: ``[V, d]`` table for ``project_to_vocab``.

    Example:
        >>> import torch
        >>> priv = DChiPrivatizer(eta=50.0, seed=1)
        >>> h = torch.randn(2, 4, 8); mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
        >>> out = priv(h, attention_mask=mask, example_ids=[10, 11])
        >>> bool(torch.equal(out[0, 3], h[0, 3]))  # padding untouched
        True
        >>> bool(torch.equal(priv(h, attention_mask=mask, example_ids=[10, 11]), out))  # cached
        True
    """

    def __init__(self, *, eta: float, cache_per_example: bool = True, seed: int | None = None,
                 project_to_vocab: bool = False, vocab_embeddings: torch.Tensor | None = None):
        if not (isinstance(eta, (int, float)) and eta > 0):
            raise PrivacyConfigError(f"eta must be a number > 0 (got {eta!r}); use eta=float('inf') for no noise.")
        if project_to_vocab and vocab_embeddings is None:
            raise PrivacyConfigError("project_to_vocab=True needs vocab_embeddings=<[V, d] embedding table>.")
        self.eta = float(eta)
        self.cache_per_example = cache_per_example
        self.project_to_vocab = project_to_vocab
        self.vocab_embeddings = None if vocab_embeddings is None else vocab_embeddings.detach().float()
        self._generator = torch.Generator()
        self._generator.manual_seed(seed if seed is not None else int(torch.seed() % (2**62)))
        self._cache: dict[Hashable, torch.Tensor] = {}
        self._draws: Counter = Counter()
        self._anonymous_calls = 0
        self._eta_max_seen = 0.0

    # ------------------------------------------------------------------ sampling
    def sample_noise(self, shape: Sequence[int], eta: float | torch.Tensor | None = None) -> torch.Tensor:
        """Fresh noise ``[B, T, d]`` with one Gamma(d, rate=eta) radius per (b, t); ``eta`` defaults to ``self.eta``."""
        return sample_dchi_noise(shape, self.eta if eta is None else eta, generator=self._generator)

    def __call__(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                 example_ids: Iterable[Hashable] | None = None, token_eta: torch.Tensor | None = None) -> torch.Tensor:
        return self.privatize(hidden, attention_mask=attention_mask, example_ids=example_ids, token_eta=token_eta)

    def privatize(self, hidden: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                  example_ids: Iterable[Hashable] | None = None, token_eta: torch.Tensor | None = None) -> torch.Tensor:
        """Return a privatized copy of ``hidden`` (``[B, T, d]``); padding positions (mask 0) are untouched.

        Args:
            hidden: Token representations.
            attention_mask: ``[B, T]``; positions with 0 get no noise.
            example_ids: One hashable id per example; required for caching (without ids every call draws fresh
                noise and is counted as a separate use).
            token_eta: Optional per-token rates ``[B, T]`` (e.g. from :class:`CTIAllocator`); defaults to ``eta``.
        """
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [batch, tokens, dim], got shape {tuple(hidden.shape)}")
        b, t, d = hidden.shape
        mask = torch.ones(b, t, dtype=torch.bool) if attention_mask is None else attention_mask.detach().cpu().bool()
        eta = torch.full((b, t), self.eta, dtype=torch.float64) if token_eta is None else \
            torch.as_tensor(token_eta, dtype=torch.float64).detach().cpu().expand(b, t)
        if bool(mask.any()):
            self._eta_max_seen = max(self._eta_max_seen, float(eta[mask].max()))
        ids = None if example_ids is None else list(example_ids)
        if ids is not None and len(ids) != b:
            raise ValueError(f"example_ids has {len(ids)} entries for a batch of {b}.")
        noise = torch.zeros(b, t, d, dtype=torch.float32)
        for i in range(b):
            m = mask[i]
            n_real = int(m.sum())
            key = None if ids is None else ids[i]
            cached = self._cache.get(key) if (self.cache_per_example and key is not None) else None
            if cached is not None and cached.shape[0] == n_real:
                z = cached
            else:
                if cached is not None:
                    raise ValueError(f"example id {key!r} was privatized before with {cached.shape[0]} real tokens, "
                                     f"now has {n_real}; ids must identify examples uniquely.")
                z = sample_dchi_noise((n_real, d), eta[i][m], generator=self._generator)
                if key is not None:
                    self._draws[key] += 1
                    if self.cache_per_example:
                        self._cache[key] = z
                else:
                    self._anonymous_calls += 1
            noise[i, m] = z
        out = hidden.detach().float().cpu() + noise
        if self.project_to_vocab:
            out = self._project(out)
        out = torch.where(mask.unsqueeze(-1), out, hidden.detach().float().cpu())
        return out.to(device=hidden.device, dtype=hidden.dtype)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        table = self.vocab_embeddings
        flat = x.reshape(-1, x.shape[-1])
        idx = torch.cat([torch.cdist(c, table).argmin(-1) for c in flat.split(4096)])
        return table[idx].reshape(x.shape)

    # ------------------------------------------------------------------ reporting
    def clear_cache(self) -> None:
        """Forget cached noise (the next use of an example draws again and counts as a further use)."""
        self._cache.clear()

    def guarantee(self, *, uses: int | None = None) -> DChiGuarantee:
        """The per-token guarantee so far.

        Args:
            uses: Override for the number of independent draws per example (e.g. the number of epochs when
                examples were privatized without ids and caching off).
        """
        draws = max(self._draws.values(), default=1)
        if self._anonymous_calls and not self.cache_per_example and uses is None:
            logger.warning("privatize() was called without example_ids; pass uses=<epochs> to guarantee() "
                           "for the composed rate.")
        if uses is not None:
            draws = int(uses)
        eta_max = self._eta_max_seen or self.eta
        note = (f"metric local DP per token position: eta={self.eta:g} (max {eta_max:g}) times ||h - h'||_2; "
                "a sequence composes as eta * sum_i ||h_i - h'_i||; not (epsilon, delta)-DP on examples")
        if draws > 1:
            note += f"; each example was noised {draws} times, so the composed rate is {draws} * eta_max"
        if math.isinf(eta_max):
            note += "; some tokens were left unperturbed (eta = inf) and have no protection"
        return DChiGuarantee(eta=self.eta, eta_max=eta_max, draws_per_example=draws,
                             effective_eta=draws * eta_max, cached=self.cache_per_example, note=note)


class CTIAllocator:
    """Contributing-token identification: per-token rates from label-conditioned token statistics.

    ``mapping="linear"`` (default, Volcengine ``CTIBudgetAllocator``):
    ``UI[c,t] = sum_{c' != c} ln(p[c,t] / (p[c',t] + 3 xi))`` (0 for unseen), ``xi = 1 / max_c N_c``,
    ``eta[c,t] = max(UI[c,t], floor) * eta_base``. ``mapping="sigmoid"``: ``UI`` is the mean log-ratio with +1
    smoothing and ``eta = 2 eta_base sigmoid(UI)``. ``mode="exempt_topk"`` (SnP reimplementation) leaves the top
    ``exempt_fraction`` tokens per class **unperturbed** (no protection; warns loudly).

    Training uses the example's label; inference (label unknown) uses the max over classes.
    The table is computed from private data and must stay with the data owner.

    Example:
        >>> import torch
        >>> cti = CTIAllocator(eta_base=100.0).fit([[5, 5, 7], [6, 7]], [0, 1], vocab_size=10)
        >>> cti.token_eta(torch.tensor([[5, 7]]), labels=torch.tensor([0])).shape
        torch.Size([1, 2])
    """

    def __init__(self, *, eta_base: float, floor: float = 0.6, mapping: str = "linear", mode: str = "scale",
                 exempt_fraction: float = 0.01):
        if eta_base <= 0:
            raise PrivacyConfigError(f"eta_base must be > 0, got {eta_base}.")
        if mapping not in ("linear", "sigmoid"):
            raise PrivacyConfigError(f"mapping must be 'linear' or 'sigmoid', got {mapping!r}.")
        if mode not in ("scale", "exempt_topk"):
            raise PrivacyConfigError(f"mode must be 'scale' or 'exempt_topk', got {mode!r}.")
        if mode == "exempt_topk":
            warnings.warn("CTIAllocator(mode='exempt_topk') leaves the top tokens per class UNPERTURBED: they have "
                          "no protection at all and eta_max is infinite.", UserWarning, stacklevel=2)
        self.eta_base = float(eta_base)
        self.floor = floor
        self.mapping = mapping
        self.mode = mode
        self.exempt_fraction = exempt_fraction
        self.ui: torch.Tensor | None = None
        self.eta_table: torch.Tensor | None = None  # [C, V]

    def fit(self, input_ids: Iterable[Sequence[int]] | torch.Tensor, labels: Sequence[int] | torch.Tensor, *,
            vocab_size: int, attention_mask: torch.Tensor | None = None) -> "CTIAllocator":
        """Count tokens per class (special tokens included) and build the ``[C, V]`` rate table."""
        labels = [int(x) for x in (labels.tolist() if torch.is_tensor(labels) else labels)]
        if torch.is_tensor(input_ids):
            rows = [row[attention_mask[i].bool()].tolist() if attention_mask is not None else row.tolist()
                    for i, row in enumerate(input_ids)]
        else:
            rows = [list(r) for r in input_ids]
        if len(rows) != len(labels):
            raise ValueError(f"input_ids has {len(rows)} examples but labels has {len(labels)}.")
        classes = sorted(set(labels))
        cidx = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        counts = torch.zeros(len(classes), vocab_size, dtype=torch.float64)
        for row, y in zip(rows, labels):
            counts[cidx[y]].index_add_(0, torch.as_tensor(row, dtype=torch.long), torch.ones(len(row), dtype=torch.float64))
        n_c = counts.sum(1, keepdim=True)
        C = len(classes)
        if self.mapping == "linear":
            p = counts / n_c.clamp_min(1)
            xi = 1.0 / float(n_c.max())
            ui = torch.zeros_like(p)
            for c in range(C):
                for c2 in range(C):
                    if c2 != c:
                        ui[c] += torch.log(p[c].clamp_min(1e-300) / (p[c2] + 3 * xi))
            ui = torch.where(counts > 0, ui, torch.zeros_like(ui))
            eta = torch.clamp(ui, min=self.floor) * self.eta_base
        else:
            p = (counts + 1) / (n_c + vocab_size)
            ui = torch.zeros_like(p)
            for c in range(C):
                for c2 in range(C):
                    if c2 != c:
                        ui[c] += torch.log(p[c] / p[c2])
            ui = ui / max(C - 1, 1)
            eta = 2 * self.eta_base * torch.sigmoid(ui)
        if self.mode == "exempt_topk":
            eta = torch.full_like(ui, self.eta_base)
            k = max(1, int(round(self.exempt_fraction * int((counts > 0).sum(1).max()))))
            for c in range(C):
                seen = counts[c] > 0
                score = torch.where(seen, ui[c], torch.full_like(ui[c], -math.inf))
                eta[c, score.topk(k).indices] = math.inf
        self.ui, self.eta_table = ui, eta
        return self

    @property
    def eta_max(self) -> float:
        """Largest rate in the table (the worst-case per-token guarantee)."""
        self._check()
        return float(self.eta_table.max())

    def _check(self):
        if self.eta_table is None:
            raise PrivacyConfigError("CTIAllocator is not fitted: call fit(input_ids, labels, vocab_size=...) first.")

    def token_eta(self, input_ids: torch.Tensor, labels: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Per-token rates ``[B, T]``: label-conditioned when ``labels`` is given, else the max over classes."""
        self._check()
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if labels is None:
            table = self.eta_table.max(0).values
            return table[ids]
        rows = torch.as_tensor([self.classes.index(int(y)) for y in torch.as_tensor(labels).tolist()])
        return self.eta_table[rows.unsqueeze(1), ids]
