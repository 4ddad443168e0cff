"""Per-vertex feature stores: learned b-bit indices into a codebook, or plain float vectors.

A store holds one feature vector per row (a grid vertex or a hash-table slot) and answers
``store(rows) -> features``. Two stores share that interface so that a grid can be built with
either, and a grid can prune rows (``remap``) without knowing which store it holds:

- :class:`CodebookFeatures` (VQAD): each row holds logits over ``2**index_bits`` codewords. The forward
  pass uses the hard codeword (argmax), the backward pass the softmax relaxation
  (straight-through estimator), so the loss sees exactly what will be stored. It can start from a
  float warm-up: free float rows that k-means then turns into the codebook and the indices, except a share of
  float rows it may keep (those whose quantisation would cost the loss most, as VQRF keeps its important voxels).
  A frozen store (a decoded file) holds each row's index as an integer instead of its logits.
- :class:`FloatFeatures`: each row holds a float vector; the uncompressed reference.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from vqad_nerfstudio.encodings import index_factors as factored
from vqad_nerfstudio.encodings.kmeans import vector_quantize
from vqad_nerfstudio.encodings.straight_through import (
    StepIndices,
    codeword_table,
    hard_indices_of,
    rounded_codebooks,
    soft_codewords,
    soft_index_rate_bits,
    step_indices,
    step_indices_of_sums,
    straight_through_codewords,
    straight_through_codewords_and_rate,
    straight_through_lookup,
)
from vqad_nerfstudio.kernels import relaxed_indices
from vqad_nerfstudio.kernels.captured import CapturedWork, place
from vqad_nerfstudio.rounding import QUANTIZED_BITS, straight_through, straight_through_group
from vqad_nerfstudio.transient_state import TransientState


class FeatureStore(nn.Module):
    """Common interface of the per-row feature stores."""

    feature_dim: int

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        raise NotImplementedError

    def table(self) -> Float[Tensor, "m k"]:
        """The feature of every row, as :meth:`forward` gives it (and with its gradients): for kernels that
        gather rows themselves."""
        raise NotImplementedError

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        """Rebuild the rows: new row i copies old row ``source_rows[i]``, or is freshly initialised where -1.

        By default the row parameters are replaced by new ``nn.Parameter`` objects (autograd caches a
        parameter's shape, so a used parameter cannot change shape in place) and the (old, new) pairs
        are returned so that optimisers can follow. ``in_place=True`` keeps the objects and changes
        ``.data``; it is only safe before the parameters took part in a backward pass (loading).
        """
        raise NotImplementedError

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """This store's parameters by optimiser group: ``grid_logits``, ``grid_features``, ``codebooks``."""
        raise NotImplementedError

    def hold_indices(self, hold: bool) -> None:
        """Reuse what the tables derive from learned indices until ``hold_indices(False)`` (stores without learned
        indices hold nothing)."""


ParameterSwap = Tuple[nn.Parameter, nn.Parameter]
"""(old, new) parameter after a row remap."""


def check_codewords(
    codebook: Tensor, indices: Tensor, like: Tensor, rows: int, choices: int, frozen: bool, what: str
) -> None:
    """``ValueError`` naming ``what`` unless it is frozen, ``codebook`` is shaped ``like`` its codebook and ``indices``
    are ``rows`` indices in ``[0, choices)``."""
    if not frozen:
        raise ValueError(f"{what}: decoded codewords load into frozen indices only (frozen_indices), not into logits")
    if codebook.shape != like.shape or indices.shape != (rows,):
        raise ValueError(
            f"{what}: expected a codebook {tuple(like.shape)} and {rows} indices, "
            f"got {tuple(codebook.shape)} and {tuple(indices.shape)}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= choices):
        raise ValueError(f"{what}: indices must lie in [0, {choices})")


def rows_from(values: Tensor, source_rows: Int[Tensor, "m_new"]) -> Tensor:
    """New row ``i`` is ``values[source_rows[i]]``, or zero where ``source_rows[i]`` is -1: gathered straight into
    one new tensor (no full-size temporary beside it, which at 10-bit indices would be 4 kB a row)."""
    keep = source_rows >= 0
    if values.shape[0] == 0 or not bool(keep.any()):
        return values.new_zeros(source_rows.shape[0], *values.shape[1:])
    rows = values.index_select(0, source_rows.clamp_min(0))
    rows[~keep] = 0
    return rows


def _remap_rows(
    module: nn.Module,
    name: str,
    source_rows: Int[Tensor, "m_new"],
    fresh: Optional[Callable[[int], Tensor]],
    in_place: bool,
) -> List[ParameterSwap]:
    """Make parameter ``name`` of ``module`` the rows :func:`rows_from` gives, with ``fresh(n)`` for the ``n`` new
    rows (where ``source_rows`` is -1; zero if ``fresh`` is None), in place or as a new parameter whose swap is
    returned."""
    param: nn.Parameter = getattr(module, name)
    new = rows_from(param.data, source_rows)
    new_rows = source_rows < 0
    if fresh is not None and bool(new_rows.any()):
        new[new_rows] = fresh(int(new_rows.sum())).to(new)
    return _replace_parameter(module, name, new, in_place)


def _normal_rows(width: int, std: float, device: torch.device) -> Callable[[int], Tensor]:
    """Makes ``n`` fresh rows of ``width`` normal values of standard deviation ``std``."""
    return lambda n: torch.randn(n, width, device=device) * std


def _replace_parameter(module: nn.Module, name: str, new: Tensor, in_place: bool) -> List[ParameterSwap]:
    """Make ``new`` the data of parameter ``name`` of ``module``: in place (same parameter, no gradient), or as a new
    parameter whose swap is returned for optimisers to follow."""
    param: nn.Parameter = getattr(module, name)
    if in_place:
        param.data = new
        param.grad = None
        return []
    replacement = nn.Parameter(new, requires_grad=param.requires_grad)
    setattr(module, name, replacement)
    return [(param, replacement)]


class CodebookFeatures(TransientState, FeatureStore):
    """``num_rows`` learned ``index_bits``-bit indices into a codebook of ``2**index_bits`` vectors of width
    ``feature_dim``.

    ``temperature`` (softmax temperature of the relaxation) and ``relaxed`` (soft codewords in the
    forward pass too, in training mode only) are training-schedule state set by the model; in eval
    mode lookups always use the hard indices, as a decoded file does.

    ``float_warmup=True`` adds a float row table (the float twin's features) that lookups read instead,
    until :meth:`quantize_float_warmup` turns it into the codebook (k-means) and the indices (nearest
    codeword) and empties it. Until then the logits are empty (no rows): with 10-bit indices they would hold 4 kB
    per row that nothing reads.

    A store may keep some rows in float (:meth:`quantize_float_warmup`'s ``float_fraction``): their lookups read
    ``float_features`` instead of their codeword, and their indices, still stored, carry nothing.

    ``frozen=True`` holds every row's index as an int32 (the ``indices`` buffer) instead of ``2**index_bits`` float
    logits (``logits`` is None): what a decoded file holds, in memory in proportion to the file. The codebook can
    still train; the indices cannot, and there is no warm-up. :meth:`freeze_indices` turns a trained store into a
    frozen one (its ``logits`` then an empty parameter).

    ``codebook_bits`` (2..8) makes lookups read the codebook rounded to that many bits per value, one scale per
    feature channel, as a file stores it (:mod:`vqad_nerfstudio.rounding`), with straight-through gradients to the
    float codebook; None reads it as it is (fp16 in a file).

    ``fuse_rate=True`` computes the index rate in :meth:`table`'s pass (for a loss with the rate term).
    ``use_kernels=False`` keeps the softmax side of the indices on the PyTorch reference path on a GPU too.
    ``logit_dtype`` is the logits' storage (float16: half the memory and bytes of float32; every computation on them
    is float32, and Adam's updates round stochastically, see :mod:`vqad_nerfstudio.optim`).
    ``index_factors=2`` learns each index as two ``index_bits / 2``-bit factors
    (:mod:`~vqad_nerfstudio.encodings.index_factors`): ``2 * 2**(b/2)`` logits a row instead of ``2**b``, the same
    codebook and hard indices; on the GPU its Adam pass has a kernel of its own, the rest runs in PyTorch.
    """

    temperature: float = 1.0
    relaxed: bool = False
    TRANSIENT = frozenset(
        {"temperature", "relaxed", "_rate_of_table", "_held_indices", "_held_table", "_held_codebook", "_holding",
         "_hard_table", "_forecast"}
    )  # fmt: skip

    def __init__(
        self,
        num_rows: int,
        index_bits: int,
        feature_dim: int,
        logit_init_std: float = 0.01,
        codebook_init_std: float = 0.01,
        float_warmup: bool = False,
        frozen: bool = False,
        fuse_rate: bool = False,
        use_kernels: bool = True,
        codebook_bits: Optional[int] = None,
        logit_dtype: torch.dtype = torch.float32,
        index_factors: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= index_bits <= 16:
            raise ValueError(f"index_bits must be in 1..16, got {index_bits}")
        factored.check_factors(index_bits, index_factors)
        if codebook_bits is not None and codebook_bits not in QUANTIZED_BITS:
            raise ValueError(f"codebook_bits must be None (as trained) or 2..8, got {codebook_bits!r}")
        self.codebook_bits = codebook_bits
        """None: lookups read the codebook as it is; 2..8: rounded per feature channel to that many bits."""
        self.index_bits = index_bits
        self.index_factors = index_factors
        """Factors each index is learned as (1: ``2**b`` logits a row; 2: two ``2**(b/2)``-way factors)."""
        self.feature_dim = feature_dim
        self.logit_init_std = logit_init_std
        self.codebook_init_std = codebook_init_std
        self.frozen = frozen
        self.logits: Optional[nn.Parameter]
        self.indices: Optional[Tensor]
        self._float_warmup = float_warmup and not frozen
        if frozen:
            self.register_parameter("logits", None)
            self.register_buffer("indices", torch.zeros(num_rows, dtype=torch.int32))
        else:
            logit_rows = 0 if self._float_warmup else num_rows
            width = factored.logit_width(index_bits, index_factors)
            self.logits = nn.Parameter((torch.randn(logit_rows, width) * logit_init_std).to(logit_dtype))
            self.register_buffer("indices", None)
        self.codebook = nn.Parameter(torch.randn(2**index_bits, feature_dim) * codebook_init_std)
        warmup_rows = num_rows if self._float_warmup else 0
        self.warmup_features = nn.Parameter(torch.randn(warmup_rows, feature_dim) * codebook_init_std)
        self.float_features = nn.Parameter(torch.zeros(0, feature_dim))
        """Every row's float features where some rows are kept in float (``float_rows``), else empty."""
        self.register_buffer("float_rows", torch.zeros(0, dtype=torch.bool))
        """Which rows read ``float_features`` instead of their codeword (empty: none)."""
        self.fuse_rate = fuse_rate
        """Whether :meth:`table` in training also computes the index rate, which the next :meth:`index_rate_bits`
        returns: both gradients then share one buffer (with 8-bit indices 1 GB per million rows less at the peak)."""
        self.use_kernels = use_kernels
        """Whether the softmax side of the indices runs as :mod:`vqad_nerfstudio.kernels.relaxed_indices` on a GPU."""
        self._rate_of_table: Optional[Tuple[Tensor, int]] = None
        """The rate the last :meth:`table` computed, and the logits' version it belongs to."""
        self._held_indices: Optional[StepIndices] = None
        """Inside :meth:`hold_indices`, the :func:`step_indices` of the first training table without gradients."""
        self._held_table: Optional[Tensor] = None
        """Inside :meth:`hold_indices`, the codewords of the held indices, gathered by the first training table without
        gradients (the graded table returns them: the step gathers them once)."""
        self._held_codebook: Optional[Tensor] = None
        """Inside :meth:`hold_indices`, the codebook rounded to ``codebook_bits`` by the step's first lookup."""
        self._holding = False
        self._hard_table: Optional[Tuple[Tuple, Tensor]] = None
        """In eval mode, the hard table of the first lookup without gradients, and the parameters' state it belongs to
        (kept until the mode changes or the parameters are replaced: renders then share one table)."""
        self.update_graph = CapturedWork(slots=1)
        """Replays the straight-through backward pass's in-backward Adam update of the logits and the codebook
        gradient on the GPU (see :func:`straight_through_codewords`; one graph: the logits' last place); disabled:
        launched one by one."""
        self._forecast: Optional[Tuple[Tensor, Tensor, Tuple]] = None
        """The hard indices and soft-index column sums that the last in-backward Adam update of the logits forecast
        on the GPU, and the logits' state and temperature they hold for: the next step's indices, without a pass
        over the logits (:meth:`_indices_of_step`)."""

    @property
    def num_rows(self) -> int:
        if self.frozen:
            return self.indices.shape[0]
        return self.warmup_features.shape[0] if self._float_warmup else self.logits.shape[0]

    def train(self, mode: bool = True) -> "CodebookFeatures":
        # optimisers may change the codebook in place without a version bump (fused Adam). The forecast stays: it
        # is checked against the logits' version, and nerfstudio's trainer calls train() before every step.
        self._hard_table = None
        return super().train(mode)

    @property
    def in_float_warmup(self) -> bool:
        """Whether lookups still read the float warm-up rows (see :meth:`quantize_float_warmup`). A store without
        rows yet (a level the first pruning grows) built with a warm-up is in it: the rows it grows start float."""
        return self._float_warmup

    @property
    def has_float_rows(self) -> bool:
        """Whether some rows are kept in float (see :meth:`quantize_float_warmup`)."""
        return self.float_rows.shape[0] > 0

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        codewords = self._codewords(rows)
        if not self.has_float_rows:
            return codewords
        kept = self.float_rows.index_select(0, rows)[:, None]
        return torch.where(kept, self.float_features.index_select(0, rows), codewords)

    def table(self) -> Float[Tensor, "m k"]:
        codewords = self._codeword_table()
        if not self.has_float_rows:
            return codewords
        return torch.where(self.float_rows[:, None], self.float_features, codewords)

    def hold_indices(self, hold: bool) -> None:
        """From now until ``hold_indices(False)``, training tables compute the hard indices (and with ``fuse_rate``
        the rate) once: a training step's density pass without gradients and its graded pass then read the logits
        once instead of twice. The logits and the temperature must not change meanwhile."""
        self._holding = hold
        self._held_indices = None
        self._held_table = None
        self._held_codebook = None

    def lookup_codebook(self) -> Float[Tensor, "c k"]:
        """The codebook as lookups read it: rounded to ``codebook_bits`` per feature channel (once inside
        :meth:`hold_indices`), gradients straight through to the float codebook; as it is without ``codebook_bits``."""
        if self.codebook_bits is None:
            return self.codebook
        rounded = self._held_codebook
        if rounded is None:
            rounded = rounded_codebooks(self.codebook, self.codebook_bits, self.use_kernels)
            if self._holding:
                self._held_codebook = rounded
        return straight_through(self.codebook, rounded)

    def _logit_state(self, temperature: float) -> Tuple:
        """What a forecast of the indices must match: the logits' storage, shape and version, and the temperature."""
        return self.logits.data_ptr(), self.logits.shape, self.logits._version, temperature

    def _keep_forecast(self, hard: Int[Tensor, "m"], sums: Float[Tensor, "c"], temperature: float) -> None:
        """Keep the indices an in-backward Adam update forecast at ``temperature`` for the logits it has just
        updated."""
        self._forecast = hard, sums, self._logit_state(temperature)

    def _table_from_held_state(self) -> bool:
        """Whether this step's training table can be derived without reading the logits (on the kernels' path):
        from frozen indices, or from a forecast that holds for the logits as they are (:func:`prepare_held_steps`)."""
        if not (self.training and self._holding and self.use_kernels and relaxed_indices.available(self.codebook)):
            return False
        if self.in_float_warmup or self.relaxed:
            return False
        forecast = self._forecast
        return self.frozen or (forecast is not None and forecast[2] == self._logit_state(self.temperature))

    def _take_forecast(self) -> Tuple[Tensor, Tensor]:
        """The forecast hard indices and soft-index sums, consumed (see :meth:`_table_from_held_state`)."""
        assert self._forecast is not None
        hard, sums, _ = self._forecast
        self._forecast = None
        return hard, sums

    def _indices_of_step(self) -> StepIndices:
        """:func:`step_indices` of the logits as they are, held inside :meth:`hold_indices`: the last update's
        forecast where it holds for them, else one pass over the logits."""
        if self._held_indices is not None:
            return self._held_indices
        with_rate = self.fuse_rate and self._holding
        forecast, self._forecast = self._forecast, None
        if forecast is not None and forecast[2] == self._logit_state(self.temperature):
            known = step_indices_of_sums(forecast[0], forecast[1], with_rate)
        else:
            known = step_indices(self.logits, self.temperature, with_rate, self.use_kernels, self.index_factors)
        if self._holding:
            self._held_indices = known
        return known

    def _hard_table_of_step(self) -> Float[Tensor, "m k"]:
        """The codewords of :meth:`_indices_of_step`'s hard indices, held with them inside :meth:`hold_indices`."""
        if self._held_table is not None:
            return self._held_table
        table = codeword_table(self.lookup_codebook(), self._indices_of_step()[0], self.use_kernels)
        if self._holding:
            self._held_table = table
        return table

    def _codewords(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        """:meth:`forward` without the rows kept in float."""
        if self.in_float_warmup:
            return self.warmup_features.index_select(0, rows)
        codebook = self.lookup_codebook()
        if self.frozen:
            return codebook.index_select(0, self.indices.index_select(0, rows))
        relaxed = self.relaxed and self.training
        if not torch.is_grad_enabled() and not relaxed:
            return codebook.index_select(0, hard_indices_of(self.logits.index_select(0, rows), self.index_factors))
        return straight_through_lookup(
            rows, self.logits, codebook, self.temperature, relaxed, self.use_kernels, self.index_factors
        )

    def _codeword_table(self) -> Float[Tensor, "m k"]:
        """:meth:`table` without the rows kept in float."""
        if self.in_float_warmup:
            return self.warmup_features
        if self.frozen:
            return self._frozen_table()
        if self.relaxed and self.training:
            return soft_codewords(self.logits, self.lookup_codebook(), self.temperature, self.index_factors)
        if not torch.is_grad_enabled():
            if self.training:
                return self._hard_table_of_step()
            state = (self.codebook_bits, *((t.data_ptr(), t._version, t.shape) for t in (self.logits, self.codebook)))
            if self._hard_table is None or self._hard_table[0] != state:
                hard = hard_indices_of(self.logits, self.index_factors)
                self._hard_table = state, codeword_table(self.lookup_codebook(), hard, self.use_kernels)
            return self._hard_table[1]
        held, held_table = (self._held_indices, self._held_table) if self.training else (None, None)
        codebook = self.lookup_codebook()
        forecast_to = self._keep_forecast if self.training else None
        graph = self.update_graph if self.update_graph.enabled else None
        if self.fuse_rate and self.training:
            table, rate = straight_through_codewords_and_rate(
                self.logits, codebook, self.temperature, self.use_kernels, held, held_table, forecast_to,
                self.index_factors, graph,
            )  # fmt: skip
            self._rate_of_table = rate, self.logits._version
            return table
        return straight_through_codewords(
            self.logits, codebook, self.temperature, self.use_kernels, held, held_table, forecast_to,
            self.index_factors, graph,
        )  # fmt: skip

    def _frozen_table(self) -> Float[Tensor, "m k"]:
        """The frozen indices' codewords; inside :meth:`hold_indices` the table a lookup without gradients gathers is
        held, and the step's graded lookup returns it (its codebook gradient still flows) instead of gathering it
        again."""
        held = self._held_table
        table = codeword_table(self.lookup_codebook(), self.indices, self.use_kernels, held)
        if self._holding and held is None and not torch.is_grad_enabled():
            self._held_table = table
        return table

    def hard_indices(self) -> Int[Tensor, "m"]:
        """The b-bit index of every row: what a compressed file stores (``RuntimeError`` in the float warm-up)."""
        if self.in_float_warmup:
            raise RuntimeError("a store in its float warm-up has no indices yet (see quantize_float_warmup)")
        return self.indices.long() if self.frozen else hard_indices_of(self.logits.detach(), self.index_factors)

    def index_rate_bits(self) -> Float[Tensor, ""]:
        """Differentiable estimate of the bits an order-0 entropy coder spends on this store's indices.

        Each row's soft index ``softmax(C / temperature)`` coded with the level's marginal (the mean soft
        index): ``sum_rows sum_c soft[r, c] * -log2(mean_soft[c])``. For one-hot rows this is the coded size
        of the hard indices under their own histogram; lowering it concentrates the indices on fewer codewords.
        Frozen indices have no such estimate (``RuntimeError``). After a :meth:`table` that computed it
        (``fuse_rate``) for the logits as they are, that one, once. "As they are" is the logits' version, which
        in-place updates bump but torch's fused Adam does not: read the rate in the step that computed the table
        (the model does).
        """
        if self.frozen:
            raise RuntimeError("frozen indices cannot be trained, so they have no rate estimate")
        pending, self._rate_of_table = self._rate_of_table, None
        if pending is not None and pending[1] == self.logits._version:
            return pending[0]
        return soft_index_rate_bits(self.logits, self.temperature, self.use_kernels, self.index_factors)

    @torch.no_grad()
    def freeze_indices(self) -> List[ParameterSwap]:
        """Fix every row's index at its hard value, as a file stores it: the store becomes ``frozen`` (the codebook
        and float rows still train, the indices no longer do) and its logits are replaced by an empty parameter,
        whose swap is returned for optimisers to follow (releasing the logits' moments). Nothing to do when frozen
        already; a store in its float warm-up has no indices yet (``RuntimeError``)."""
        if self.frozen:
            return []
        indices = self.hard_indices().to(torch.int32)
        self.frozen = True
        self.indices = indices
        self._hard_table = self._rate_of_table = self._forecast = None
        empty = self.logits.data.new_empty(0, self.logits.shape[1])
        return _replace_parameter(self, "logits", empty, in_place=False)

    @torch.no_grad()
    def load_codewords(
        self,
        codebook: Float[Tensor, "c k"],
        indices: Int[Tensor, "m"],
        float_rows: Optional[Bool[Tensor, "m"]] = None,
        float_features: Optional[Float[Tensor, "f k"]] = None,
    ) -> None:
        """Make ``codebook`` the codebook and ``indices`` every row's index, and the ``float_rows`` (if given) read
        ``float_features`` (one row per kept row, in row order) instead: what decoding a file does, into a frozen
        store."""
        check_codewords(codebook, indices, self.codebook, self.num_rows, 2**self.index_bits, self.frozen, "store")
        kept = int(float_rows.sum()) if float_rows is not None else 0
        if float_rows is not None and (
            float_rows.shape != (self.num_rows,)
            or float_features is None
            or float_features.shape != (kept, self.feature_dim)
        ):
            got = None if float_features is None else tuple(float_features.shape)
            raise ValueError(
                f"store: expected {self.num_rows} float-row flags and their ({kept}, {self.feature_dim}) features, got "
                f"{tuple(float_rows.shape)} flags and features {got}"
            )
        self.codebook.copy_(codebook)
        self.indices.copy_(indices)
        if kept:
            self.float_rows = float_rows.to(self.codebook.device, torch.bool)
            features = torch.zeros(self.num_rows, self.feature_dim, device=self.codebook.device)
            features[self.float_rows] = float_features.to(features)
            self.float_features = nn.Parameter(features)
        else:
            self.float_rows = self.float_rows.new_zeros(0)
            self.float_features = nn.Parameter(self.float_features.data.new_zeros(0, self.feature_dim))
        self._hard_table = None

    @torch.no_grad()
    def quantize_float_warmup(
        self,
        iterations: int = 25,
        generator: Optional[torch.Generator] = None,
        importance: Optional[Float[Tensor, "m"]] = None,
        float_fraction: float = 0.0,
    ) -> List[ParameterSwap]:
        """End the float warm-up: the warm-up rows become the codebook and every row's index logits.

        :func:`vector_quantize` picks the codebook (k-means of the rows weighted by ``importance``, how much each
        row's error costs; uniform when None); each row's logits are minus its squared distances to the codewords
        over the mean weighted quantisation error, so the argmax is the nearest codeword and the softmax keeps the
        next nearest within reach of the straight-through gradient.

        ``float_fraction`` of the rows (rounded down) stay float instead (VQRF's kept voxels): those whose
        quantisation would cost the loss most, ``importance x`` squared distance to the nearest codeword of a
        first k-means of all rows; the codebook is then fitted to the other rows. The warm-up table is replaced
        by an empty parameter; returns the swaps for optimisers."""
        if not self.in_float_warmup:
            return []
        if not 0.0 <= float_fraction < 1.0:
            raise ValueError(f"float_fraction must be in [0, 1), got {float_fraction}")
        self._float_warmup = False
        if self.warmup_features.shape[0] == 0:  # rows grown later start straight-through from fresh logits
            return []
        features, codewords = self.warmup_features.detach(), 2**self.index_bits
        kept = self._costliest_rows(features, int(float_fraction * features.shape[0]), importance, generator)
        quantized = ~kept
        weights = None if importance is None else importance[quantized]
        centroids, logits = vector_quantize(features[quantized], codewords, weights, iterations, generator)
        logits = logits.neg_() if self.index_factors == 1 else factored.logits_of_joint(logits.neg_())
        lowest = -torch.finfo(self.logits.dtype).max  # float16 logits saturate instead of becoming -inf
        logits = logits.clamp_(min=lowest).to(self.logits.dtype)  # the costs' own memory: no second table
        if bool(kept.any()):
            logits = logits.new_zeros(features.shape[0], logits.shape[1]).index_copy_(
                0, quantized.nonzero()[:, 0], logits
            )
        self.codebook.data = centroids.to(self.codebook.dtype)
        self.codebook.grad = None
        swaps = _replace_parameter(self, "logits", logits, in_place=False)
        self._hard_table = None
        if bool(kept.any()):
            old_float = self.float_features
            self.float_features = nn.Parameter(torch.where(kept[:, None], features, 0.0))
            self.float_rows = kept
            swaps.append((old_float, self.float_features))
        old = self.warmup_features
        self.warmup_features = nn.Parameter(old.data.new_empty(0, self.feature_dim))
        return [(old, self.warmup_features)] + swaps

    def _costliest_rows(
        self,
        features: Float[Tensor, "m k"],
        count: int,
        importance: Optional[Float[Tensor, "m"]],
        generator: Optional[torch.Generator],
    ) -> Bool[Tensor, "m"]:
        """The ``count`` rows whose quantisation into this store's codebook would cost the loss most (importance x
        squared distance to the nearest codeword of a k-means of all rows)."""
        kept = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        if count == 0:
            return kept
        _, costs = vector_quantize(features, 2**self.index_bits, importance, generator=generator)
        scores = costs.min(dim=-1).values * (1.0 if importance is None else importance.float())
        kept[scores.topk(count).indices] = True
        return kept

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        device = self.codebook.device
        self._hard_table = self._forecast = None
        swaps = []
        if self.has_float_rows:
            self.float_rows = rows_from(self.float_rows, source_rows)
            swaps += _remap_rows(self, "float_features", source_rows, None, in_place or self.frozen)
        if self.frozen:
            self.indices = rows_from(self.indices, source_rows)
            return []
        if self.in_float_warmup:
            fresh = _normal_rows(self.feature_dim, self.codebook_init_std, device)
            swaps += _remap_rows(self, "warmup_features", source_rows, fresh, in_place)
            if self.logits.shape[0] == 0:  # no logits until the warm-up ends (a checkpoint from before may have them)
                return swaps
        fresh = _normal_rows(self.logits.shape[1], self.logit_init_std, device)
        return swaps + _remap_rows(self, "logits", source_rows, fresh, in_place)

    def _load_from_state_dict(  # type: ignore[override]
        self,
        state_dict: Dict[str, Tensor],
        prefix: str,
        local_metadata: Dict,
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        """Size the warm-up table, the logits and the float rows like the saved ones (empty logits in the warm-up,
        an empty table after it, or without float rows), without changing ``state_dict``; a store with rows is in its
        warm-up when the saved one was.

        A checkpoint from before one of them existed has this store's logits (or indices) but not it: its store was
        past any warm-up and had no float rows, so it is emptied and not reported missing. A state dict without this
        store's keys (nerfstudio's pipeline loads a second time, without the ``_model.`` prefix) leaves the store as
        it is.
        """
        ours = prefix + "logits" in state_dict or prefix + "indices" in state_dict
        self._forecast = None
        saved_indices = state_dict.get(prefix + "indices")
        if saved_indices is not None and not self.frozen:  # saved after freeze_indices
            self.frozen = True
            self.indices = torch.empty(saved_indices.shape, dtype=torch.int32, device=self.codebook.device)
        added_later = {
            "warmup_features": (0, self.feature_dim),
            "float_features": (0, self.feature_dim),
            "float_rows": (0,),
        }
        absent = []
        for name, empty in added_later.items():
            saved = state_dict.get(prefix + name)
            if saved is None and ours:
                absent.append(prefix + name)
            shape = empty if saved is None and ours else None if saved is None else saved.shape
            tensor = getattr(self, name)
            if shape is not None and shape != tensor.shape:
                tensor.data = tensor.data.new_empty(shape)
        saved_logits = state_dict.get(prefix + "logits")
        if saved_logits is not None and self.logits is not None and saved_logits.shape[1:] != self.logits.shape[1:]:
            raise ValueError(
                f"{prefix}logits: the checkpoint has {saved_logits.shape[1]} logits a row, this store "
                f"{self.logits.shape[1]} ({self.index_bits}-bit indices in {self.index_factors} factor(s)): train or "
                "load with the run's index_bits and index_factors"
            )
        if saved_logits is not None and self.logits is not None and saved_logits.shape != self.logits.shape:
            self.logits.data = self.logits.data.new_empty(saved_logits.shape)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        stored_rows = self.indices.shape[0] if self.frozen else self.logits.shape[0]
        if ours and max(stored_rows, self.warmup_features.shape[0]) > 0:
            self._float_warmup = self.warmup_features.shape[0] > 0
        for key in absent:
            if key in missing_keys:
                missing_keys.remove(key)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        logits = [] if self.frozen else [self.logits]
        return {
            "grid_logits": logits,
            "codebooks": [self.codebook],
            "grid_features": [self.warmup_features, self.float_features],
        }


def prepare_held_steps(stores: Sequence[FeatureStore], graph: Optional[CapturedWork] = None) -> None:
    """What the lookups of ``stores`` inside :meth:`~CodebookFeatures.hold_indices` derive from their parameters,
    computed now in one pass, on the GPU one replay of ``graph`` (None: run as it is):

    - the codebooks rounded to ``codebook_bits`` (past their float warm-up), those of equal shape and bits
      together; on the GPU stored transposed, as the logits' gradient kernel reads each channel's codewords; where
      gradients are recorded, all of them straight-through to their float codebooks by one autograd node;
    - for stores that train on hard indices, the codeword table: of the frozen indices, or of the hard indices that
      the last in-backward update forecast (with their rate where the table computes it), where that forecast
      holds for the logits as they are. Other stores derive theirs at their first lookup, as before.
    """
    holding = [s for s in stores if isinstance(s, CodebookFeatures) and s._holding]
    groups: Dict[Tuple[int, torch.Size, torch.device, bool], List[CodebookFeatures]] = {}
    for store in holding:
        if store.codebook_bits is not None and not store.in_float_warmup:
            key = (store.codebook_bits, store.codebook.shape, store.codebook.device, store.use_kernels)
            groups.setdefault(key, []).append(store)
    rounded_stores = [store for group in groups.values() for store in group]
    tabled = [store for store in holding if store._table_from_held_state()]
    if not rounded_stores and not tabled:
        return
    forecasts = [store._take_forecast() for store in tabled if not store.frozen]
    inputs = [t for forecast in forecasts for t in forecast]

    def work(inputs: Sequence[Tensor]) -> List[Tensor]:
        outputs: List[Tensor] = []
        for (bits, _, _, use_kernel), group in groups.items():
            outputs += rounded_codebooks(torch.stack([s.codebook for s in group]), bits, use_kernel, True).unbind(0)
        codebook_of = {id(store): codebook for store, codebook in zip(rounded_stores, outputs)}
        forecast = iter(inputs)
        for store in tabled:
            codebook = codebook_of.get(id(store), store.codebook).detach()
            if store.frozen:
                outputs.append(codeword_table(codebook, store.indices, store.use_kernels))
                continue
            known = step_indices_of_sums(next(forecast), next(forecast), store.fuse_rate)
            outputs += [*known, codeword_table(codebook, known[0], store.use_kernels)]
        return outputs

    key = (
        tuple((k, tuple(place(s.codebook) for s in group)) for k, group in groups.items()),
        tuple((place(s.codebook), s.frozen and place(s.indices), s.fuse_rate, s.use_kernels) for s in tabled),
    )
    device = (rounded_stores or tabled)[0].codebook.device
    with torch.no_grad():
        outputs = iter(work(inputs) if graph is None else graph.run(key, inputs, work, device))
    codebooks = [next(outputs) for _ in rounded_stores]
    for store, codebook in zip(rounded_stores, straight_through_group([s.codebook for s in rounded_stores], codebooks)):
        store._held_codebook = codebook
    for store in tabled:
        if not store.frozen:
            store._held_indices = (next(outputs), next(outputs), next(outputs))
        store._held_table = next(outputs)


class FloatFeatures(FeatureStore):
    """``num_rows`` free float feature vectors: the uncompressed twin of :class:`CodebookFeatures`."""

    def __init__(self, num_rows: int, feature_dim: int, init_std: float = 0.01) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.init_std = init_std
        self.features = nn.Parameter(torch.randn(num_rows, feature_dim) * init_std)

    @property
    def num_rows(self) -> int:
        return self.features.shape[0]

    def forward(self, rows: Int[Tensor, "n"]) -> Float[Tensor, "n k"]:
        return self.features.index_select(0, rows)

    def table(self) -> Float[Tensor, "m k"]:
        return self.features

    def remap(self, source_rows: Int[Tensor, "m_new"], in_place: bool = False) -> List[ParameterSwap]:
        fresh = _normal_rows(self.feature_dim, self.init_std, self.features.device)
        return _remap_rows(self, "features", source_rows, fresh, in_place)

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"grid_features": [self.features]}

    @torch.no_grad()
    def load_features(self, features: Float[Tensor, "m k"]) -> None:
        """Make ``features`` every row's feature vector (what decoding a file does)."""
        if features.shape != self.features.shape:
            raise ValueError(f"expected features {tuple(self.features.shape)}, got {tuple(features.shape)}")
        self.features.copy_(features)


__all__ = [
    "ParameterSwap",
    "check_codewords",
    "FeatureStore",
    "CodebookFeatures",
    "FloatFeatures",
    "prepare_held_steps",
    "rows_from",
]
