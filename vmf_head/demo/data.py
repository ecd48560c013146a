"""Demo data: the digits that ship with scikit-learn, or a folder of the user's images, and DINO's
multi-crop augmentation written as batched tensor operations (no torchvision needed).

Images are float32 tensors (N, C, H, W) in [0, 1]. The augmentation draws, for every image and
every crop, a random resized crop (area fraction and aspect ratio as torchvision's
``RandomResizedCrop``), an optional horizontal flip, a brightness/contrast jitter and Gaussian
pixel noise, and applies the geometric part with one ``affine_grid`` / ``grid_sample`` call per
crop: a whole batch costs a few tensor operations, which keeps the CPU busy with the networks
rather than with Python loops over images.

Why no flips for digits: a mirrored 2, 3, 4, 5, 6, 7 or 9 is not the same digit (a mirrored 3 is
an epsilon, a mirrored 5 looks like a 2), so a flip would teach the network that different classes
are the same view. For a folder of natural photos flips are label-preserving, and DINO uses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class Dataset:
    """A labelled image set split into a training part (used by self-supervision without its
    labels, and as the k-NN memory / probe training set) and a held-out test part."""

    name: str
    train_images: torch.Tensor  # (N_train, C, H, W) float32 in [0, 1]
    train_labels: torch.Tensor  # (N_train,) int64
    test_images: torch.Tensor  # (N_test, C, H, W)
    test_labels: torch.Tensor  # (N_test,)
    class_names: list[str]
    global_size: int  # side of the global crops
    local_size: int  # side of the local crops
    flip: bool  # whether horizontal flips preserve the class

    @property
    def channels(self) -> int:
        return self.train_images.shape[1]


def _split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int):
    """Stratified split: the same fraction of every class is held out (fixed by ``seed``)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    gen = torch.Generator().manual_seed(seed)
    test_idx = []
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        n_test = round(test_fraction * idx.numel())
        if idx.numel() >= 2:
            n_test = min(max(n_test, 1), idx.numel() - 1)
        test_idx.append(idx[:n_test])
    test = torch.zeros(labels.numel(), dtype=torch.bool)
    test[torch.cat(test_idx)] = True
    return images[~test], labels[~test], images[test], labels[test]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 grey images of 0-9 (the UCI
    optical-digits test set), read from inside the installed package, no download."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as err:  # pragma: no cover - the demo extra installs it
        raise ImportError("the demo needs scikit-learn: pip install 'vmf-head[demo]'") from err
    bunch = _load()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    labels = torch.tensor(bunch.target, dtype=torch.long)
    tr_x, tr_y, te_x, te_y = _split(images, labels, test_fraction, seed)
    return Dataset("digits", tr_x, tr_y, te_x, te_y, [str(i) for i in range(10)], 16, 8, flip=False)


