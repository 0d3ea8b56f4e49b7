"""CIFAR-10 and CIFAR-100 (``data.name=cifar10|cifar100``): torchvision's pickled batches, read
into uint8 tensors, downloaded first when the recipe allows it and the network answers."""

from __future__ import annotations

import socket
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision

from ..errors import DataError
from .splits import ImageTensors

CIFAR_CLASSES = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
_DOWNLOAD_CONNECT_TIMEOUT_S = 10.0  # how long to wait for the download server before giving up
_DOWNLOAD_STALL_TIMEOUT_S = 60.0  # how long a started download may go without receiving data


def load_cifar(
    name: str, root: Path, *, download: bool, splits: Sequence[str] = ("train", "test")
) -> tuple[list[ImageTensors], list[str]]:
    """Read the named splits of CIFAR's pickled batches through torchvision; download them first when asked."""
    dataset_cls = CIFAR_CLASSES[name]
    try:
        first = dataset_cls(str(root), train=splits[0] == "train", download=False)
    except RuntimeError:
        # torchvision raises RuntimeError for missing or corrupt files (it checks md5 sums).
        if not download:
            raise _cifar_missing_error(name, dataset_cls, root, reason="download is off (data.download=false)")
        _download_cifar(name, dataset_cls, root)
        first = dataset_cls(str(root), train=splits[0] == "train", download=False)
    sets = [first] + [dataset_cls(str(root), train=split == "train", download=False) for split in splits[1:]]
    return [_cifar_tensors(d) for d in sets], list(first.classes)


def _cifar_tensors(dataset: torchvision.datasets.CIFAR10) -> ImageTensors:
    # torchvision keeps the pixels as uint8 (N, 32, 32, 3) HWC numpy; we want (N, 3, 32, 32).
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
    return ImageTensors(images, torch.tensor(dataset.targets, dtype=torch.int64))


def _download_cifar(name: str, dataset_cls: type, root: Path) -> None:
    """Download CIFAR with torchvision, failing within seconds when there is no network.

    torchvision's ``urlopen`` has no timeout, so on a machine behind a firewall that drops packets it
    would hang for minutes. A short connection attempt first turns "no network" into an error in at
    most ``_DOWNLOAD_CONNECT_TIMEOUT_S``; a socket timeout during the download stops a stalled one.
    """
    host = urllib.parse.urlsplit(dataset_cls.url).hostname
    try:
        socket.create_connection((host, 443), timeout=_DOWNLOAD_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise _cifar_missing_error(name, dataset_cls, root, reason=f"{host} cannot be reached ({err})") from None
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(_DOWNLOAD_STALL_TIMEOUT_S)  # urllib gives no other way to set it
    try:
        dataset_cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as err:  # URLError and socket timeouts are OSErrors
        raise _cifar_missing_error(name, dataset_cls, root, reason=f"the download failed ({err})") from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def _cifar_missing_error(name: str, dataset_cls: type, root: Path, *, reason: str) -> DataError:
    folder = root / dataset_cls.base_folder
    hints = []
    if root.name == dataset_cls.base_folder:
        hints.append(f"data.root should be the folder that contains {dataset_cls.base_folder}, i.e. {root.parent}.")
    if (root / "train").is_dir():
        hints.append(f"{root} holds a train/ folder: for an ImageFolder copy set data.name=imagefolder.")
    return DataError(
        f"{name} is not in {folder} (missing or corrupt files) and {reason}.",
        " ".join(
            hints
            + [
                f"Download it on a connected machine into {root} (finetune with data.download=true, or "
                f"torchvision.datasets.{dataset_cls.__name__}('{root}', download=True)), point data.root "
                "at a folder that already holds it, or use data.name=imagefolder with data.root at an "
                "ImageFolder copy (train/<class>/*.jpg and test/<class>/*.jpg)."
            ]
        ),
    )
