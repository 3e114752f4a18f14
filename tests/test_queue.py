"""Per-location negative queues: ring-buffer writes, shared mode, similarities, state_dict."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from models.queue import NegativeQueue

torch.set_num_threads(1)


def _keys(n, d=4, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _reference_enqueue(queue: torch.Tensor, ptr: torch.Tensor, keys, rows):
    """One key at a time, as a plain ring buffer would."""
    queue, ptr = queue.clone(), ptr.clone()
    for key, row in zip(keys, rows.tolist()):
        queue[row, ptr[row]] = key
        ptr[row] = (ptr[row] + 1) % queue.shape[1]
    return queue, ptr


def test_initial_keys_are_unit_vectors_from_the_seed():
    a, b, c = NegativeQueue(3, 5, 4, seed=1), NegativeQueue(3, 5, 4, seed=1), NegativeQueue(3, 5, 4, seed=2)
    assert a.queue.shape == (3, 5, 4) and a.ptr.dtype == torch.long and a.ptr.tolist() == [0, 0, 0]
    assert torch.allclose(a.queue.norm(dim=2), torch.ones(3, 5))
    assert torch.equal(a.queue, b.queue) and not torch.equal(a.queue, c.queue)


def test_enqueue_writes_at_the_pointer_fills_exactly_and_wraps():
    q = NegativeQueue(3, 5, 4)
    before = q.queue.clone()
    first, second, third = _keys(3, seed=1), _keys(2, seed=2), _keys(3, seed=3)
    loc = torch.full((3,), 1)
    q.enqueue(first, loc)
    assert torch.equal(q.queue[1, :3], first) and q.ptr.tolist() == [0, 3, 0]
    assert torch.equal(q.queue[1, 3:], before[1, 3:])
    assert torch.equal(q.queue[0], before[0]) and torch.equal(q.queue[2], before[2])
    q.enqueue(second, torch.full((2,), 1))  # fills the ring exactly
    assert torch.equal(q.queue[1], torch.cat([first, second])) and q.ptr.tolist() == [0, 0, 0]
    q.enqueue(third, loc)  # wraps to the start
    assert torch.equal(q.queue[1], torch.cat([third, second])) and q.ptr[1].item() == 3


def test_more_keys_than_the_queue_holds_keep_the_last_ones():
    q = NegativeQueue(2, 4, 4)
    q.enqueue(_keys(1, seed=5), torch.tensor([0]))  # pointer of location 0 at 1
    keys = _keys(10, seed=6)
    expected, expected_ptr = _reference_enqueue(q.queue, q.ptr, keys, torch.zeros(10, dtype=torch.long))
    q.enqueue(keys, torch.zeros(10, dtype=torch.long))
    assert torch.equal(q.queue, expected) and torch.equal(q.ptr, expected_ptr)
    assert q.ptr[0].item() == (1 + 10) % 4


def test_mixed_locations_are_independent_and_match_a_sequential_ring_buffer():
    q = NegativeQueue(4, 3, 4)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        rows = torch.randint(0, 4, (7,), generator=g)
        keys = _keys(7, seed=10 + step)
        expected, expected_ptr = _reference_enqueue(q.queue, q.ptr, keys, rows)
        q.enqueue(keys, rows)
        assert torch.equal(q.queue, expected) and torch.equal(q.ptr, expected_ptr)


def test_shared_mode_maps_every_location_to_one_queue():
    q = NegativeQueue(5, 4, 4, shared=True)
    assert q.queue.shape == (1, 4, 4)
    keys = _keys(3, seed=7)
    q.enqueue(keys, torch.tensor([0, 4, 2]))
    assert torch.equal(q.queue[0, :3], keys) and q.ptr.tolist() == [3]
    query = _keys(2, seed=8)
    assert torch.equal(q.negative_logits(query, torch.tensor([1, 3])), query @ q.queue[0].T)


@pytest.mark.parametrize("rows", [[2, 2, 2, 2, 2], [0, 3, 1, 3, 0]])
def test_negative_logits_are_the_explicit_dot_products(rows):
    q = NegativeQueue(4, 6, 4, seed=3)
    query = _keys(5, seed=9)
    out = q.negative_logits(query, torch.tensor(rows))
    assert out.shape == (5, 6)
    for n, row in enumerate(rows):
        for k in range(6):
            assert out[n, k].item() == pytest.approx(torch.dot(query[n], q.queue[row, k]).item(), abs=1e-6)


def test_enqueue_after_negative_logits_keeps_the_gradient_intact():
    q = NegativeQueue(3, 4, 4)
    query = _keys(2, seed=1).requires_grad_()
    rows = torch.tensor([0, 2])
    expected_grad = torch.stack([q.queue[0].sum(0), q.queue[2].sum(0)])
    out = q.negative_logits(query, rows)
    q.enqueue(_keys(2, seed=2), rows)  # in-place write into the queue read above
    out.sum().backward()
    assert torch.allclose(query.grad, expected_grad)


def test_state_dict_round_trip_carries_queue_and_pointers():
    q = NegativeQueue(3, 4, 4, seed=0)
    q.enqueue(_keys(5, seed=3), torch.tensor([0, 2, 2, 1, 2]))
    buffer = io.BytesIO()
    torch.save(q.state_dict(), buffer)
    buffer.seek(0)
    other = NegativeQueue(3, 4, 4, seed=99)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(other.queue, q.queue) and torch.equal(other.ptr, q.ptr)
    assert other.ptr.tolist() == [1, 1, 3]


@pytest.mark.parametrize("kwargs, word", [({"num_locations": 0}, "num_locations"), ({"size": 0}, "size"),
                                          ({"dim": -1}, "dim")])
def test_bad_constructor_values(kwargs, word):
    args = {"num_locations": 2, "size": 3, "dim": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        NegativeQueue(**args)


def test_bad_locations_and_shapes_are_rejected():
    q = NegativeQueue(3, 4, 4)
    with pytest.raises(ValueError, match="loc_idx must lie in"):
        q.enqueue(_keys(2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="loc_idx must lie in"):
        q.negative_logits(_keys(2), torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="keys must be"):
        q.enqueue(_keys(2, d=5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        q.negative_logits(_keys(2), torch.tensor([0.0, 1.0]))
