"""The batched engine's step launchers (sgdrank.stepgraph) and its epoch-0 spectra.

On the CPU: the ``static`` mode (a CUDA graph's fixed buffers, without the graph) gives exactly
the ``eager`` numbers, through runs that diverge, carry momentum and end an epoch on a smaller
batch; a launcher that forgot to refresh its buffers (the bug a graph invites) is caught by the
same comparison. The ``graph`` mode itself needs CUDA: its test is skipped elsewhere.
"""
from __future__ import annotations

import pytest
import torch

from sgdrank import batched, engine_batched, record, stepgraph, sweep

from test_sweep import DATA, rel

pytestmark = pytest.mark.usefixtures("float32_default")

BASE = sweep.Config(model="MLP-BN-3-8", dataset="toy", batch_size=20, epochs=3, lr=0.05,
                    lam=1e-3, drop_last=False,  # 96 = 4 x 20 + 16: a last, smaller batch
                    lr_milestones=(2,), lr_gamma=0.5)  # new learning rates between epochs
CFGS = [BASE, sweep.replace(BASE, lam=1e-2), sweep.replace(BASE, seed=5),
        sweep.replace(BASE, lr=1e6)]  # the last run diverges: the group shrinks (a new net)


def _run(monkeypatch, mode: str, cfgs=CFGS, device="cpu"):
    monkeypatch.setenv(stepgraph.ENV, mode)
    return sweep.run(cfgs, data=DATA, progress=False, device=device, engine="batched")


def _same(a: sweep.Result, b: sweep.Result) -> bool:
    """Bit-for-bit equal final weights and recorded losses of every run that did not diverge."""
    for i in range(len(a)):
        if a.records[i]["state"] is None or b.records[i]["state"] is None:
            if (a.records[i]["state"] is None) != (b.records[i]["state"] is None):
                return False
            continue
        sa, sb = a.state_dict(i), b.state_dict(i)
        if any(not torch.equal(sa[k], sb[k]) for k in sa):
            return False
    cols = ["train_loss", "batch_loss", "test_loss", "avg_rank"]
    return bool(a.epochs[cols].fillna(-1).equals(b.epochs[cols].fillna(-1)))


def test_mode_from_the_environment():
    assert stepgraph.mode("cpu", {}) == "eager"
    assert stepgraph.mode("cpu", {stepgraph.ENV: "0"}) == "eager"
    assert stepgraph.mode("cpu", {stepgraph.ENV: "static"}) == "static"
    assert stepgraph.mode("cuda", {stepgraph.ENV: "1"}) == "graph"
    with pytest.raises(ValueError, match="CUDA graphs, but the runs train on cpu"):
        stepgraph.mode("cpu", {stepgraph.ENV: "1"})
    with pytest.raises(ValueError, match="use 0 .* 1 .* 'static'"):
        stepgraph.mode("cpu", {stepgraph.ENV: "yes please"})


def test_static_buffers_give_the_eager_numbers_bit_for_bit(monkeypatch):
    eager = _run(monkeypatch, "0")
    assert eager.records[3]["diverged_epoch"] == 1  # the group did shrink
    static = _run(monkeypatch, "static")
    assert _same(eager, static)
    mom = [sweep.replace(c, momentum=0.9) for c in CFGS[:3]]  # the momentum path of sgd_step
    assert _same(_run(monkeypatch, "0", mom), _run(monkeypatch, "static", mom))


def test_a_launcher_with_stale_buffers_is_caught(monkeypatch):
    """Negative control: a static launcher that copies the batch indices only once (as a graph
    replaying a buffer nobody refreshes would) trains on one batch over and over; the same
    comparison that passes above fails."""
    eager = _run(monkeypatch, "0")
    step = stepgraph.Steps.step

    def stale(self, idx, full=True):
        if self.idx is not None and full and self.kind == "static":
            self._run(self.idx, idx.shape[1])
            return
        step(self, idx, full)

    monkeypatch.setattr(stepgraph.Steps, "step", stale)
    assert not _same(eager, _run(monkeypatch, "static"))


def _rebind_coefficient(net):
    net._coef["neg_lr_t"] = net._coef["neg_lr_t"].clone()


def _rebind_weight_view(net):
    name = next(iter(net.P))
    net.P[name] = net.P[name].clone()


def _rebind_gradient_view(net):
    name = next(iter(net.G))
    net.G[name] = net.G[name].clone()


@pytest.mark.parametrize("rebind, named", [
    (_rebind_coefficient, "coefficient neg_lr_t"), (_rebind_weight_view, "weight "),
    (_rebind_gradient_view, "gradient ")])
def test_a_rebound_tensor_is_caught(monkeypatch, rebind, named):
    """Negative controls of the address guard: a ``set_hyper`` that puts a new tensor where a
    step reads one (a learning-rate tensor in the same dict, a per-matrix weight or gradient
    view that the update reads), which a captured graph would never see, passes the eager run
    and fails the static one, naming the tensor."""
    set_hyper = batched.BatchedNet.set_hyper

    def rebinding(self, *a, **kw):
        set_hyper(self, *a, **kw)
        rebind(self)

    monkeypatch.setattr(batched.BatchedNet, "set_hyper", rebinding)
    _run(monkeypatch, "0")
    with pytest.raises(RuntimeError, match=f"{named}.*replaced"):
        _run(monkeypatch, "static")


def test_addresses_are_checked_once_per_epoch(monkeypatch):
    """The guard runs at the first full step of each epoch (4 full steps per epoch here), not
    at every step: host time a replayed graph is meant to save."""
    calls = []
    check = stepgraph.Steps._check_addresses

    def counting(self):
        calls.append(self.net.K)
        check(self)

    monkeypatch.setattr(stepgraph.Steps, "_check_addresses", counting)
    _run(monkeypatch, "static")
    assert len(calls) == 3  # 3 epochs (the divergence builds a new launcher, checked anew)


