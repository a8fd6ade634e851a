"""BlockLayout: gather/scatter of block sets over several KV layouts, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from pdserve.kv.layout import BlockLayout, LayoutError

pytestmark = pytest.mark.unit

NB = 12  # blocks per cache


def cpu_like(layers: int, dtype: torch.dtype, seed: int, nb: int = NB):
    """vLLM CPU backend: [2, num_blocks, kv_heads, block_size, head_dim] per layer."""
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.attn": torch.randn(2, nb, 3, 4, 8, generator=g).to(dtype)
            for i in range(layers)}


def gpu_like(layers: int, dtype: torch.dtype, seed: int, nb: int = NB):
    """Some GPU backends: [num_blocks, 2, block_size, kv_heads, head_dim]."""
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.randn(nb, 2, 4, 3, 8, generator=g).to(dtype) for i in range(layers)}


def split_kv(layers: int, dtype: torch.dtype, seed: int, nb: int = NB):
    """A layer given as a (K, V) tuple of [num_blocks, block_size, heads, dim] tensors."""
    g = torch.Generator().manual_seed(seed)
    return {f"l{i}": (torch.randn(nb, 4, 3, 8, generator=g).to(dtype),
                      torch.randn(nb, 4, 3, 8, generator=g).to(dtype)) for i in range(layers)}


def blocks_of(kv, block_ids, block_dim):
    """Reference: the given blocks of every tensor, by plain indexing."""
    out = []
    for name in sorted(kv):
        value = kv[name]
        for t in [value] if isinstance(value, torch.Tensor) else list(value):
            d = block_dim if t.dim() == 5 else 0
            out.append(torch.stack([t.select(d, b) for b in block_ids], dim=d))
    return out


LAYOUTS = [(cpu_like, 1), (gpu_like, 0), (split_kv, 0)]
DTYPES = [torch.bfloat16, torch.float32, torch.float16]
ID_SETS = [
    ([0, 1, 2], [7, 8, 9]),  # consecutive on both sides
    ([3, 5, 4, 11], [0, 2, 1, 10]),  # fragmented, unordered
    ([6], [6]),
    (list(range(NB)), list(range(NB - 1, -1, -1))),  # everything, reversed
]


@pytest.mark.parametrize("make,block_dim", LAYOUTS, ids=["cpu", "gpu", "tuple"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("src_ids,dst_ids", ID_SETS)
def test_round_trip_is_bit_exact(make, block_dim, dtype, src_ids, dst_ids) -> None:
    src_kv, dst_kv = make(3, dtype, 1), make(3, dtype, 2)
    before = {k: (v.clone() if isinstance(v, torch.Tensor) else tuple(x.clone() for x in v))
              for k, v in dst_kv.items()}
    src, dst = BlockLayout(src_kv, NB), BlockLayout(dst_kv, NB)
    assert src.fingerprint == dst.fingerprint
    buf = src.gather(src_ids)
    assert buf.dtype == torch.uint8 and buf.numel() == src.nbytes(len(src_ids))
    dst.scatter_from(dst_ids, buf)

    for a, b in zip(blocks_of(src_kv, src_ids, block_dim), blocks_of(dst_kv, dst_ids, block_dim)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    # blocks not written keep their contents
    untouched = [b for b in range(NB) if b not in dst_ids]
    for a, b in zip(blocks_of(before, untouched, block_dim) if untouched else [],
                    blocks_of(dst_kv, untouched, block_dim) if untouched else []):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_gather_into_equals_gather_and_handles_larger_buffers() -> None:
    lay = BlockLayout(cpu_like(2, torch.bfloat16, 3), NB)
    ids = [4, 5, 9]
    out = torch.full((lay.nbytes(3) + 100,), 7, dtype=torch.uint8)
    lay.gather_into(ids, out)
    assert torch.equal(out[: lay.nbytes(3)], lay.gather(ids))
    assert (out[lay.nbytes(3):] == 7).all()


def test_bytes_per_block_and_flat_order() -> None:
    kv = cpu_like(2, torch.float32, 4)
    lay = BlockLayout(kv, NB)
    per_layer = 2 * 3 * 4 * 8 * 4
    assert lay.bytes_per_block == 2 * per_layer
    buf = lay.gather([2, 3])
    first = buf[: 2 * per_layer].view(torch.float32).view(2, 2, 3, 4, 8)  # layer 0, blocks 2-3
    assert torch.equal(first, kv["model.layers.0.attn"][:, 2:4])


def test_demo_model_shape() -> None:
    """SmolLM2-135M on vLLM CPU: 128 tokens = one block = 2*3*128*64*2*30 bytes."""
    kv = {f"l{i}": torch.empty(2, 4, 3, 128, 64, dtype=torch.bfloat16) for i in range(30)}
    assert BlockLayout(kv, 4).nbytes(1) == 2 * 3 * 128 * 64 * 2 * 30


def test_non_contiguous_tensor_uses_the_torch_path() -> None:
    base = torch.randn(NB, 3, 2, 4, 8)
    kv = {"l0": base.permute(2, 0, 3, 1, 4)}  # [2, NB, 4, 3, 8], not contiguous
    other = {"l0": torch.zeros(2, NB, 4, 3, 8)}
    src, dst = BlockLayout(kv, NB), BlockLayout(other, NB)
    dst.scatter_from([0, 1, 5], src.gather([3, 4, 8]))
    assert torch.equal(other["l0"][:, [0, 1, 5]], kv["l0"][:, [3, 4, 8]])


def test_block_axis_found_without_num_blocks() -> None:
    lay = BlockLayout({"l": torch.zeros(2, 50, 3, 4, 8)}, None)
    assert lay.planes[0].block_dim == 1


def test_errors() -> None:
    with pytest.raises(LayoutError, match="no KV cache tensors"):
        BlockLayout({}, NB)
    with pytest.raises(LayoutError, match="no axis of size num_blocks"):
        BlockLayout({"l": torch.zeros(2, 5, 3)}, NB)
    lay = BlockLayout(cpu_like(1, torch.float32, 0), NB)
    with pytest.raises(LayoutError, match="out of range"):
        lay.gather([NB])
    with pytest.raises(LayoutError, match="out of range"):
        lay.gather([-1])
    with pytest.raises(LayoutError, match="smaller"):
        lay.scatter_from([0, 1], torch.zeros(lay.nbytes(1), dtype=torch.uint8))
    with pytest.raises(LayoutError, match="smaller"):
        lay.gather_into([0, 1], torch.zeros(lay.nbytes(1), dtype=torch.uint8))
    assert lay.gather([]).numel() == 0


@pytest.mark.parametrize("change", ["dtype", "block", "layers", "heads", "axis"])
def test_fingerprint_detects_mismatch(change: str) -> None:
    base = BlockLayout({f"l{i}": torch.zeros(2, NB, 3, 4, 8) for i in range(2)}, NB)
    shape, dtype, layers = [2, NB, 3, 4, 8], torch.float32, 2
    if change == "dtype":
        dtype = torch.bfloat16
    elif change == "block":
        shape[3] = 8
    elif change == "layers":
        layers = 3
    elif change == "heads":
        shape[2] = 2
    elif change == "axis":
        shape = [NB, 2, 3, 4, 8]
    other = BlockLayout({f"l{i}": torch.zeros(*shape, dtype=dtype) for i in range(layers)}, NB)
    assert other.fingerprint != base.fingerprint


def test_fingerprint_ignores_block_count() -> None:
    """Prefill and decode instances have different cache sizes; that must not matter."""
    a = BlockLayout({"l": torch.zeros(2, 10, 3, 4, 8)}, 10)
    b = BlockLayout({"l": torch.zeros(2, 77, 3, 4, 8)}, 77)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize("make,block_dim", LAYOUTS, ids=["cpu", "gpu", "tuple"])
@pytest.mark.parametrize("src_ids,dst_ids", ID_SETS)
def test_regions_are_the_gathered_bytes_in_place(make, block_dim, src_ids, dst_ids) -> None:
    import numpy as np

    src = BlockLayout(make(3, torch.bfloat16, 1), NB)
    regions = src.regions(src_ids)
    assert regions is not None
    assert np.concatenate(regions).tobytes() == src.gather(src_ids).numpy().tobytes()
    # consecutive ids are one region per lead index and tensor; adjacent regions are merged
    assert len(regions) <= sum(len(src_ids) * max(1, int(np.prod(p.tensor.shape[:p.block_dim])))
                               for p in src.planes)


@pytest.mark.parametrize("make,block_dim", LAYOUTS, ids=["cpu", "gpu", "tuple"])
@pytest.mark.parametrize("src_ids,dst_ids", ID_SETS)
def test_scatter_from_parts_any_cut(make, block_dim, src_ids, dst_ids) -> None:
    import random

    src = BlockLayout(make(3, torch.float16, 1), NB)
    dst_kv = make(3, torch.float16, 2)
    dst = BlockLayout(dst_kv, NB)
    flat = src.gather(src_ids).numpy().tobytes()
    rnd = random.Random(len(src_ids))
    cuts = sorted(rnd.sample(range(1, len(flat)), 7))
    parts = [flat[a:b] for a, b in zip([0, *cuts], [*cuts, len(flat)])]
    dst.scatter_from_parts(dst_ids, parts)
    assert dst.gather(dst_ids).numpy().tobytes() == flat
    with pytest.raises(LayoutError, match="smaller"):
        dst.scatter_from_parts(dst_ids, parts[:-1])


def test_regions_none_for_non_contiguous_tensors() -> None:
    base = torch.randn(2, NB, 3, 4, 16)
    kv = {"l0": base[..., :8]}  # strided: not one contiguous block of memory
    layout = BlockLayout(kv, NB)
    assert layout.regions([1, 2]) is None
    dst_kv = {"l0": torch.zeros(2, NB, 3, 4, 8)}
    src_full = BlockLayout({"l0": base[..., :8].contiguous()}, NB)
    BlockLayout(dst_kv, NB).scatter_from_parts([1, 2], [src_full.gather([1, 2]).numpy().tobytes()])
    assert torch.equal(dst_kv["l0"][:, 1:3], base[:, 1:3, ..., :8])
