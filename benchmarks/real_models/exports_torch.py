"""torch.onnx exports of a small trained convnet (run by make_exports.py torch, in a venv with torch).

Trains a small Conv-BN-ReLU net with a Linear + BatchNorm1d head for a few deterministic SGD steps on
synthetic data (so that its running statistics are real, not 0/1), then writes:
  convnet_dynamo        default (dynamo) exporter from eval(), dynamic batch (its optimizer folds every BN)
  convnet_dynamo_unopt  the same with optimize=False: the BN nodes stay (the exports below keep them too)
  convnet_train_legacy  legacy exporter (dynamo=False), training=TrainingMode.TRAINING, example batch 2,
                        dynamic batch: BN nodes with training_mode=1 (a real defect, BN002 expected)
  convnet_fixed_b1      dynamo exporter, fixed batch 1, no dynamic axes; x.view(x.size(0), -1) bakes the batch
  convnet_fixed_b8      the same at batch 8
  convnet_dynamic_hw    dynamo exporter, dynamic batch, height and width
  handnorm_batch        gamma * (x - mean) / sqrt(var + eps) + beta with moments over dims (0, 2, 3), written
                        by hand (a real defect: batch statistics at inference, BN002 expected)
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from make_exports import entry
from torch import nn

SIZE = 64  # input height and width


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        chans = [3, 16, 32, 64]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 32)
        self.head_bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        # the flatten users write: in a fixed-batch export the Reshape's target shape holds the batch size
        x = x.view(x.size(0), -1)
        return self.out(torch.relu(self.head_bn(self.fc(x))))


class HandNorm(nn.Module):
    """A norm written by hand, as in many research repos: moments over (0, 2, 3) are batch statistics."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + self.eps) + self.beta


class HandNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm1 = HandNorm(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.norm2 = HandNorm(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.conv1(x)))
        x = torch.relu(self.norm2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def train(model: nn.Module, steps: int = 40) -> nn.Module:
    """A few SGD steps on a learnable synthetic task: the running statistics follow real activations."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x = torch.randn(32, 3, SIZE, SIZE, generator=gen) * 0.5 + 0.2
        y = (x[:, 0].mean(dim=(1, 2)) * 20).long().clamp(0, 9)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def export_dynamo(model: nn.Module, path: Path, batch: int, dynamic: dict[int, str], optimize: bool = True) -> None:
    x = torch.randn(batch, 3, SIZE, SIZE)
    shapes = (
        {"x": {axis: torch.export.Dim(name, min=1 if axis == 0 else 16, max=4096) for axis, name in dynamic.items()}}
        if dynamic
        else None
    )
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamo=True,
        dynamic_shapes=shapes,
        external_data=False,
        optimize=optimize,
    )


def export_legacy_training(model: nn.Module, path: Path) -> None:
    torch.onnx.export(
        model,
        (torch.randn(2, 3, SIZE, SIZE),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamo=False,
        training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
    )


def export(out: Path) -> list[dict]:
    """Writes the exports into ``out``; returns their exports.json entries."""
    source = f"torch {torch.__version__} export"

    def add(
        model_id: str,
        covers: str,
        batch: int | str,
        probe_args: list[str],
        batch_sizes: list[int],
        expect: str | None = None,
    ) -> None:
        entries.append(
            entry(
                source,
                model_id,
                out / f"{model_id}.onnx",
                covers,
                [{"name": "x", "shape": [batch, 3, SIZE, SIZE], "dtype": "float32"}],
                probe_args,
                batch_sizes,
                expect,
            )
        )

    entries: list[dict] = []
    torch.manual_seed(0)
    net = train(ConvNet())

    export_dynamo(net, out / "convnet_dynamo.onnx", 2, {0: "batch"})
    add(
        "convnet_dynamo",
        "torch default (dynamo) exporter from eval(), dynamic batch: its optimizer folds all 4 BN "
        "(3 conv + BatchNorm1d head) into Conv/Gemm",
        "B",
        [],
        [1, 2, 32],
    )

    export_dynamo(net, out / "convnet_dynamo_unopt.onnx", 2, {0: "batch"}, optimize=False)
    add(
        "convnet_dynamo_unopt",
        "dynamo exporter with optimize=False: 4 BN kept, node names like "
        "node__native_batch_norm_legit_no_training_3__0",
        "B",
        [],
        [1, 2, 32],
    )

    export_legacy_training(train(ConvNet()), out / "convnet_train_legacy.onnx")
    add(
        "convnet_train_legacy",
        "legacy exporter with training=TrainingMode.TRAINING, example batch 2, dynamic "
        "batch: training_mode=1 BNs (defect by construction)",
        "B",
        [],
        [1, 2, 32],
        "BN002",
    )

    for batch in (1, 8):
        export_dynamo(net, out / f"convnet_fixed_b{batch}.onnx", batch, {}, optimize=False)
        add(
            f"convnet_fixed_b{batch}",
            f"dynamo exporter (optimize=False), fixed batch {batch} (no dynamic axes), "
            "Reshape from x.view(x.size(0), -1) bakes the batch in",
            batch,
            [],
            [batch],
        )

    export_dynamo(net, out / "convnet_dynamic_hw.onnx", 2, {0: "batch", 2: "height", 3: "width"}, optimize=False)
    add(
        "convnet_dynamic_hw",
        "dynamo exporter (optimize=False), dynamic batch, height and width",
        "B",
        ["--input-shape", f"x:3x{SIZE}x{SIZE}"],
        [1, 2, 32],
    )

    torch.manual_seed(0)
    export_dynamo(train(HandNormNet()), out / "handnorm_batch.onnx", 2, {0: "batch"})
    add(
        "handnorm_batch",
        "hand-written gamma*(x-mean)/sqrt(var+eps)+beta, moments over dims (0,2,3) (batch "
        "statistics at inference: defect by construction), default exporter, dynamic batch",
        "B",
        [],
        [1, 2, 32],
        "BN002",
    )
    return entries
