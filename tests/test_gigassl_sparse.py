"""Giga-SSL sparse maps and the sparse ResNet-18 layer4: each sparse layer equals a dense convolution
evaluated at the active sites, gradients included (the CPU backward shim); the size rule, duplicate
merging, coordinate augmentation and the ImageNet layer4 initialisation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from slidestream.pipelines.features import Bag
from slidestream.trainers.gigassl.sparse_maps import (
    augment_coords,
    build_batch,
    draw_view,
    grid_step,
    map_size,
    merge_duplicates,
    to_cells,
)
from slidestream.trainers.models.sparse_pool import GigaSSLNet, SparseResNetPool, load_resnet18_layer4
from slidestream.trainers.spconv_compat import cpu_shim_active

D = 8


def _batch(seed: int = 0, d: int = D):
    """Two slides on small maps (slide 1 touches the last row and column), float64 features."""
    g = torch.Generator().manual_seed(seed)
    cells0 = np.array([[0, 0], [1, 0], [2, 1], [4, 3], [3, 3], [1, 4]])
    cells1 = np.array([[0, 2], [5, 5], [6, 6], [2, 6], [6, 0], [3, 4], [4, 4]])
    maps = [(c, torch.randn(len(c), d, generator=g)) for c in (cells0, cells1)]
    batch = build_batch(maps)
    batch.features = batch.features.double()
    return batch


def _dense(batch) -> torch.Tensor:
    """The dense (B, D, H, W) map of a SparseBatch or spconv tensor (zeros off the active sites)."""
    h, w = batch.spatial_shape
    out = torch.zeros(batch.batch_size, batch.features.shape[1], h, w, dtype=batch.features.dtype)
    i = batch.indices.long()
    return out.index_put((i[:, 0], torch.arange(out.shape[1])[:, None], i[:, 1], i[:, 2]), batch.features.T)


def _at(dense: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    i = indices.long()
    return dense[i[:, 0], :, i[:, 1], i[:, 2]]


def _pool(seed: int = 1, d: int = D, dim: int = 12) -> SparseResNetPool:
    torch.manual_seed(seed)
    return SparseResNetPool(d, dim).double()


def _active_after_stride(batch) -> torch.Tensor:
    mask = (_dense(batch).abs().sum(1, keepdim=True) > 0).double()
    return F.max_pool2d(mask, 3, 2)[:, 0] > 0


def test_size_rule():
    assert [map_size(n) for n in (1, 4, 5, 6, 7, 8, 11, 12, 16)] == [7, 7, 7, 7, 7, 11, 11, 15, 19]
    for extent in range(1, 60):
        size = map_size(extent)
        assert size >= max(extent, 5) and size % 2 == 1 and (size // 2) % 2 == 1
        out = (size - 3) // 2 + 1  # a 3×3 stride-2 window without padding
        assert 2 * (out - 1) + 2 == size - 1  # the last window reaches the last cell
        assert out % 2 == 1 and 2 * ((out - 3) // 2) + 2 == out - 1  # and so at the next level


def test_edge_sites_are_kept_by_the_strided_conv():
    batch = _batch()  # slide 1 has sites in the last row and the last column of its 7×7 map
    assert batch.spatial_shape == [7, 7] and int(batch.indices[:, 1:].max()) == 6
    feats = batch.features.clone().requires_grad_(True)
    batch.features = feats
    pooled = _pool().pool(batch.tensor())
    (grad,) = torch.autograd.grad(pooled.features.sum(), feats)
    assert (grad > 0).all()  # every site, edges included, reaches some stride-2 window


def test_duplicates_are_merged_by_mean():
    cells = torch.tensor([[0, 1], [2, 3], [0, 1], [0, 1], [5, 5]])
    feats = torch.arange(10.0, dtype=torch.float64).reshape(5, 2)
    sites, merged = merge_duplicates(cells, feats)
    found = {tuple(s): m.tolist() for s, m in zip(sites.tolist(), merged, strict=True)}
    assert found == {(0, 1): [10 / 3, 13 / 3], (2, 3): [2.0, 3.0], (5, 5): [8.0, 9.0]}
    batch = build_batch([(np.array([[3, 0], [3, 0], [1, 2]]), torch.tensor([[1.0], [3.0], [5.0]]))])
    assert batch.indices.tolist() == [[0, 0, 3], [0, 2, 1]]  # (slide, row = y, col = x)
    assert batch.features.flatten().tolist() == [2.0, 5.0] and batch.spatial_shape == [7, 7]


def test_cells_and_coordinate_augmentation():
    xy = np.array([[1000.0, 2000.0], [1224.0, 2000.0], [1000.0, 2448.0]])
    assert to_cells(xy, 224.0).tolist() == [[0, 0], [1, 0], [0, 2]]
    assert grid_step(xy, "s") == 224.0
    rng = np.random.default_rng(0)
    outs = [augment_coords(xy, rng, 224.0) for _ in range(200)]
    for out in outs:  # a rotation, flips and a per-axis scale in [0.7, 1.3] keep distances in range
        d = np.linalg.norm(out[1] - out[0])
        assert 0.7 * 224 - 1e-6 <= d <= 1.3 * 224 + 1e-6
    first = np.array([o[1] - o[0] for o in outs])
    angles = np.arctan2(first[:, 1], first[:, 0])
    assert np.histogram(angles, bins=4, range=(-math.pi, math.pi))[0].min() > 20  # all directions occur
    cells = {tuple(map(tuple, to_cells(o, 224.0))) for o in outs}
    assert len(cells) > 20
    for o in outs:
        c = to_cells(o, 224.0)
        assert c.min() == 0 and c.dtype == np.int64


def test_draw_view_uses_one_augmentation():
    aug = torch.tensor([0] * 4 + [1] * 4, dtype=torch.int16)
    feats = torch.arange(8.0)[:, None].repeat(1, 3)
    bag = Bag("s", feats, torch.arange(16, dtype=torch.int32).reshape(8, 2), None, aug)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(30):
        xy, f = draw_view(bag, 6, rng)
        rows = f[:, 0].long()
        assert len(xy) == 6 and len(set((rows // 4).tolist())) == 1
        seen.add(int(rows[0]) // 4)
    assert seen == {0, 1}


def test_each_sparse_layer_equals_a_dense_convolution():
    batch = _batch()
    pool = _pool()
    x = batch.tensor()
    dense = _dense(batch)
    # strided 3×3 (no padding): the output's sites are exactly the windows holding an active input
    out = pool.conv1(x)
    ref = F.conv2d(dense, pool.conv1.weight.permute(0, 3, 1, 2), stride=2)
    assert torch.allclose(out.features, _at(ref, out.indices), atol=1e-12)
    assert len(out.indices) == int(_active_after_stride(batch).sum())
    # submanifold 3×3: the dense convolution (padding 1) read at the input's own sites
    mid = out.replace_feature(torch.randn(len(out.indices), 12, dtype=torch.float64))
    sub = pool.conv2(mid)
    ref = F.conv2d(_dense(mid), pool.conv2.weight.permute(0, 3, 1, 2), padding=1)
    assert torch.equal(sub.indices, mid.indices)
    assert torch.allclose(sub.features, _at(ref, sub.indices), atol=1e-12)
    # shortcut pooling: 3×3 stride-2 average pooling (÷ 9, zeros outside the active sites)
    pooled = pool.pool(x)
    assert torch.allclose(pooled.features, _at(F.avg_pool2d(dense, 3, 2), pooled.indices), atol=1e-12)
    # submanifold 1×1 = a per-site linear map
    ref = F.conv2d(dense, pool.short.weight[:, :, None, None])
    assert torch.allclose(pool.short(batch.features), _at(ref, batch.indices), atol=1e-12)


def _dense_pool(pool: SparseResNetPool, dense: torch.Tensor) -> torch.Tensor:
    """The same network on dense maps (eval-mode BN), masked to the sparse network's active sites."""

    def bn(y, norm):
        stats = (norm.running_mean, norm.running_var, norm.weight, norm.bias)
        return F.batch_norm(y, *stats, training=False, eps=norm.eps)

    def w(conv):
        return conv.weight.permute(0, 3, 1, 2)

    mask = (F.max_pool2d((dense.abs().sum(1, keepdim=True) > 0).double(), 3, 2) > 0).double()
    out = F.relu(bn(F.conv2d(dense, w(pool.conv1), stride=2), pool.bn1)) * mask
    out = bn(F.conv2d(out, w(pool.conv2), padding=1), pool.bn2) * mask
    short = bn(F.conv2d(F.avg_pool2d(dense, 3, 2), pool.short.weight[:, :, None, None]), pool.bn_short)
    out = F.relu(out + short) * mask
    inner = F.relu(bn(F.conv2d(out, w(pool.conv3), padding=1), pool.bn3)) * mask
    inner = bn(F.conv2d(inner, w(pool.conv4), padding=1), pool.bn4) * mask
    out = F.relu(inner + out) * mask
    return out.sum((2, 3)) / mask.sum((2, 3))


