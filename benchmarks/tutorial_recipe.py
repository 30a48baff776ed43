"""The tutorial's training code path (its train_model with model_ft or model_conv), timed per epoch.

Used as the baseline by frozen_vs_seed.py and finetune_vs_seed.py, so both compare against one copy
of the tutorial's loop: ImageFolder + DataLoader(batch 4, shuffle) per phase, ResNet-18 with a new
fc, CrossEntropyLoss, SGD lr 0.001 momentum 0.9, StepLR 7/0.1, a train and a val phase per epoch;
torchvision's own transforms and torch.optim, as the tutorial has them.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
import torchvision
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets
from torchvision import transforms as T

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tutorial_epochs(data: Path, epochs: int, device, workers: int = 4, frozen: bool = False,
                    weights_file: Path | None = None) -> list[float]:
    """Seconds per epoch (train + val phase). frozen: the 'fixed feature extractor' scenario."""
    tf = {"train": T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]),
          "val": T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)])}
    image_datasets = {x: datasets.ImageFolder(data / x, tf[x]) for x in ("train", "val")}
    loaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=workers)
               for x in ("train", "val")}
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    if weights_file:
        model.load_state_dict(torch.load(weights_file, weights_only=True))
    if frozen:
        for p in model.parameters():
            p.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, 2)
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    opt = optim.SGD(model.fc.parameters() if frozen else model.parameters(), lr=0.001, momentum=0.9)
    sched = lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    times = []
    best_wts, best_acc = copy.deepcopy(model.state_dict()), 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        for phase in ("train", "val"):
            model.train(phase == "train")
            running_loss, running_corrects = 0.0, 0
            for inputs, labels in loaders[phase]:
                inputs, labels = inputs.to(device), labels.to(device)
                opt.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        opt.step()
                running_loss += loss.item() * inputs.size(0)  # the tutorial's statistics: a sync per step
                running_corrects += torch.sum(preds == labels.data)
            if phase == "train":
                sched.step()
            epoch_acc = float(running_corrects.double() / len(image_datasets[phase]))
            if phase == "val" and epoch_acc > best_acc:  # the tutorial's best-model copy
                best_acc, best_wts = epoch_acc, copy.deepcopy(model.state_dict())
        times.append(time.perf_counter() - t0)
    model.load_state_dict(best_wts)
    return times
