"""hold_export: the way off the Mac (installed as ``hold_export``; this folder is ``export/``).

- ``torch_nets``   the score networks in PyTorch, built from the layer plan ``hold_mlx.netplan``
- ``layout``       the explicit two-way key/layout map between MLX and torch tensors
- ``torch_model``  loading a checkpoint into torch and scoring for the shared samplers
- ``torch_train``  the torch backend of the shared training loop (CUDA, AMP, DDP)
- ``parity``       MLX <-> torch parity checks (random checkpoints, output comparison)
- ``flops``        model FLOPs per image from the layer plan (analytic, cross-checked by torch)
- ``onnx_export``  the ONNX exporter (graph u, t -> alpha; metadata; checked against torch)
- ``onnx_runtime`` sampling from the .onnx file with onnxruntime + NumPy only (no torch, no MLX)

Nothing here is imported by ``hold_mlx`` unless a torch or ONNX path is asked for.
"""
