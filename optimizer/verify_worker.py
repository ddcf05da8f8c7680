"""Child process of the export verification: load a TorchScript file as a board would.

    python -m optimizer.verify_worker MODEL ENGINE INPUTS.pt OUT.pt

Runs in a fresh interpreter so nothing of the exporting process (engine, cached modules)
leaks into the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from agent.errors import EdgeforgeError
from agent.model import load_scripted
from agent.torchwarnings import known_torch_deprecations


def main(argv: list[str]) -> int:
    model_path, engine, inputs_path, out_path = argv
    try:
        module = load_scripted(Path(model_path), engine)
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    inputs = torch.load(inputs_path, weights_only=True)
    with torch.inference_mode(), known_torch_deprecations():
        logits = torch.cat([module(inputs[i:i + 256]) for i in range(0, inputs.shape[0], 256)])
    torch.save(logits, out_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
