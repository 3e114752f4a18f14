"""MoCo: momentum key encoder, shuffle-BN, queue updates, settings validation, DDP shuffle."""

from __future__ import annotations

import copy
import io
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from models.encoder import encoder_from_settings
from models.momentum import update_momentum
from models.moco import MoCo, moco_from_settings, validate_moco_settings
from models.queue import NegativeQueue
from tests.train_fixtures import encoder_settings

torch.set_num_threads(1)

ENCODER = encoder_settings(widths=[4, 8], feature_dim=8, projection_dim=6)
SIZE = 8


def _moco(momentum=0.9, shuffle_bn="split", groups=2, locations=3, queue_size=8, seed=0):
    encoder = encoder_from_settings(ENCODER, SIZE, seed=seed)
    return MoCo(encoder, NegativeQueue(locations, queue_size, 6, seed=seed), momentum=momentum,
                shuffle_bn=shuffle_bn, groups=groups, seed=seed)


def _views(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    x_k = x_q + 0.1 * torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g)
    return x_q, x_k, torch.rand(n, 3, generator=g) * 2 - 1


def _split_eval(encoder, x, loc, index_groups):
    """Hand-computed per-sub-batch evaluation (train-mode BN over each group alone), batch order."""
    out = torch.empty(x.shape[0], encoder.projection_dim)
    for idx in index_groups:
        out[idx] = encoder(x[idx], loc[idx])
    return out


def test_update_momentum_rule_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3))  # changes the running statistics
    before = [p.clone() for p in ema.parameters()]
    update_momentum(model, ema, 0.75)
    for old, new, source in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(new, 0.75 * old + 0.25 * source, rtol=1e-6, atol=1e-7)
    for name, buffer in model.named_buffers():
        assert torch.equal(dict(ema.named_buffers())[name], buffer), name
    with pytest.raises(ValueError, match="1.5"):
        update_momentum(model, ema, 1.5)
    with pytest.raises(ValueError, match="different parameters"):
        update_momentum(model, nn.Linear(3, 4), 0.5)


def test_key_encoder_starts_equal_and_follows_the_momentum_rule():
    moco = _moco(momentum=0.9)
    for (name, q), k in zip(moco.encoder_q.named_parameters(), moco.encoder_k.parameters()):
        assert torch.equal(q, k) and q is not k and not k.requires_grad, name
    with torch.no_grad():  # stands in for an optimizer step on the query encoder
        for p in moco.encoder_q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    q_before = [p.clone() for p in moco.encoder_q.parameters()]
    k_before = [p.clone() for p in moco.encoder_k.parameters()]
    moco(*_views(), torch.zeros(8, dtype=torch.long))
    for q, k, k_now in zip(q_before, k_before, moco.encoder_k.parameters()):
        assert torch.allclose(k_now, 0.9 * k + 0.1 * q, rtol=1e-6, atol=1e-7)


def test_output_shapes_and_cosine_range():
    moco = _moco(queue_size=8)
    x_q, x_k, loc = _views()
    l_pos, l_neg = moco(x_q, x_k, loc, torch.full((8,), 2))
    assert l_pos.shape == (8, 1) and l_neg.shape == (8, 8)
    assert l_pos.abs().max() <= 1 + 1e-5 and l_neg.abs().max() <= 1 + 1e-5
    assert l_pos.requires_grad and l_neg.requires_grad


