"""Rebuilding a folded module from OUT and its manifest, and strict loading with one-line errors."""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnstrip._torch import own_parameters
from bnstrip.errors import InputError
from bnstrip.fold.rewrite import add_bias, set_unfolded_eps, strip_graph
from bnstrip.fold.rules_adjacent import out_channels
from bnstrip.io.checkpoint import key_mismatch
from bnstrip.trace.bn_registry import folded_replacement, is_batchnorm_like
from bnstrip.trace.fx_tracer import fx_trace
from bnstrip.trace.opgraph import ops_from_fx

def folded_skeleton(model: nn.Module, manifest: dict[str, Any], source: str = "manifest") -> nn.Module:
    """A copy of `model` with the manifest's structure (BNs removed, biases added) so OUT loads strictly."""
    work = copy.deepcopy(model).eval()
    form = manifest["form"]
    bn_names = [entry["bn"] for entry in manifest["folded"]]
    eps = manifest.get("eps")
    if form == "keep-structure":
        return work
    if form == "modules":
        for name in bn_names:
            try:
                module = work.get_submodule(name)
            except AttributeError:
                module = None
            if module is None or not is_batchnorm_like(module):
                raise InputError(f"{source}: folded BatchNorm {name!r} is not a BatchNorm of {type(model).__name__}; "
                                 "pass the model the checkpoint was folded from")
            work.set_submodule(name, folded_replacement(module))
        result: nn.Module = work
    else:
        gm, _, error = fx_trace(work)
        if gm is None:
            raise InputError(f"{source}: {type(model).__name__} no longer traces with torch.fx ({error}); "
                             "pass the model the checkpoint was folded from")
        ops = {op.name: op for op in ops_from_fx(gm, root=work) if op.kind == "bn"}
        missing = [name for name in bn_names if name not in ops]
        if missing:
            raise InputError(f"{source}: folded BatchNorm {missing[0]!r} is not in {type(model).__name__}'s graph; "
                             "pass the model the checkpoint was folded from")
        strip_graph(gm, [ops[name] for name in bn_names])
        result = gm
    for name in manifest["gained_bias"]:
        try:
            layer = result.get_submodule(name)
        except AttributeError:
            layer = None
        if layer is None or getattr(layer, "weight", None) is None or "bias" not in own_parameters(layer):
            raise InputError(f"{source}: layer {name!r} that gained a bias is not in {type(model).__name__}; "
                             "pass the model the checkpoint was folded from")
        if layer.bias is None:
            add_bias(layer, torch.zeros(out_channels(layer), dtype=layer.weight.dtype, device=layer.weight.device))
    set_unfolded_eps(result, set(bn_names), eps)
    if manifest.get("merged"):  # reparameterize=True: re-apply the branch merges by name
        from bnstrip.fold.reparam import rebuild_merges

        result = rebuild_merges(result, manifest["merged"], source)
    return result.eval()


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """load_state_dict(strict=True) with a one-line InputError that names what does not match."""
    expected = model.state_dict()
    mismatch = key_mismatch(expected, state)
    if mismatch:
        raise InputError(f"{source}: does not load strictly into {type(model).__name__} ({mismatch}); "
                         "pass the matching model / checkpoint")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(f"{source}: {key} has shape {tuple(state[key].shape)} but {type(model).__name__} expects "
                             f"{tuple(tensor.shape)}; pass the matching model / checkpoint")
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except (RuntimeError, TypeError) as exc:
        text = str(exc).strip().splitlines()
        raise InputError(f"{source}: does not load into {type(model).__name__} ({text[0] if text else exc})") from None


def _model_and_path(first: Any, second: Any) -> tuple[nn.Module, str | os.PathLike[str]]:
    """load_folded(PATH, ModelClass_or_factory) or load_folded(model_instance, PATH): the model built, and the path."""
    import os

    path, model = (first, second) if isinstance(first, (str, os.PathLike)) else (second, first)
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"load_folded: expected a path and the model's class or factory, got {type(first).__name__} "
                         f"and {type(second).__name__}")
    if isinstance(model, nn.Module):
        return model, path
    if not callable(model):
        raise InputError(f"{path}: load_folded needs the model's class, a factory that builds it, or a fresh "
                         f"instance, not a {type(model).__name__}")
    built = model()
    if not isinstance(built, nn.Module):
        raise InputError(f"{path}: {getattr(model, '__name__', model)!r}() returned a {type(built).__name__}, not a "
                         "torch.nn.Module; pass the model's class or a factory that returns one")
    return built, path