def test_submanifold_convolution_on_cpu_threads_is_exact_every_time():
    """spconv's CPU kernels race on several threads (about one run in five went wrong on two cores);
    the compat layer runs them on one thread."""
    torch.set_num_threads(max(2, torch.get_num_threads()))
    pool = _pool()
    for seed in range(300):
        mid = pool.conv1(_batch(seed).tensor())
        mid = mid.replace_feature(torch.randn(len(mid.indices), 12, dtype=torch.float64))
        ref = F.conv2d(_dense(mid), pool.conv2.weight.permute(0, 3, 1, 2), padding=1)
        assert torch.allclose(pool.conv2(mid).features, _at(ref, mid.indices), atol=1e-12), seed
    assert torch.get_num_threads() >= 2  # the wrapper gives the threads back


def test_whole_pooling_network_and_its_gradients_equal_the_dense_network():
    assert cpu_shim_active == (not torch.cuda.is_available())
    batch = _batch(3)
    pool = _pool(4)
    with torch.no_grad():  # non-trivial BN statistics
        for norm in (pool.bn1, pool.bn2, pool.bn_short, pool.bn3, pool.bn4):
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    pool.eval()
    feats = batch.features.clone().requires_grad_(True)
    batch.features = feats
    h = pool(batch.tensor())
    weights = [pool.conv1.weight, pool.conv2.weight, pool.conv4.weight, pool.short.weight]
    target = torch.randn_like(h)
    grads = torch.autograd.grad((h * target).sum(), [feats, *weights])

    dense_feats = feats.detach().clone().requires_grad_(True)
    batch.features = dense_feats
    ref = _dense_pool(pool, _dense(batch))
    ref_grads = torch.autograd.grad((ref * target).sum(), [dense_feats, *weights])
    assert h.shape == (2, 12)
    assert torch.allclose(h, ref, atol=1e-7)  # the ÷ 9 taps are float32 values
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-7)
    assert pool.pool.weight.grad is None and not pool.pool.weight.requires_grad