def test_split_shuffle_bn_equals_hand_computed_sub_batches():
    moco = _moco(momentum=0.99, groups=2, queue_size=8)
    x_q, x_k, loc = _views(8, seed=1)
    loc_idx = torch.full((8,), 1)
    query_enc, key_enc = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))
    l_pos, _ = moco(x_q, x_k, loc, loc_idx, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        update_momentum(query_enc, key_enc, 0.99)
        q = _split_eval(query_enc, x_q, loc, [torch.arange(4), torch.arange(4, 8)])  # consecutive halves
        k = _split_eval(key_enc, x_k, loc, [perm[:4], perm[4:]])  # halves of the shuffled batch
        whole = key_enc(x_k, loc)
    keys = moco.queue.queue[1, :8]
    assert torch.allclose(keys, k, atol=1e-5)
    assert not torch.allclose(keys, whole, atol=1e-3)  # the grouping really changes the keys
    assert torch.allclose(l_pos, (q * k).sum(1, keepdim=True), atol=1e-5)


def test_plain_bn_uses_the_whole_batch_and_the_queue_receives_the_keys():
    moco = _moco(momentum=0.5, shuffle_bn="none", queue_size=8)
    x_q, x_k, loc = _views(6, seed=2)
    before = moco.queue.queue.clone()
    key_enc, query_enc = copy.deepcopy(moco.encoder_k), copy.deepcopy(moco.encoder_q)
    l_pos, l_neg = moco(x_q, x_k, loc, torch.full((6,), 2))
    with torch.no_grad():
        update_momentum(query_enc, key_enc, 0.5)
        k = key_enc(x_k, loc)
        q = query_enc(x_q, loc)
    assert torch.allclose(moco.queue.queue[2, :6], k, atol=1e-6)
    assert moco.queue.ptr.tolist() == [0, 0, 6]
    assert torch.equal(moco.queue.queue[:2], before[:2]) and torch.equal(moco.queue.queue[2, 6:], before[2, 6:])
    # the negatives are the queue as it was before this batch's keys went in
    assert torch.allclose(l_neg, q @ before[2].T, atol=1e-6)
    assert torch.allclose(l_pos, (q * k).sum(1, keepdim=True), atol=1e-6)


def test_mixed_locations_enqueue_each_key_at_its_location():
    moco = _moco(shuffle_bn="none", queue_size=4)
    x_q, x_k, loc = _views(6, seed=3)
    loc_idx = torch.tensor([0, 2, 0, 1, 2, 0])
    moco(x_q, x_k, loc, loc_idx)
    assert moco.queue.ptr.tolist() == [3, 1, 2]


def test_eval_mode_neither_updates_the_key_encoder_nor_the_queue():
    moco = _moco()
    with torch.no_grad():
        for p in moco.encoder_q.parameters():
            p.add_(1.0)
    moco.eval()
    state = {k: v.clone() for k, v in moco.state_dict().items() if k != "_extra_state"}
    moco(*_views(), torch.zeros(8, dtype=torch.long))
    for name, value in moco.state_dict().items():
        if name != "_extra_state":
            assert torch.equal(value, state[name]), name


def test_state_dict_resumes_the_shuffle_stream_exactly():
    a, b = _moco(seed=0), _moco(seed=0)
    views = _views(8, seed=4)
    a(*views, torch.zeros(8, dtype=torch.long))  # advances a's weights, queue and generator
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b.load_state_dict(torch.load(buffer, weights_only=True))
    out_a = a(*views, torch.ones(8, dtype=torch.long))
    out_b = b(*views, torch.ones(8, dtype=torch.long))
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])


@pytest.mark.parametrize("kwargs, word", [({"momentum": 1.2}, "momentum"), ({"shuffle_bn": "shuffle"}, "shuffle_bn"),
                                          ({"groups": 1}, "groups")])
def test_bad_constructor_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        _moco(**kwargs)


def test_queue_dimension_must_match_the_projection():
    with pytest.raises(ValueError, match="projection_dim"):
        MoCo(encoder_from_settings(ENCODER, SIZE), NegativeQueue(2, 4, 5))