def load_image_folder(path: str | Path, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """An ImageFolder layout, ``path/<class name>/<image file>``, read with Pillow (which the demo
    extra installs with matplotlib; torchvision is not needed).

    Every image is converted to RGB and resized to ``size x size`` (the demo trains on the CPU:
    keep it small). Global crops have side ``size``, local crops ``size // 2``; flips are on.
    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - matplotlib depends on Pillow
        raise ImportError("--data needs Pillow: pip install 'vmf-head[demo]'") from err
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"--data must be a directory with one sub-directory per class, got {str(root)!r}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(
            f"--data {str(root)!r} must hold at least two class sub-directories (ImageFolder layout: "
            f"{root}/<class>/<image>), found {len(classes)}"
        )
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).rglob("*")):
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(file) as img:
                img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, 3))
            labels.append(label)
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=len(classes)) if labels else None
    if counts is None or (counts < 2).any():
        raise ValueError(
            f"every class in --data {str(root)!r} needs at least two images ({', '.join(IMAGE_SUFFIXES)}) "
            "so that one can be held out"
        )
    x = torch.stack(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.tensor(labels, dtype=torch.long)
    tr_x, tr_y, te_x, te_y = _split(x, y, test_fraction, seed)
    return Dataset(root.name, tr_x, tr_y, te_x, te_y, classes, size, size // 2, flip=True)


def load_dataset(path: str | Path | None, size: int = 32, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """The digits when ``path`` is None, else the ImageFolder at ``path`` (the CLIs' ``--data``)."""
    if path is None:
        return load_digits(test_fraction, seed=seed)
    return load_image_folder(path, size, test_fraction, seed=seed)


# Imbalance of the long-tailed data: the largest class keeps LONG_TAIL_RATIO times as many training images
# as the smallest. 10 is the mildest of the usual CIFAR-10-LT ratios (Cui et al., CVPR 2019, use 10-200);
# the digits have about 135 training images per class, so 10 leaves the smallest class 13 (enough for the
# k-NN and the probe), while 100 would leave it one.
LONG_TAIL_RATIO = 10.0


def long_tailed(data: Dataset, ratio: float = LONG_TAIL_RATIO, seed: int = 0) -> Dataset:
    """``data`` with its training split thinned geometrically: class ``c`` (of C, in label order) keeps
    ``round(n * ratio ** (-c / (C - 1)))`` of its training images, ``n`` the smallest class's count, so
    class 0 keeps ``n`` and class C - 1 keeps ``n / ratio``; which images stay is drawn with ``seed``.
    The held-out split is left balanced, as in the long-tailed benchmarks (CIFAR-LT, ImageNet-LT), so
    accuracy is measured equally on every class."""
    if not (ratio >= 1.0 and math.isfinite(ratio)):
        raise ValueError(f"the long-tail ratio must be a finite number >= 1, got {ratio!r}")
    classes = len(data.class_names)
    counts = torch.bincount(data.train_labels, minlength=classes)
    n = int(counts.min())
    gen = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(classes):
        share = ratio ** (-c / (classes - 1)) if classes > 1 else 1.0
        idx = (data.train_labels == c).nonzero().squeeze(1)
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)][: max(1, round(n * share))])
    kept = torch.cat(keep).sort().values
    return replace(
        data,
        name=f"{data.name}-longtailed{ratio:g}",
        train_images=data.train_images[kept],
        train_labels=data.train_labels[kept],
    )


class MultiCrop:
    """DINO's multi-crop views of a batch: 2 global crops and ``n_local`` local crops.

    Global crops cover ``global_scale`` of the image area and have side ``global_size``; local
    crops cover ``local_scale`` and have side ``local_size``. Every crop is then jittered
    (brightness and contrast factors in ``[1 - jitter, 1 + jitter]``), gets N(0, noise^2) pixel
    noise, and is standardised with ``mean`` / ``std`` (per channel, of the training set).
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        n_local: int,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        flip: bool,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.1, 0.4),
        jitter: float = 0.4,
        noise: float = 0.05,
    ) -> None:
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.global_size, self.local_size, self.n_local = global_size, local_size, n_local
        self.mean, self.std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
        self.flip, self.global_scale, self.local_scale = flip, global_scale, local_scale
        self.jitter, self.noise = jitter, noise

    def _crop(self, x: torch.Tensor, size: int, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        rand = torch.rand(b, 7, generator=gen)
        area = scale[0] + (scale[1] - scale[0]) * rand[:, 0]
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand[:, 1]
        ratio = torch.exp(log_ratio)
        # Half-widths in affine_grid's normalised coordinates ([-1, 1] spans the image).
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (1 - sx) * (2 * rand[:, 2] - 1)
        ty = (1 - sy) * (2 * rand[:, 3] - 1)
        flip = torch.where(rand[:, 4] < 0.5, -1.0, 1.0) if self.flip else torch.ones(b)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
        theta[:, 1, 1], theta[:, 1, 2] = sy, ty
        grid = F.affine_grid(theta.to(x.device), [b, x.shape[1], size, size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        brightness = 1 + self.jitter * (2 * rand[:, 5] - 1)
        contrast = 1 + self.jitter * (2 * rand[:, 6] - 1)
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast.view(-1, 1, 1, 1).to(x.device) + mean
        out = out * brightness.view(-1, 1, 1, 1).to(x.device)
        noise = torch.randn(out.shape, generator=gen).to(x.device)
        out = (out + self.noise * noise).clamp(0, 1)
        return (out - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        """x: (B, C, H, W) in [0, 1]. Returns ``2 + n_local`` tensors, globals first."""
        crops = [self._crop(x, self.global_size, self.global_scale, gen) for _ in range(2)]
        crops += [self._crop(x, self.local_size, self.local_scale, gen) for _ in range(self.n_local)]
        return crops

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The un-augmented view used for evaluation: the whole image at the global size."""
        out = F.interpolate(x, size=(self.global_size, self.global_size), mode="bilinear", align_corners=False)
        return (out - self.mean.to(x.device)) / self.std.to(x.device)
