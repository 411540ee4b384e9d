"""Train the course's smallNetTrain on CIFAR-10 and write `smallNetSaved` (a plain state_dict).

Seeded and single-process so a rerun on the same machine and torch gives the same file.
Usage: python scripts/train_smallnet.py --data-dir ../shared/cifar10 --epochs 6 --seed 0
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from bnstrip.io.checkpoint import save_checkpoint
from bnstrip.homework.data import load_split, to_float_tensor
from bnstrip.homework.models import SmallNetTrain


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start:start + batch_size])
            correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="smallNetSaved")
    args = parser.parse_args()

    console = Console(stderr=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    train = load_split("train", args.data_dir)
    test = load_split("test", args.data_dir)
    x_train, y_train = to_float_tensor(train.images), torch.from_numpy(train.labels)
    x_test, y_test = to_float_tensor(test.images), torch.from_numpy(test.labels)

    model = SmallNetTrain()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    started = time.perf_counter()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console) as progress:
        for epoch in range(1, args.epochs + 1):
            model.train()
            task = progress.add_task(f"epoch {epoch}/{args.epochs}", total=steps_per_epoch)
            order = torch.from_numpy(rng.permutation(len(y_train)))
            total_loss, correct = 0.0, 0
            for step in range(steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                xb, yb = x_train[idx], y_train[idx]
                flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
                xb[flip] = xb[flip].flip(-1)  # random horizontal flip
                logits = model(xb)
                loss = loss_fn(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                total_loss += float(loss) * len(idx)
                correct += int((logits.argmax(1) == yb).sum())
                progress.advance(task)
            test_acc = evaluate(model, x_test, y_test)
            progress.remove_task(task)
            console.print(f"epoch {epoch}: loss {total_loss / len(y_train):.4f}  train acc {correct / len(y_train):.4f}  "
                          f"test acc {test_acc:.4f}  ({time.perf_counter() - started:.0f} s)")
    save_checkpoint(model.state_dict(), args.out, force=True)
    console.print(f"wrote {args.out}: test accuracy {test_acc:.4f}, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
