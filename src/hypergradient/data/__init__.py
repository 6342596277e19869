"""Datasets: small embedded ones that ship with scikit-learn (the default), and image
datasets read from their original files (checked by md5, downloaded on request).

Examples:
    >>> import hypergradient as hg
    >>> split = hg.data.load_digits_split(n_train=100, n_val=50, seed=0)
    >>> split.x_train.shape, split.y_val.shape, split.num_classes
    (torch.Size([100, 64]), torch.Size([50]), 10)
    >>> noisy, flipped = hg.data.add_label_noise(split.y_train, 0.2, split.num_classes)
    >>> int(flipped.sum())  # exactly 20% of the 100 training labels changed
    20
"""

from .download import RemoteFile as RemoteFile
from .download import default_data_dir as default_data_dir
from .download import fetch as fetch
from .download import fetch_files as fetch_files
from .embedded import Split as Split
from .embedded import load_digits_split as load_digits_split
from .vision import OmniglotImages as OmniglotImages
from .vision import OneShotRun as OneShotRun
from .vision import add_label_noise as add_label_noise
from .vision import load_cifar10 as load_cifar10
from .vision import load_fashion_mnist as load_fashion_mnist
from .vision import load_mnist as load_mnist
from .vision import load_omniglot as load_omniglot
from .vision import load_omniglot_runs as load_omniglot_runs
from .vision import to_float_split as to_float_split

__all__ = [
    "OmniglotImages",
    "OneShotRun",
    "RemoteFile",
    "Split",
    "add_label_noise",
    "default_data_dir",
    "fetch",
    "fetch_files",
    "load_cifar10",
    "load_digits_split",
    "load_fashion_mnist",
    "load_mnist",
    "load_omniglot",
    "load_omniglot_runs",
    "to_float_split",
]