def test_new_coefficients_or_data_need_a_new_launcher():
    """Momentum switched on gives a new coefficient dict, new training inputs new tensors: the
    launcher no longer serves (the engine builds another); new values written in place do."""
    arch = batched.Arch("MLP-BN-3-8", (20,), 3)
    net = batched.BatchedNet(arch, 2)
    x, y = DATA.x_train.reshape(len(DATA.x_train), -1), DATA.y_train
    net.set_hyper([0.1, 0.2], [1e-3, 1e-2], [0.0, 0.0])
    st = stepgraph.Steps(net, x, None, y, "ce", "static")
    net.set_hyper([0.05, 0.1], [1e-3, 1e-2], [0.0, 0.0])
    assert st.serves(net, x)
    assert not st.serves(net, x.clone())
    net.set_hyper([0.05, 0.1], [1e-3, 1e-2], [0.9, 0.9])
    assert not st.serves(net, x)


def test_one_launcher_per_net_and_coefficients(monkeypatch):
    """The engine keeps its launcher from epoch to epoch and builds a new one when the net
    (a run dropped) or the coefficients' layout (momentum switched on) changes."""
    made = []
    init = stepgraph.Steps.__init__

    def counting(self, net, *a, **kw):
        made.append(net.K)
        init(self, net, *a, **kw)

    monkeypatch.setattr(stepgraph.Steps, "__init__", counting)
    _run(monkeypatch, "static")
    assert made == [4, 3]  # 3 epochs; one new launcher after the divergence at epoch 1


def _graphs_match_eager(monkeypatch, device):
    cfgs = [sweep.replace(c, epochs=8) for c in CFGS]  # more steps than the warm-up
    eager = _run(monkeypatch, "0", cfgs, device)
    graph = _run(monkeypatch, "1", cfgs, device)
    for i in range(3):
        sa, sb = eager.state_dict(i), graph.state_dict(i)
        assert all(rel(sa[k], sb[k]) < 1e-6 for k in sa)
    init = sweep.run(sweep.replace(CFGS[0], epochs=0), data=DATA, progress=False,
                     device=device, engine="batched")
    assert any(not torch.equal(init.state_dict(0)[k], graph.state_dict(0)[k])
               for k in init.state_dict(0))  # the replays moved the weights


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_replays_give_the_eager_numbers(monkeypatch):
    _graphs_match_eager(monkeypatch, "cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graphs_on_a_second_device(monkeypatch):
    """A local job on a multi-GPU machine trains on cuda:1 while the current device is cuda:0:
    the capture must be on the net's device (else it records nothing and raises)."""
    assert torch.cuda.current_device() == 0
    _graphs_match_eager(monkeypatch, "cuda:1")


# ------------------------------------------------------------------ spectra at epoch 0
def _count_spectra(monkeypatch) -> list[int]:
    seen = []
    spectra = record.spectra

    def counting(mats, dtype=torch.float64):
        seen.append(next(iter(mats.values())).shape[0])
        return spectra(mats, dtype)

    monkeypatch.setattr(record, "spectra", counting)
    return seen


def test_epoch0_spectra_once_per_initialisation(monkeypatch):
    """Four runs of two seeds: epoch 0 decomposes two initialisations, later epochs all four
    runs; the epoch-0 records equal those of each run trained alone, bit for bit."""
    cfgs = [BASE, sweep.replace(BASE, lam=1e-2), sweep.replace(BASE, seed=5),
            sweep.replace(BASE, seed=5, lr=0.1)]
    seen = _count_spectra(monkeypatch)
    res = sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    assert seen == [2, 4, 4, 4]
    for i, c in enumerate(cfgs):
        alone = sweep.run([c], data=DATA, progress=False, device="cpu", engine="batched")
        a = res.layers[(res.layers.run_id == i) & (res.layers.epoch == 0)]
        b = alone.layers[alone.layers.epoch == 0]
        assert len(a) == 3 and a.drop(columns="run_id").reset_index(drop=True).equals(
            b.drop(columns="run_id").reset_index(drop=True)), i


def test_epoch0_spectra_of_unequal_matrices_are_each_computed(monkeypatch):
    """Negative control: if runs of one seed did not hold the same matrices at epoch 0, every
    run is decomposed (the check, not the seed, decides)."""
    cfgs = [BASE, sweep.replace(BASE, lam=1e-2)]
    load = engine_batched.BatchedNet.load_module

    def perturbed(self, k, module):
        load(self, k, module)
        if k == 1:
            self.P[self.tracked[0]][1].view(-1)[0] += 1.0  # one entry of the second run

    monkeypatch.setattr(engine_batched.BatchedNet, "load_module", perturbed)
    seen = _count_spectra(monkeypatch)
    sweep.run(cfgs, data=DATA, progress=False, device="cpu", engine="batched")
    assert seen[0] == 2


def test_graph_runs_are_cached_apart(monkeypatch):
    """A run with CUDA graphs requested has its own cache key (a replay is not shown to give
    the eager numbers bit for bit); the static mode, tested bit for bit, shares eager's."""
    from sgdrank import cache

    keys = {}
    for mode in ("0", "static", "1"):
        monkeypatch.setenv(stepgraph.ENV, mode)
        keys[mode] = cache.run_key(BASE)
    assert keys["0"] == keys["static"] != keys["1"]
    assert "stepgraph.py" in cache.ENGINE_FILES
