"""The model options every command that runs the model shares (segment, run, serve), mapped onto
the `model` settings section once; unset flags leave the config file / env / defaults alone."""
from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="variant name (default: sam2.1_hiera_tiny)")
    group.add_argument("--checkpoint", help="auto (download official weights, the default), a .pt path, or random")
    group.add_argument("--image-size", type=int, help="model input size in pixels, a multiple of 16 (default 1024)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto (CUDA when available)")
    group.add_argument("--precision", choices=("fp32", "bf16"),
                       help="fp32 (exact, the default) or bf16 autocast (faster on GPUs and CPUs with native bf16, slower on others; measured drift)")
    group.add_argument("--model-factory", metavar="MODULE:FUNCTION",
                       help="build a SAM 2-compatible model of your own: FUNCTION(name, checkpoint, image_size, "
                            "device, **kwargs) returning an object that follows masklet.model.protocols")


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `model` settings given on the command line (for `load_settings(model=...)`)."""
    names = {"model": "name", "checkpoint": "checkpoint", "image_size": "image_size", "device": "device",
             "precision": "precision", "model_factory": "factory"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}
