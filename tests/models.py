"""Tiny models and tasks for the pipeline tests, built in code (no downloads)."""
import torch
from torch import nn
from torch.utils.data import Dataset

import pyinf

from . import seeds


class MatmulLinear(nn.Linear):
    """A Linear subclass with its own forward (as wrappers such as quantised or adapter
    layers have): pyinf keeps that forward (the identity capture path) and, like
    kronfluence, relies on it computing y = W x + b."""

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight.T).reshape(*x.shape[:-1], -1)


class TinyMLP(nn.Module):
    def __init__(self, d_in=5, hidden=7, d_out=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, 4, bias=False)
        self.head = MatmulLinear(4, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class RegressionDataset(Dataset):
    def __init__(self, n, d_in=5, d_out=3, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seeds.offset(seed))
        self.x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype)
        self.y = torch.randn(n, d_out, generator=g, dtype=torch.float64).to(dtype)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


class MLPTask(pyinf.Task):
    """Summed squared error; sample=True draws targets from N(prediction, 1)."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        pred = model(x)
        if sample:
            with torch.no_grad():
                y = pred + torch.randn_like(pred)
        return 0.5 * ((pred - y) ** 2).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)


class TokenDataset(Dataset):
    """Random token sequences of varied lengths; queries label only their last tokens."""

    def __init__(self, n, vocab=40, min_len=3, max_len=11, seed=0, completion=None):
        g = torch.Generator().manual_seed(seeds.offset(seed))
        self.items = []
        for _ in range(n):
            length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
            ids = torch.randint(1, vocab, (length,), generator=g)
            labels = ids.clone()
            if completion is not None:
                labels[: max(1, length - completion)] = -100
            self.items.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def tiny_gpt2(seed=0, dtype=torch.float32, vocab=40):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=vocab, n_positions=32, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    with torch.random.fork_rng():  # the weights from this seed; the test's own draws left as they were
        torch.manual_seed(seeds.offset(seed))
        return GPT2LMHeadModel(cfg).to(dtype).eval()


class TinyCNN(nn.Module):
    """Convolutions of every kind pyinf tracks (Conv2d padded, strided and dilated, with and
    without bias, padding "same" with reflection; Conv1d) before a Linear head."""

    def __init__(self, d_out=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, (2, 3), stride=2, dilation=(1, 2), bias=False)
        self.c3 = nn.Conv1d(4, 2, 2, padding="same", padding_mode="reflect")
        self.head = nn.Linear(2, d_out)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.head(torch.tanh(self.c3(h.flatten(2))).mean(-1))


class ImageDataset(RegressionDataset):
    """Random [2, 7, 9] images with regression targets (for MLPTask)."""

    def __init__(self, n, d_out=3, seed=0, dtype=torch.float32):
        g = torch.Generator().manual_seed(seeds.offset(seed))
        self.x = torch.randn(n, 2, 7, 9, generator=g, dtype=torch.float64).to(dtype)
        self.y = torch.randn(n, d_out, generator=g, dtype=torch.float64).to(dtype)


class SharedLayers(nn.Module):
    """Weights shared across depth (ALBERT's layers, a recurrent cell): ``cell`` runs three
    times per forward, ``fc`` twice, ``head`` once."""

    def __init__(self, d=5, d_out=3):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.cell = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, d_out)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        for _ in range(3):
            h = torch.tanh(self.cell(h) + h)
        return self.head(torch.tanh(self.fc(h)))
