"""The streaming engine's contract with its clients (slta.engine.walk): groups in write order, one group
read ahead, `reads` and `done` honoured, and the base hidden state advanced the way the merge does."""

from __future__ import annotations

import torch

from slta.config import load_config
from slta.engine.calibration import calibration
from slta.engine.walk import Client, Stream, layer_groups, walk
from slta.io.architecture import build_plan
from slta.io.inputs import open_inputs
from tiny import make_data, make_family, write_config


class Recorder(Client):
    def __init__(self, done=(), unread=()):
        self.calls, self._done, self._unread = [], set(done), set(unread)

    def reads(self, label):
        return label not in self._unread

    def done(self, label):
        return label in self._done

    def embed(self, names, loaded):
        self.calls.append(("embed", names, loaded))

    def layer(self, i, names, loaded):
        self.calls.append((f"layer {i}", names, loaded))

    def head(self, names, loaded):
        self.calls.append(("head", names, loaded))


def _inputs(tmp_path, granularity="attn_mlp"):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=3)
    data = make_data(tmp_path, T=2)
    cfg = load_config(write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=3))
    ins = open_inputs(cfg)
    return ins, build_plan(ins.hf_config, ins.base.names(), granularity)


def test_walk_hands_every_group_in_write_order(tmp_path):
    ins, plan = _inputs(tmp_path)
    rec = Recorder(done={"layer 1"}, unread={"embed"})
    walk(ins, plan, rec, progress=False)
    groups = layer_groups(plan)
    assert [c[0] for c in rec.calls] == [g[0] for g in groups if g[0] != "layer 1"]
    assert sorted(n for g in groups for n in g[1]) == sorted(plan.tensor_order)  # every tensor in one group
    for label, names, loaded in rec.calls:
        assert names == dict(groups)[label]
        if label == "embed":
            assert loaded is None  # the client reads it itself
        else:
            assert len(loaded) == 3 and all(set(v) == set(names) for v in loaded)  # base + 2 fine-tunes
            assert torch.equal(loaded[1][names[0]], ins.tuned[0].get(names[0]))


def test_replayed_layers_give_the_base_forward_pass(tmp_path):
    """A done layer is replayed on the base alone; the hidden states after it equal those of a
    client that computed the layer itself (what makes --resume byte-identical)."""
    from slta.engine.features import GramStore, layer_features, sub, to_compute

    ins, plan = _inputs(tmp_path)
    tasks, _ = calibration(ins)

    class Features(Recorder):
        def __init__(self, stream, done=()):
            super().__init__(done=done, unread={"embed", "head"})
            self.stream = stream
            self.store = GramStore([m.name for m in plan.modules], sum(map(len, tasks)), 2, torch.device("cpu"))

        def embed(self, names, loaded):
            self.stream.embed(self.store)

        def layer(self, i, names, loaded):
            versions = [to_compute(sub(g, f"model.layers.{i}."), torch.device("cpu"), torch.float32) for g in loaded]
            layer_features(self.stream.runner, i, plan.layer_modules(i), versions, self.stream.batches, self.store)

    runs = []
    for done in ((), ("embed", "layer 0", "layer 1")):
        stream = Stream.open(ins, plan, tasks, torch.device("cpu"), torch.float32, 2)
        walk(ins, plan, Features(stream, done), progress=False)
        runs.append([b.h for b in stream.batches])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
