"""Benchmarks of romav2-plugin, run from the repository root as modules: ``python -m benchmarks.speed``,
``python -m benchmarks.accuracy``, ``python -m benchmarks.onnx_speed``, ``python -m benchmarks.gpu_kernels``
(see ``benchmarks/README.md``). Not part of the installed package."""
