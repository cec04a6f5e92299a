"""The results of a sweep as tidy tables (:class:`Result`): one row per run x recorded epoch,
one per run x recorded epoch x rank-tracked layer, one per run; final weights as modules."""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from . import metrics
from .batched import Arch
from .record import EPOCH_METRICS, LAYER_METRICS
from .runconfig import Config

class Result:
    """The records of a sweep, in the order of the configs given to :func:`sgdrank.sweep.run`.
    The metrics are defined once, in :mod:`sgdrank.record`.

    - ``epochs``: one row per run x recorded epoch: ``run_id``, ``key``, every :class:`Config`
      field, then :data:`sgdrank.record.EPOCH_METRICS` (``epoch`` 0 = init, ``step``,
      ``lr_now``, ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (eval mode, whole
      sets), ``batch_loss``, ``batch_acc`` (training mode, the epoch's mini-batches),
      ``conv_dist``, ``avg_rank``, ``avg_stable_rank``, ``head_*``, ``bn_var_min``,
      ``eval_blowup``, ``diverged``).
    - ``layers``: one row per run x recorded epoch x rank-tracked layer (no rows for diverged
      epochs): ``run_id``, ``key``, the config, then :data:`sgdrank.record.LAYER_METRICS`
      (``layer`` e.g. ``"W3"``, ``"block2.W1"``, ``"stage1.conv1"``; ``rank`` at atol 1e-3,
      ``stable_rank``, ``fro``, ``spec``, ``delta_fro``, ``sv`` as ``np.ndarray`` float64).
    - ``runs``: one row per run: config, ``diverged_epoch`` (NaN if none), final metrics,
      ``eval_blowup_epoch`` (first epoch whose eval-mode training loss blew up while its batch
      loss did not, NaN if none), ``final_bn_var_min``, ``cached`` (loaded from disk),
      ``seconds`` (its share of its group's wall time), ``engine``.
    """

    def __init__(self, configs: list[Config], records: list[dict], cached: list[bool]):
        self.configs = list(configs)
        self.records = list(records)
        self.cached = list(cached)
        self._epochs = self._layers = None

    def __len__(self):
        return len(self.configs)

    def __repr__(self):
        blown = sum(any(r["epochs"]["eval_blowup"]) for r in self.records)
        # two short lines: the book's text column holds 77 characters
        return (f"<sweep.Result: {len(self)} runs ({sum(self.cached)} from cache),\n "
                f"{sum(r['diverged_epoch'] is not None for r in self.records)} diverged, "
                f"{blown} with an eval-mode blow-up>")

    @property
    def n_loaded(self) -> int:
        return sum(self.cached)

    @property
    def n_trained(self) -> int:
        return len(self) - sum(self.cached)

    def _config_cols(self, i: int) -> dict:
        return {"run_id": i, "key": self.records[i]["key"], **self.configs[i].to_dict()}

    def _tidy(self, frame: Callable[[dict], pd.DataFrame]) -> pd.DataFrame:
        """One table of all runs: ``frame(record)`` per run, its config columns in front."""
        frames = []
        for i, rec in enumerate(self.records):
            df = frame(rec)
            for k, v in reversed(list(self._config_cols(i).items())):
                df.insert(0, k, [v] * len(df))
            frames.append(df)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    @property
    def epochs(self) -> pd.DataFrame:
        if self._epochs is None:
            out = self._tidy(lambda rec: pd.DataFrame(rec["epochs"], columns=list(EPOCH_METRICS)))
            if len(out):
                out["diverged"] = out["diverged"].astype(bool)
                out["eval_blowup"] = out["eval_blowup"].astype(bool)
                out["head_rank"] = out["head_rank"].astype(float)
            self._epochs = out
        return self._epochs

    @property
    def layers(self) -> pd.DataFrame:
        if self._layers is None:
            def layer_frame(rec):
                L = dict(rec["layers"])
                L["sv"] = [np.asarray(torch.as_tensor(s).double().numpy()) for s in L["sv"]]
                return pd.DataFrame(L, columns=list(LAYER_METRICS))

            out = self._tidy(layer_frame)
            if len(out):
                out["rank"] = out["rank"].astype(int)
            self._layers = out
        return self._layers

    @property
    def runs(self) -> pd.DataFrame:
        rows = []
        for i, rec in enumerate(self.records):
            last = {k: v[-1] for k, v in rec["epochs"].items() if v}
            de = rec["diverged_epoch"]
            ep = rec["epochs"]
            blown = [e for e, b in zip(ep["epoch"], ep["eval_blowup"]) if b]
            rows.append({**self._config_cols(i),
                         "diverged_epoch": float("nan") if de is None else de,
                         "final_train_loss": last.get("train_loss"),
                         "final_train_acc": last.get("train_acc"),
                         "final_test_loss": last.get("test_loss"),
                         "final_test_acc": last.get("test_acc"),
                         "final_avg_rank": last.get("avg_rank"),
                         "eval_blowup_epoch": blown[0] if blown else float("nan"),
                         "final_bn_var_min": last.get("bn_var_min"), "cached": self.cached[i],
                         "seconds": rec["seconds"], "engine": rec["engine"]})
        return pd.DataFrame(rows)

    def ranks(self, atol: float | None = None, rtol: float | None = None) -> pd.Series:
        """Threshold rank of every row of :attr:`layers` recomputed from its singular values:
        ``atol`` relative to ``||W||_F`` (the authors' rule) or ``rtol`` relative to ``s_1``
        (:func:`sgdrank.metrics.threshold_rank`). Aligned with ``res.layers.index``."""
        if atol is None and rtol is None:
            atol = metrics.DEFAULT_ATOL
        vals = [int(metrics.threshold_rank(torch.from_numpy(s), atol=atol, rtol=rtol))
                for s in self.layers["sv"]]
        return pd.Series(vals, index=self.layers.index, name="rank", dtype=int)

    def _index(self, run) -> int:
        if isinstance(run, Config):
            return self.configs.index(run)
        return int(run)

    def state_dict(self, run) -> dict[str, torch.Tensor]:
        """Final ``state_dict`` of run ``run`` (``run_id`` or its Config). Raises if it diverged."""
        i = self._index(run)
        rec = self.records[i]
        if rec["state"] is None:
            raise ValueError(f"run {i} diverged at epoch {rec['diverged_epoch']}: "
                             "it has no final weights")
        return {k: v.clone() for k, v in rec["state"].items()}

    def spectra_at(self, run, epoch: int) -> dict[str, torch.Tensor] | None:
        """Singular values of every rank-tracked matrix of run ``run`` (``run_id`` or its Config)
        at recorded epoch ``epoch`` (0: the initialisation), by layer label (``"W3"``,
        ``"stage1.conv1"``): float64, descending, as the recorder computed them (in the run's
        ``svd_dtype``), so that an analysis need not decompose those matrices again. None when
        the record holds no spectra at that epoch (:meth:`Config.spectra_at`; a diverged run's
        epochs after its divergence)."""
        i = self._index(run)
        L = self.records[i]["layers"]
        out = {label: torch.as_tensor(s).double() for e, label, s
               in zip(L["epoch"], L["layer"], L["sv"]) if e == epoch}
        return out or None

    def final_spectra(self, run) -> dict[str, torch.Tensor] | None:
        """:meth:`spectra_at` the last epoch (``cfg.epochs``, which always records spectra):
        those of the weights :meth:`model` returns. None when the run has no final weights (it
        diverged)."""
        i = self._index(run)
        if self.records[i]["state"] is None:
            return None
        return self.spectra_at(i, self.configs[i].epochs)

    def model(self, run) -> nn.Module:
        """Final weights of run ``run`` (``run_id`` or its Config) as the ``nn.Module`` of
        :func:`sgdrank.models.build_model`, in eval mode, on the CPU."""
        i = self._index(run)
        cfg, rec = self.configs[i], self.records[i]
        arch = Arch(cfg.model, tuple(rec["arch"]["in_shape"]), rec["arch"]["out_dim"], cfg.bias,
                    cfg.detach_var, cfg.activation)
        m = arch.build().float()
        m.load_state_dict(self.state_dict(i))
        return m.eval()