def test_training_mode_net_gives_embeddings_and_projections():
    torch.manual_seed(0)
    net = GigaSSLNet(D, 16, 8)
    batch = _batch(5)
    batch.features = batch.features.float()
    h, z = net(batch.tensor())
    assert h.shape == (2, 16) and z.shape == (2, 8)
    (z.sum() + h.sum()).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_imagenet_layer4_initialisation(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        resnet.layer4[0].downsample[1].running_mean.uniform_(-1, 1)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    pool = SparseResNetPool(256, 512)
    load_resnet18_layer4(pool, str(path))
    batch = build_batch([(np.array([[0, 0], [2, 1], [3, 3]]), torch.randn(3, 256))])
    dense = _dense(batch)
    block = resnet.layer4[0]
    with torch.no_grad():
        out = pool.conv1(batch.tensor())
        ref = F.conv2d(dense, block.conv1.weight, stride=2)
        assert torch.allclose(out.features, _at(ref, out.indices), atol=1e-5)
        ref = F.conv2d(dense, block.downsample[0].weight)
        assert torch.allclose(pool.short(batch.features), _at(ref, batch.indices), atol=1e-5)
    assert torch.equal(pool.bn_short.running_mean, block.downsample[1].running_mean)
    assert torch.equal(pool.conv4.weight, resnet.layer4[1].conv2.weight.permute(0, 2, 3, 1))

    broken = tmp_path / "broken.pth"
    torch.save({k: v for k, v in resnet.state_dict().items() if "layer4.1.bn2" not in k}, broken)
    with pytest.raises(ValueError, match=r"layer4\.1\.bn2\.weight"):
        load_resnet18_layer4(SparseResNetPool(256, 512), str(broken))
    with pytest.raises(ValueError, match="384-d"):
        load_resnet18_layer4(SparseResNetPool(384, 512), str(path))