def _settings(**overrides):
    settings = {"seed": 0, "batch_size": 32, "sampler": "location", "encoder": dict(ENCODER),
                "moco": {"queue": "per_location", "queue_size": 64, "shuffle_bn": "split", "shuffle_bn_groups": 2,
                         "momentum": 0.99}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


def test_settings_validation():
    validate_moco_settings(_settings())
    with pytest.raises(ValueError, match=r"queue_size 100 .*batch_size 32"):
        validate_moco_settings(_settings(moco={"queue_size": 100}))
    with pytest.raises(ValueError, match=r"queue_size 64 .*batch_size 32 x 4 processes"):
        validate_moco_settings(_settings(), world_size=4)
    validate_moco_settings(_settings(moco={"queue_size": 100, "queue": "shared"}))  # no blocks to fill
    validate_moco_settings(_settings(moco={"queue_size": 100}, sampler="mixed"))
    with pytest.raises(ValueError, match=r"shuffle_bn_groups 1"):
        validate_moco_settings(_settings(moco={"shuffle_bn_groups": 1}))
    with pytest.raises(ValueError, match=r"batch_size 6 .*shuffle_bn_groups 4"):
        validate_moco_settings(_settings(batch_size=6, moco={"queue_size": 60, "shuffle_bn_groups": 4}))
    with pytest.raises(ValueError, match="queue_size 100"):
        moco_from_settings(_settings(moco={"queue_size": 100}), SIZE, 5)


def test_from_the_default_config():
    from pipeline.config import load_config, run_settings

    config = load_config("config/config.yaml")
    settings = run_settings(config, "moco")
    moco = moco_from_settings(settings, config["atlas"]["patch_size"], 7)
    assert moco.queue.queue.shape == (7, settings["moco"]["queue_size"], settings["encoder"]["projection_dim"])
    assert moco.momentum == settings["moco"]["momentum"] and moco.shuffle_bn == settings["moco"]["shuffle_bn"]
    again = moco_from_settings(settings, config["atlas"]["patch_size"], 7)
    assert all(torch.equal(a, b) for a, b in zip(moco.parameters(), again.parameters()))
    other = moco_from_settings(settings, config["atlas"]["patch_size"], 7, init_seed=settings["seed"] + 1)
    assert not torch.equal(other.encoder_q.head[0].weight, moco.encoder_q.head[0].weight)


# ---------------------------------------------------------------------------------- DDP (gloo)
WORLD = 2
PER_RANK = 4


def _ddp_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    from models.distributed import cleanup, init_from_env

    ctx = init_from_env("cpu")
    try:
        moco = _moco(momentum=1.0, queue_size=8)
        x_q, x_k, loc = _views(WORLD * PER_RANK, seed=6)
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        l_pos, _ = moco(x_q[mine], x_k[mine], loc[mine], torch.full((PER_RANK,), 1),
                        generator=torch.Generator().manual_seed(100 + rank))  # rank 0's permutation wins
        torch.save({"l_pos": l_pos.detach(), "queue": moco.queue.queue, "ptr": moco.queue.ptr,
                    "rank": ctx.rank}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_batch_shuffle_matches_a_hand_computed_shuffle(tmp_path):
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # reference on one process: gather, permute with rank 0's generator, per-rank BN groups, unshuffle
    moco = _moco(momentum=1.0, queue_size=8)
    x_q, x_k, loc = _views(WORLD * PER_RANK, seed=6)
    perm = torch.randperm(WORLD * PER_RANK, generator=torch.Generator().manual_seed(100))
    query_enc, key_enc = copy.deepcopy(moco.encoder_q), copy.deepcopy(moco.encoder_k)
    with torch.no_grad():
        update_momentum(query_enc, key_enc, 1.0)
        keys = _split_eval(key_enc, x_k, loc, list(perm.view(WORLD, -1)))
        queries = _split_eval(query_enc, x_q, loc, [torch.arange(PER_RANK), torch.arange(PER_RANK, 2 * PER_RANK)])
    for rank, result in enumerate(results):
        assert result["rank"] == rank
        assert torch.allclose(result["queue"][1, :WORLD * PER_RANK], keys, atol=1e-5)  # both ranks' keys
        assert result["ptr"].tolist() == [0, 0, 0]  # 8 keys filled the queue of 8 exactly
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        expected = (queries[mine] * keys[mine]).sum(1, keepdim=True)
        assert torch.allclose(result["l_pos"], expected, atol=1e-5)