def load_folded(first: Any, second: Any, *, eps: float | None = None) -> nn.Module:
    """The folded module saved by `FoldResult.save(PATH)` or `bnstrip fuse --arch`, rebuilt from PATH and its manifest.

    `load_folded(PATH, ModelClass)` (a class or a factory with no required arguments), or
    `load_folded(model, PATH)` with a fresh instance of the original class.

    The manifest is untrusted input: its schema and bounds are checked (io.manifest.validate_manifest), it must
    name OUT's sha256, every name in it must be a module of `model` of the right kind and agree with the
    checkpoint's keys (check_manifest_agrees).  Its `eps` is written into BatchNorms only when that changes
    nothing, or when something bound to OUT confirms it: OUT's own metadata (a .safetensors OUT records the eps
    it was folded with) or the caller's `eps` (a .pt OUT cannot record it).
    """
    from bnstrip.io.checkpoint import load_checkpoint
    from bnstrip.io.manifest import manifest_path, read_manifest

    model, path = _model_and_path(first, second)
    if not manifest_path(path).exists() and Path(path).is_file():
        raise InputError(f"{path}: no manifest ({manifest_path(path).name}) says which BatchNorms were folded into "
                         "it, so it cannot be rebuilt (and load_state_dict(strict=False) into the original class "
                         "would give a wrong model); save folds with result.save(PATH) or fuse_file, or fold a "
                         "fresh model with bnstrip.fold_model and load this file into result.model strictly")
    manifest = read_manifest(path)
    loaded = load_checkpoint(path)
    if manifest["output_sha256"] != loaded.sha256:
        raise InputError(f"{path}: file changed since {manifest_path(path)} was written (sha256 differs); "
                         "fold it again with fuse_file")
    check_manifest_agrees(model, manifest, loaded.state_dict, str(path))
    check_manifest_eps(model, manifest, loaded.metadata, str(path), eps)
    skeleton = folded_skeleton(model, manifest, source=str(path))
    load_state_strict(skeleton, loaded.state_dict, str(path))
    return skeleton.eval()


def _disagrees(source: str, field: str, what: str) -> InputError:
    return InputError(f"{source}: manifest field '{field}' {what}; the manifest does not belong to this checkpoint "
                      "and model, fold it again with fuse_file")


def check_manifest_agrees(model: nn.Module, manifest: dict[str, Any], state: dict[str, Any], source: str) -> None:
    """Every name in the manifest is a module of `model` of the right kind, and agrees with the checkpoint's keys."""
    modules = dict(model.named_modules())
    prefixes = {key.rsplit(".", 1)[0] for key in state}
    graph_ops = manifest["form"] == "graph"  # there functional BatchNorms are graph ops: folded_skeleton finds them
    for field in ("folded", "skipped"):
        for entry in manifest[field]:
            if not (graph_ops and entry["bn"] not in modules) and not is_batchnorm_like(modules.get(entry["bn"])):
                raise _disagrees(source, field, f"names {entry['bn']!r}, not a BatchNorm of {type(model).__name__}")
    for entry in manifest["folded"]:
        if entry["layer"] not in modules:
            raise _disagrees(source, "folded", f"names layer {entry['layer']!r}, not a module of {type(model).__name__}")
        if manifest["form"] != "keep-structure" and entry["bn"] in prefixes:
            raise _disagrees(source, "folded", f"says {entry['bn']!r} was folded away, but the checkpoint holds its tensors")
    for entry in manifest["skipped"]:
        module = modules.get(entry["bn"])
        if module is not None and module.state_dict() and entry["bn"] not in prefixes:  # a BN without tensors holds none
            raise _disagrees(source, "skipped", f"says {entry['bn']!r} was kept, but the checkpoint has no tensors of it")
    merged = [str(name) for merge in manifest["merged"] for name in [merge.get("conv"), *merge["branches"]]]
    for name in manifest["gained_bias"]:
        if f"{name}.bias" not in state and not any(name == m or name.startswith(f"{m}.") for m in merged):
            raise _disagrees(source, "gained_bias", f"says {name!r} gained a bias, but the checkpoint has no {name}.bias")


def check_manifest_eps(model: nn.Module, manifest: dict[str, Any], metadata: dict[str, str] | None, source: str,
                       eps: float | None) -> None:
    """The manifest's eps may be written into the BatchNorms left only if that changes nothing or is confirmed."""
    wanted = manifest["eps"]
    if eps is not None and wanted != eps:
        raise _disagrees(source, "eps", f"is {wanted!r}, but eps={eps!r} was passed")
    if wanted is None or eps is not None or (metadata or {}).get("eps") == repr(wanted):
        return
    folded = {entry["bn"] for entry in manifest["folded"]}
    for name, module in model.named_modules():
        own = getattr(module, "eps", None)
        if name not in folded and is_batchnorm_like(module) and own is not None and own != wanted:
            raise InputError(f"{source}: manifest field 'eps' ({wanted!r}) would replace BatchNorm {name!r}'s own eps "
                             f"({own!r}) and nothing bound to the checkpoint records it; pass eps={wanted!r} if the "
                             "checkpoint was folded with it, or fold it again")
