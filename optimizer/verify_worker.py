"""Child process of the export verification: load a board file as a board would.

    python -m optimizer.verify_worker MODEL ENGINE INPUTS.npy OUT.npy

ENGINE is torch's quantized engine for a TorchScript file (qnnpack, x86, fbgemm),
`onnxruntime` for an ONNX file or `executorch` for an ExecuTorch program. Runs in a fresh
interpreter so nothing of the exporting process (engine, cached modules, sessions) leaks into
the check.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from agent.errors import EdgeforgeError


def main(argv: list[str]) -> int:
    model_path, engine, inputs_path, out_path = argv
    inputs = np.load(inputs_path, allow_pickle=False)
    try:
        if engine == "onnxruntime":
            from optimizer.onnx_export import run

            logits = run(Path(model_path), inputs)
        elif engine == "executorch":
            from optimizer import executorch_export

            logits = executorch_export.run(Path(model_path), inputs)
        else:
            import torch

            from agent.engines.torchscript import load_scripted
            from agent.torchwarnings import known_torch_deprecations
            from optimizer.model import eval_batch_size

            module = load_scripted(Path(model_path), engine)
            x = torch.from_numpy(inputs)
            size = eval_batch_size(x.shape[1:])
            with torch.inference_mode(), known_torch_deprecations():
                logits = torch.cat([module(x[i:i + size])
                                    for i in range(0, x.shape[0], size)]).numpy()
    except EdgeforgeError as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    np.save(out_path, logits, allow_pickle=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
